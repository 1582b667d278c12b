"""The report notebook's settings, the committed runs it reads, and the figures it derives.

The notebook's first cells assign its settings; these ``LABCNN_*`` environment variables
override them, so CI can execute it on a short run:

=======================  ==============================================  ==================
variable                 meaning                                         notebook default
=======================  ==============================================  ==================
``LABCNN_EPOCHS``        epochs of the lab recipe                        50
``LABCNN_SUBSET``        training images used (the test set is whole)    all 50,000
``LABCNN_DATA_DIR``      folder holding CIFAR-10 (any layout)            ``data``
``LABCNN_DOWNLOAD``      ``1``/``0``: download when no data is found     1
``LABCNN_CIFAR10_URL``   download source (a course mirror)               torchvision's
``LABCNN_VERIFY``        ``1``/``0``: check official files' MD5s         1
``LABCNN_DEVICE``        ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``  auto
``LABCNN_RUNS_DIR``      where run folders (checkpoints, figures) go     ``runs``
``LABCNN_IMAGES_DIR``    where the reference run's figures go            ``Images``
=======================  ==============================================  ==================

The notebook's own paths resolve from the checkout's root when ``labcnn`` is imported from a
checkout, else from the working directory; ``LABCNN_*`` paths are used as given, ``~`` expanded.
"""
from __future__ import annotations

import io
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision

import labcnn
from labcnn.analysis import ORIGINAL_ACCURACY
from labcnn.config import TrainConfig, make_config
from labcnn.device import describe_device, select_device

# The original lab report's four figures and what each measured (see the notebook's last section).
ORIGINAL = {
    "test_acc": (ORIGINAL_ACCURACY, "mean over epochs of the accuracy of the last test batch of 100 images"),
    "train_acc": (0.6742, "training accuracy as the original script printed it"),
    "train_loss": (0.00907, "sum of batch-mean losses divided by the number of images: about 1/100 of a per-image loss"),
    "test_loss": (0.00946, "the same sum divided by the number of test images"),
}


def checkout_root() -> Path | None:
    """The repository's root when ``labcnn`` is imported from a checkout (editable install or
    ``PYTHONPATH``), else ``None`` (a regular install, e.g. ``pip install .`` on Colab)."""
    root = Path(labcnn.__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "notebooks").is_dir() else None


@dataclass(frozen=True)
class Settings:
    """The notebook's run: its config, where the data and its outputs are, and its device."""

    config: TrainConfig
    data_dir: Path
    download: bool
    url: str | None
    verify: bool
    device: torch.device
    run_dir: Path
    images_dir: Path | None  # the reference figures' folder: only for the full default run

    def load(self, train: bool):
        """One split with these settings: ``(uint8 [N, 3, 32, 32], int64 [N])``; see
        :func:`labcnn.data.load_cifar10` for the errors."""
        from labcnn.data import load_cifar10

        return load_cifar10(self.data_dir, train=train, download=self.download, verify=self.verify, url=self.url)

    def save(self, fig, name: str, alt: str) -> None:
        """Write ``fig`` as ``run_dir/name`` and, for the reference run, ``images_dir/name``, then
        :func:`show` it with ``alt`` text. Raises :class:`labcnn.errors.WriteError` if a folder is unwritable."""
        from labcnn import plots

        for folder in filter(None, (self.run_dir, self.images_dir)):
            plots.save(fig, folder / name)
        show(fig, alt)

    def __str__(self) -> str:
        size = f"{self.config.subset} training images" if self.config.subset else "all training images"
        figures = f"{self.run_dir}" + (f" and {self.images_dir}" if self.images_dir else "")
        return (f"lab recipe, {self.config.epochs} epochs, {size}, on {describe_device(self.device)}\n"
                f"data: {self.data_dir} (download if missing: {'yes' if self.download else 'no'})\n"
                f"run folder: {self.run_dir}; figures: {figures}")


def _env_path(env, name: str, value, base: Path) -> Path:
    if env.get(name):
        return Path(env[name]).expanduser()
    path = Path(value).expanduser()
    return path if path.is_absolute() else base / path


def _env_flag(env, name: str, value: bool) -> bool:
    return env[name].strip().lower() not in ("0", "false", "no", "") if name in env else bool(value)


def notebook_settings(epochs=50, subset=None, data_dir="data", download=True, device="auto", runs_dir="runs",
                      env=os.environ) -> Settings:
    """The notebook's :class:`Settings` from its assignments, overridden by ``LABCNN_*`` variables.

    The full default run trains in ``RUNS_DIR/lab``, the folder ``python -m labcnn train --out
    runs/lab`` writes, so the notebook resumes or replays that run, and only it also writes the
    reference figures into the checkout's ``Images/``; other runs get their own folder.

    Raises:
        DeviceError: the device is unknown or absent (checked before any data is loaded).
        ConfigError: epochs or subset out of range.
    """
    base = checkout_root() or Path.cwd()
    epochs = int(env.get("LABCNN_EPOCHS", epochs))
    subset = int(env["LABCNN_SUBSET"]) if env.get("LABCNN_SUBSET") else subset
    config = make_config(epochs=epochs, subset=subset)
    reference = config == make_config()
    images = _env_path(env, "LABCNN_IMAGES_DIR", "Images", base) if reference and (checkout_root() or env.get("LABCNN_IMAGES_DIR")) else None
    return Settings(
        config=config,
        data_dir=_env_path(env, "LABCNN_DATA_DIR", data_dir, base),
        download=_env_flag(env, "LABCNN_DOWNLOAD", download),
        url=env.get("LABCNN_CIFAR10_URL") or None,
        verify=_env_flag(env, "LABCNN_VERIFY", True),
        device=select_device(env.get("LABCNN_DEVICE", device)),
        run_dir=_env_path(env, "LABCNN_RUNS_DIR", runs_dir, base) / ("lab" if reference else f"lab-{epochs}ep-{subset or 'all'}img"),
        images_dir=images,
    )


def show(fig, alt: str) -> None:
    """Display ``fig`` in the notebook as a PNG whose output metadata carries ``alt`` text (the
    ``alt`` attribute of the image in nbconvert's HTML export)."""
    from IPython.display import Image, display

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    display(Image(data=buffer.getvalue(), format="png", metadata={"alt": alt}))


def committed(name: str):
    """What the checkout's ``results/<name>.json`` holds (a run's per-epoch history, or other
    figures), or ``None`` when the notebook runs outside a checkout (or the file is absent)."""
    root = checkout_root()
    path = root / "results" / f"{name}.json" if root else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def cpu_name() -> str:
    """The processor's model name from ``/proc/cpuinfo`` (Linux), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | None = None) -> str:
    """One line on the machine and libraries: device, CPU, threads, torch and torchvision versions."""
    device = device or select_device()
    return (
        f"device {describe_device(device)}; CPU {cpu_name()} ({os.cpu_count()} logical cores); "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, Python {platform.python_version()}"
    )
