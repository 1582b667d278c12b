"""What the report notebook needs beyond the lab: its settings (each overridden by a
``LABCNN_*`` variable, read through the one range table), where the checkout and its committed
runs are, and where its figures go."""

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

import labcnn
from labcnn import plots
from labcnn.data import load_cifar10
from labcnn.device import select_device, set_threads
from labcnn.fileio import read_json
from labcnn.settings import RANGES, TrainConfig, make_config

RESULTS_PLACES = "the imported labcnn's checkout, this folder and its parents, ./labcnn, ../labcnn"


def checkout_root() -> Path | None:
    """The repository's root when labcnn is imported from a checkout, else ``None`` (Colab)."""
    root = Path(labcnn.__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "notebooks").is_dir() else None


def results_dir() -> Path | None:
    """``results/`` of the first checkout (``pyproject.toml`` and ``results/``) in
    RESULTS_PLACES: a notebook copied alone still finds a clone beside it."""
    cwd = Path.cwd().resolve()
    places = [Path(labcnn.__file__).resolve().parents[1], cwd, *cwd.parents]
    for root in places + [cwd / "labcnn", cwd.parent / "labcnn"]:
        if (root / "pyproject.toml").is_file() and (root / "results").is_dir():
            return root / "results"
    return None


def committed(name: str):
    """The parsed ``results/<name>.json``, or None; LabcnnError names a file that is not JSON."""
    folder = results_dir()
    path = folder / f"{name}.json" if folder else None
    return read_json(path, "JSON") if path and path.is_file() else None


@dataclass(frozen=True)
class Settings:
    """The notebook's run; ``images_dir`` (the committed figures) only for the reference run:
    the lab recipe, all 50 epochs, in a checkout."""

    config: TrainConfig
    data_dir: Path
    download: bool
    url: str | None
    verify: bool
    device: torch.device
    run_dir: Path
    images_dir: Path | None

    def load(self, train: bool):
        """One split of CIFAR-10, as :func:`labcnn.data.load_cifar10` returns it."""
        return load_cifar10(self.data_dir, train, self.download, self.verify, self.url)

    def show(self, fig, name: str, alt: str) -> None:
        """Save ``fig`` as ``name`` in the run folder (and Images/ for the reference); show it."""
        for folder in (self.run_dir, self.images_dir):
            if folder is not None:
                plots.save(fig, folder / name)
        plots.show(fig, alt)


def notebook_settings(
    epochs=50, subset=None, data_dir="data", download=True, device="auto", runs_dir="runs", env=None
) -> Settings:
    """The notebook's :class:`Settings`, each overridden by its ``LABCNN_*`` variable (empty:
    unset); relative paths start at the checkout's root. Raises ConfigError, DeviceError."""
    env = os.environ if env is None else env

    def var(name: str, default, key: str | None = None):
        text = env.get(f"LABCNN_{name}", "").strip()
        if not text:
            return default
        return RANGES[key].parse(f"LABCNN_{name}", text) if key else text

    def where(name: str, default) -> Path:  # an absolute path stays as it is
        return (checkout_root() or Path.cwd()) / Path(var(name, default)).expanduser()

    # In the notebook a warning is one plain line, not a red box quoting labcnn's source.
    warnings.showwarning = lambda message, *args, **kwargs: print(f"warning: {message}")
    config = make_config(
        epochs=var("EPOCHS", epochs, "epochs"), subset=var("SUBSET", subset, "subset")
    )
    reference = config == make_config()  # the lab recipe, all 50 epochs, all images
    set_threads()
    runs = where("RUNS_DIR", runs_dir)
    run_name = f"lab-{config.epochs}ep-{config.subset or 'all'}img"
    keep_images = reference and (checkout_root() or env.get("LABCNN_IMAGES_DIR"))
    return Settings(
        config=config,
        data_dir=where("DATA_DIR", data_dir),
        download=var("DOWNLOAD", download, "download"),
        url=var("CIFAR10_URL", None),
        verify=var("VERIFY", True, "verify"),
        device=select_device(var("DEVICE", device)),
        run_dir=runs / ("lab" if reference else run_name),  # where train --out runs/lab writes
        images_dir=where("IMAGES_DIR", "Images") if keep_images else None,
    )
