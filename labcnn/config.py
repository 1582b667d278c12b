"""A run's settings and where it runs: :class:`TrainConfig`, the recipes, the one range table
(:data:`RANGES`, read by the config, the command line and the ``LABCNN_*`` variables), the
device, its CPU threads and mixed precision.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from labcnn import ConfigError, DeviceError

TRUE, FALSE = ("1", "true", "yes", "on", "y"), ("0", "false", "no", "off", "n")


@dataclass(frozen=True)
class Range:
    """What one setting accepts: a ``kind`` (int, float, bool or str) within ``[low, high]``
    (an end is excluded where ``open`` says so: ``"low"``, ``"high"``), or one of ``choices``."""

    kind: type
    low: float = -math.inf
    high: float = math.inf
    open: str = ""
    choices: tuple = ()
    optional: bool = False  # None (unset) is accepted

    def expected(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.kind is bool:
            return f"a boolean ({'/'.join(TRUE)} or {'/'.join(FALSE)}, any case)"
        words = ["an integer" if self.kind is int else "a finite number"]
        if self.low > -math.inf:
            words.append(f"{'>' if 'low' in self.open else '>='} {self.low}")
        if self.high < math.inf:
            words.append(f"{'<' if 'high' in self.open else '<='} {self.high}")
        return " and ".join([" ".join(words[:2]), *words[2:]]) if len(words) > 1 else words[0]

    def holds(self, value) -> bool:
        if value is None:
            return self.optional
        if self.choices:
            return value in self.choices
        if self.kind is bool or isinstance(value, bool):
            return self.kind is bool and isinstance(value, bool)
        if not isinstance(value, (int, float)) or (self.kind is int and not isinstance(value, int)):
            return False
        above = value > self.low if "low" in self.open else value >= self.low
        below = value < self.high if "high" in self.open else value <= self.high
        return math.isfinite(value) and above and below

    def parse(self, name: str, text: str):
        """``text`` (an option's or variable's value) as this kind; ConfigError naming ``name``."""
        text = text.strip()
        try:
            if self.kind is bool:
                value = {**dict.fromkeys(TRUE, True), **dict.fromkeys(FALSE, False)}[text.lower()]
            else:
                value = self.kind(text)
        except (KeyError, ValueError):
            value = ConfigError
        if value is ConfigError or not self.holds(value):
            raise ConfigError(f"{name}={text!r}: expected {self.expected()}")
        return value


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; the defaults are the lab's recipe.

    ``optimizer``: Adam (L2 ``weight_decay`` added to the gradient), AdamW (decoupled decay) or
    SGD with Nesterov ``momentum``. ``schedule``: constant, or OneCycleLR stepped per batch with
    ``lr`` as its peak (Smith and Topin, 2017). ``augment``: random crop (4-pixel padding) and
    horizontal flip. ``mean``/``std``: normalization as fractions of 255 (``None``: measured on
    the training images). ``subset``: train on that many images; ``val_size``: hold that many
    out for validation. ``amp``: mixed precision, see :func:`amp_dtype`.
    """

    recipe: str = "lab"
    epochs: int = 50
    batch_size: int = 100
    optimizer: str = "adam"
    lr: float = 0.01
    weight_decay: float = 0.001
    momentum: float = 0.9
    schedule: str = "constant"
    label_smoothing: float = 0.0
    augment: bool = False
    mean: tuple | None = (0.4914, 0.4822, 0.4465)  # the lab's; see labcnn.model.LAB_MEAN
    std: tuple | None = (0.2023, 0.1994, 0.2010)
    seed: int = 0
    subset: int | None = None
    val_size: int = 0
    eval_batch_size: int = 1000
    amp: str = "off"

    def __post_init__(self):
        bad = [f"{k}={getattr(self, k)!r} (expected {r.expected()})" for k, r in RANGES.items()
               if k in self.__dataclass_fields__ and not r.holds(getattr(self, k))]
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None:
                try:
                    value = tuple(float(v) for v in value)
                except (TypeError, ValueError):
                    value = ()
                object.__setattr__(self, name, value)
                positive = name == "mean" or (value and min(value) > 0)
                if len(value) != 3 or not all(map(math.isfinite, value)) or not positive:
                    bad.append(f"{name}={getattr(self, name)!r} (expected three finite numbers"
                               f"{', each > 0' if name == 'std' else ''})")
        if bad:
            raise ConfigError(f"invalid TrainConfig {'; '.join(bad)}")


# Named recipes: overrides of the TrainConfig defaults (results/README.md has their runs).
RECIPES = {
    "lab": {},
    # Chosen on 5,000 held-out training images (val_size), never on the test set.
    "improved": dict(epochs=40, batch_size=128, optimizer="sgd", lr=0.1, weight_decay=5e-4,
                     schedule="onecycle", label_smoothing=0.1, augment=True, mean=None, std=None,
                     val_size=5000, amp="auto"),
}
# The improved recipe for a 2-epoch budget: no augmentation, batch 64 (results/README.md).
RECIPES["fast"] = {**RECIPES["improved"], "epochs": 2, "augment": False, "batch_size": 64}
AMP_CHOICES = ("off", "auto", "bf16", "fp16")

# The one range table: TrainConfig, the command line and the LABCNN_* variables all read it.
RANGES = {
    "recipe": Range(str, choices=tuple(RECIPES)),
    "epochs": Range(int, 1),
    "batch_size": Range(int, 1),
    "optimizer": Range(str, choices=("adam", "adamw", "sgd")),
    "lr": Range(float, 0, open="low"),
    "weight_decay": Range(float, 0),
    "momentum": Range(float, 0, 1, open="high"),
    "schedule": Range(str, choices=("constant", "onecycle")),
    "label_smoothing": Range(float, 0, 1, open="high"),
    "augment": Range(bool),
    "seed": Range(int, 0, 2**64 - 1),  # what torch.manual_seed accepts
    "subset": Range(int, 1, optional=True),
    "val_size": Range(int, 0),
    "eval_batch_size": Range(int, 1),
    "amp": Range(str, choices=AMP_CHOICES),
    "rounds": Range(int, 1),
    "images_per_round": Range(int, 1),
    "download": Range(bool),
    "verify": Range(bool),
}
# Fields of earlier versions, read from their checkpoints while at these (unused) values.
REMOVED = {"cutout": 0, "ema": 0.0, "whiten": False, "compile": False}


def make_config(recipe: str = "lab", **overrides) -> TrainConfig:
    """The named recipe's :class:`TrainConfig`, with the ``overrides`` that are not ``None``.
    Raises :class:`ConfigError` naming an unknown recipe or field, or a value out of range."""
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}: expected one of {', '.join(RECIPES)}")
    unknown = set(overrides) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise ConfigError(f"unknown TrainConfig fields {sorted(unknown)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    return TrainConfig(**{**RECIPES[recipe], "recipe": recipe, **given})


def config_dict(config: TrainConfig) -> dict:
    """``config`` as plain values (lists for tuples), as checkpoints store it."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def config_from_dict(saved: dict) -> TrainConfig:
    """The config a checkpoint stored. Fields it predates read as their defaults; removed ones
    are dropped while unused. Raises :class:`ConfigError` for a field this version does not know."""
    saved = dict(saved)
    if isinstance(saved.get("amp"), bool):  # the first checkpoints stored a flag
        saved["amp"] = "auto" if saved["amp"] else "off"
    saved["amp"] = {"native": "auto"}.get(saved.get("amp"), saved.get("amp", "off"))
    used = [k for k, off in REMOVED.items() if saved.pop(k, off) not in (off, None)]
    if used:
        raise ConfigError(f"uses {', '.join(used)}, which this labcnn no longer has "
                          "(see results/README.md)")
    unknown = set(saved) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise ConfigError(f"holds settings this labcnn does not know ({', '.join(sorted(unknown))})"
                          ": it comes from a newer labcnn; update labcnn")
    return TrainConfig(**saved)


def applied_settings(config: TrainConfig) -> dict:
    """The settings that act on this run, for printing (no momentum for Adam, no unset sizes)."""
    unused = {"momentum"} if config.optimizer != "sgd" else set()
    unused |= {k for k in ("subset", "mean", "std", "val_size") if not getattr(config, k)}
    return {k: v for k, v in asdict(config).items() if k not in unused}


def env_value(env, name: str, key: str, default):
    """``env[name]`` read through ``RANGES[key]``; unset or empty: ``default``."""
    text = env.get(name, "")
    return RANGES[key].parse(name, text) if text.strip() else default


# --- where it runs ---------------------------------------------------------------------------
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def select_device(name=None) -> torch.device:
    """The device called ``name``, checked; ``None``/``"auto"``: CUDA, then Apple MPS, then CPU.

    Raises:
        DeviceError: not a device name, or a device this machine lacks (lists what it has).
    """
    name = str(name) if isinstance(name, torch.device) else name
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else
                            "mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {name!r}: expected {DEVICE_CHOICES}") from None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    have = ["cpu", *(f"cuda:{i}" for i in range(count))]
    have += ["mps"] * torch.backends.mps.is_available()
    if device.type == "cuda" and count and (device.index or 0) < count:
        return device
    if device.type == "cpu" or (device.type == "mps" and "mps" in have):
        return device
    if device.type not in ("cuda", "mps"):
        raise DeviceError(f"device {name!r} is not supported: expected {DEVICE_CHOICES}")
    why = "a CPU-only build of torch" if device.type == "cuda" and torch.version.cuda is None else \
        f"{count} CUDA GPU(s)" if device.type == "cuda" else "not Apple silicon with macOS 12.3+"
    raise DeviceError(f"device {name!r} is not available here ({why}); "
                      f"available: {', '.join(have)}")


def usable_cpus() -> tuple[int, int]:
    """``(CPUs this process may use, CPUs of the machine)``: the affinity mask (``taskset``,
    Docker ``--cpuset-cpus``, Slurm) and the cgroup CPU quota (``cpu.max``, v1 ``cfs_quota_us``)."""
    total = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else total
    v1 = ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")
    for quota_file, period_file in (("cpu.max", None), v1):
        try:
            words = Path("/sys/fs/cgroup", quota_file).read_text().split()
            if period_file:
                words.append(Path("/sys/fs/cgroup", period_file).read_text().strip())
            if words[0] not in ("max", "-1"):
                usable = min(usable, max(1, int(int(words[0]) / int(words[1]))))
        except (OSError, ValueError, IndexError, ZeroDivisionError):
            continue
    return usable, total


def set_threads(threads: int | None = None) -> int:
    """Set torch's CPU threads, and return them: ``threads``, else ``OMP_NUM_THREADS`` when set,
    else one per physical core, never more than :func:`usable_cpus` (an oversubscribed
    quota trains many times slower)."""
    import psutil

    if threads is None and os.environ.get("OMP_NUM_THREADS", "").strip():
        return torch.get_num_threads()
    usable, _ = usable_cpus()
    torch.set_num_threads(threads or min(psutil.cpu_count(logical=False) or usable, usable))
    return torch.get_num_threads()


def describe_device(device: torch.device) -> str:
    """``"cpu (2 threads)"``, ``"cpu (1 thread; 1 of 2 CPUs usable)"``, ``"cuda (NVIDIA H200)"``."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type != "cpu":
        return device.type
    threads, (usable, total) = torch.get_num_threads(), usable_cpus()
    limit = f"; {usable} of {total} CPUs usable" if usable < total else ""
    return f"cpu ({threads} thread{'s' * (threads != 1)}{limit})"


def cpu_info(key: str) -> str:
    """The first ``key`` line's value in ``/proc/cpuinfo`` (Linux), else ``""``."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    values = (ln.split(":", 1)[1].strip() for ln in lines if ln.split(":")[0].strip() == key)
    return next(values, "")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``avx2``, ``avx512_bf16``, ...); empty off Linux."""
    return set(cpu_info("flags").split())


def cpu_name() -> str:
    import platform

    return cpu_info("model name") or platform.processor() or platform.machine()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: a CPU with ``avx512_bf16`` or ``amx_bf16``,
    a GPU from Ampere on. Elsewhere bfloat16 is emulated, slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def bf16_absence(device: torch.device) -> str:
    """Why bfloat16 is not measured on ``device``, in one phrase."""
    if device.type == "cpu":
        return "this CPU has neither avx512_bf16 nor amx_bf16: bfloat16 would be emulated, slower"
    return f"{describe_device(device)} has no native bfloat16"


def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype of ``amp`` on ``device``, ``None`` for float32. ``auto``: bfloat16
    where native (:func:`native_bf16`), else float16 on CUDA (a T4) and float32 elsewhere;
    ``bf16`` and ``fp16`` force one; ``off``: float32."""
    if amp == "off" or (amp == "auto" and not native_bf16(device) and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


# --- the notebook's settings -----------------------------------------------------------------
def checkout_root() -> Path | None:
    """The repository's root when labcnn is imported from a checkout (editable install), else
    ``None`` (a regular install, as on Colab)."""
    import labcnn

    root = Path(labcnn.__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "notebooks").is_dir() else None


@dataclass(frozen=True)
class Settings:
    """The notebook's run: its config, data, device, run folder and (for the reference run
    only: the lab recipe, all 50 epochs, in a checkout) the folder of the committed figures."""

    config: TrainConfig
    data_dir: Path
    download: bool
    url: str | None
    verify: bool
    device: torch.device
    run_dir: Path
    images_dir: Path | None

    def load(self, train: bool):
        """One split: ``(uint8 [N, 3, 32, 32], int64 [N])``; see :func:`labcnn.data.load_cifar10`."""
        from labcnn.data import load_cifar10

        return load_cifar10(self.data_dir, train=train, download=self.download,
                            verify=self.verify, url=self.url)

    def show(self, fig, name: str, alt: str) -> None:
        """Save ``fig`` as ``run_dir/name`` (and ``images_dir/name`` for the reference run), then
        display it with ``alt`` text. Raises WriteError when a folder cannot be written."""
        from labcnn import plots

        for folder in filter(None, (self.run_dir, self.images_dir)):
            plots.save(fig, folder / name)
        plots.show(fig, alt)

    def __str__(self) -> str:
        size = f"{self.config.subset} training images" if self.config.subset else "all training images"
        return (f"lab recipe, {self.config.epochs} epochs, {size}, on {describe_device(self.device)}\n"
                f"data: {self.data_dir} (download if missing: {'yes' if self.download else 'no'})\n"
                f"run folder: {self.run_dir}")


def notebook_settings(epochs=50, subset=None, data_dir="data", download=True, device="auto",
                      runs_dir="runs", env=os.environ) -> Settings:
    """The notebook's :class:`Settings` from its assignments, each overridden by its ``LABCNN_*``
    variable (read through :data:`RANGES`; empty means unset). Relative paths start at the
    checkout's root, else the working directory. The full lab run trains in ``RUNS_DIR/lab``, the
    folder ``python -m labcnn train --out runs/lab`` writes, so the notebook resumes or replays it.

    Raises ConfigError (a value out of range, naming the variable) or DeviceError.
    """
    import warnings

    # In the notebook a warning is one plain line, not a red box quoting labcnn's source.
    warnings.showwarning = lambda message, *args, **kwargs: print(f"warning: {message}")
    base = checkout_root() or Path.cwd()

    def where(name, value):
        path = Path(env.get(name, "").strip() or value).expanduser()
        return path if path.is_absolute() else base / path

    epochs = env_value(env, "LABCNN_EPOCHS", "epochs", epochs)
    subset = env_value(env, "LABCNN_SUBSET", "subset", subset)
    config = make_config(epochs=epochs, subset=subset)
    reference = config == make_config() and (checkout_root() or env.get("LABCNN_IMAGES_DIR"))
    set_threads()
    return Settings(
        config=config, data_dir=where("LABCNN_DATA_DIR", data_dir),
        download=env_value(env, "LABCNN_DOWNLOAD", "download", download),
        url=env.get("LABCNN_CIFAR10_URL", "").strip() or None,
        verify=env_value(env, "LABCNN_VERIFY", "verify", True),
        device=select_device(env.get("LABCNN_DEVICE", "").strip() or device),
        run_dir=where("LABCNN_RUNS_DIR", runs_dir) / ("lab" if config == make_config()
                                                       else f"lab-{epochs}ep-{subset or 'all'}img"),
        images_dir=where("LABCNN_IMAGES_DIR", "Images") if reference else None)
