"""A run's settings and where it runs: :class:`TrainConfig`, the recipes, the one range table
(:data:`RANGES`: the config, the command line and the ``LABCNN_*`` variables all read it), the
device, its CPU threads, mixed precision, and the notebook's settings.
"""
from __future__ import annotations

import math
import os
import platform
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from labcnn import ConfigError, DeviceError

TRUE, FALSE = ("1", "true", "yes", "on", "y"), ("0", "false", "no", "off", "n")

@dataclass(frozen=True)
class Range:
    """What a setting accepts: a ``kind`` in ``[low, high]`` (``open``: ``"low"`` and/or
    ``"high"`` end excluded), or one of ``choices``; ``None`` only if ``optional``."""

    kind: type
    low: float = -math.inf
    high: float = math.inf
    open: str = ""
    choices: tuple = ()
    optional: bool = False

    def expected(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.kind is bool:
            return f"a boolean ({'/'.join(TRUE)} or {'/'.join(FALSE)}, any case)"
        ends = [f"{'>' if 'low' in self.open else '>='} {self.low}"] * (self.low > -math.inf)
        ends += [f"{'<' if 'high' in self.open else '<='} {self.high}"] * (self.high < math.inf)
        return " and ".join([f"{'an integer' if self.kind is int else 'a finite number'} "
                             f"{ends[0]}", *ends[1:]] if ends else [self.kind.__name__])

    def holds(self, value) -> bool:
        if value is None or self.choices:
            return self.optional if value is None else value in self.choices
        if self.kind is bool or isinstance(value, bool):
            return self.kind is bool and isinstance(value, bool)
        if not isinstance(value, int if self.kind is int else (int, float)):
            return False
        above = value > self.low if "low" in self.open else value >= self.low
        below = value < self.high if "high" in self.open else value <= self.high
        return math.isfinite(value) and above and below

    def parse(self, name: str, text: str):
        """``text`` as this kind; :class:`ConfigError` naming ``name`` and what is accepted."""
        bools = {**dict.fromkeys(TRUE, True), **dict.fromkeys(FALSE, False)}
        try:
            value = bools[text.strip().lower()] if self.kind is bool else self.kind(text.strip())
        except (KeyError, ValueError):
            value = ConfigError
        if value is ConfigError or not self.holds(value):
            raise ConfigError(f"{name}={text!r}: expected {self.expected()}")
        return value

@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run; the defaults are the lab's recipe. ``schedule``:
    constant, or OneCycleLR per batch peaking at ``lr`` (Smith and Topin, 2017); ``mean``,
    ``std``: fractions of 255 (``None``: measured); ``amp``: see :func:`amp_dtype`."""

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
    mean: tuple | None = (0.4914, 0.4822, 0.4465)  # labcnn.model.LAB_MEAN
    std: tuple | None = (0.2023, 0.1994, 0.2010)
    seed: int = 0
    subset: int | None = None
    val_size: int = 0
    eval_batch_size: int = 1000
    amp: str = "off"

    def __post_init__(self):
        bad = [f"{k}={getattr(self, k)!r} (expected {r.expected()})" for k, r in RANGES.items()
               if k in self.__dataclass_fields__ and not r.holds(getattr(self, k))]
        for name in ("mean", "std"):  # three finite numbers (std > 0), or None: measured
            value = getattr(self, name)
            try:
                value = None if value is None else tuple(map(float, value))
                if value is not None and (len(value) != 3 or not all(map(math.isfinite, value))
                                          or (name == "std" and min(value) <= 0)):
                    raise ValueError
            except (TypeError, ValueError):
                bad.append(f"{name}={value!r} (expected three finite numbers)")
            object.__setattr__(self, name, value)
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
    """The named recipe, with the ``overrides`` that are not ``None``. Raises ConfigError."""
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
    """A checkpoint's config: fields it predates take their defaults, removed ones are dropped
    while unused. Raises ConfigError for a removed feature in use or an unknown field."""
    saved = dict(saved)
    amp = saved.get("amp", "off")  # the first checkpoints stored a flag; "native" is now "auto"
    saved["amp"] = {True: "auto", False: "off", "native": "auto"}.get(amp, amp)
    used = [k for k, off in REMOVED.items() if saved.pop(k, off) not in (off, None)]
    if used:
        raise ConfigError(f"uses {', '.join(used)}, which this labcnn no longer has "
                          "(see results/README.md)")
    unknown = sorted(set(saved) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise ConfigError(f"holds settings this labcnn does not know ({', '.join(unknown)}): "
                          "it comes from a newer labcnn; update labcnn")
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

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"

def select_device(name=None) -> torch.device:
    """The device called ``name``, checked; ``None``/``"auto"``: CUDA, then Apple MPS, then CPU.
    Raises DeviceError: not a device name, or one this machine lacks (lists what it has)."""
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
    if device.type == "cpu" or (device.type == "mps" and "mps" in have) or (
            device.type == "cuda" and (device.index or 0) < count):
        return device
    if device.type not in ("cuda", "mps"):
        raise DeviceError(f"device {name!r} is not supported: expected {DEVICE_CHOICES}")
    why = ("not Apple silicon with macOS 12.3+" if device.type == "mps" else f"{count} CUDA GPU(s)"
           if torch.version.cuda is not None else "a CPU-only build of torch")
    raise DeviceError(f"device {name!r} is not available here ({why}); "
                      f"available: {', '.join(have)}")

def usable_cpus() -> tuple[int, int]:
    """``(CPUs this process may use, CPUs of the machine)``: the affinity mask (``taskset``,
    Docker ``--cpuset-cpus``, Slurm) and a cgroup CPU quota (``cpu.max``, v1 ``cfs_quota_us``)."""
    total = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else total
    for files in (("cpu.max",), ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")):
        try:
            words = " ".join(Path("/sys/fs/cgroup", f).read_text() for f in files).split()
            if words[0] not in ("max", "-1"):
                usable = min(usable, max(1, int(words[0]) // int(words[1])))
        except (OSError, ValueError, IndexError, ZeroDivisionError):
            continue
    return usable, total

def set_threads(threads: int | None = None) -> int:
    """Set and return torch's CPU threads: ``threads``, else ``OMP_NUM_THREADS`` when set, else
    one per physical core, never more than :func:`usable_cpus` (oversubscribed, a quota trains
    many times slower)."""
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
    found = (ln.split(":", 1)[1].strip() for ln in lines if ln.split(":")[0].strip() == key)
    return next(found, "")

def cpu_flags() -> set[str]:
    """The CPU's feature flags (``avx2``, ``avx512_bf16``, ...); empty off Linux."""
    return set(cpu_info("flags").split())

def cpu_name() -> str:
    return cpu_info("model name") or platform.machine()

def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (an ``avx512_bf16`` or ``amx_bf16`` CPU, a
    GPU from Ampere on); elsewhere it is emulated, slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and bool({"avx512_bf16", "amx_bf16"} & cpu_flags())

def bf16_absence(device: torch.device) -> str:
    """Why bfloat16 is not measured on ``device``, in one phrase."""
    if device.type == "cpu":
        return "this CPU has neither avx512_bf16 nor amx_bf16: bfloat16 would be emulated, slower"
    return f"{describe_device(device)} has no native bfloat16"

def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype of ``amp`` on ``device`` (``None``: float32). ``auto``: bfloat16 where
    native, else float16 on CUDA (a T4), else float32; ``bf16``, ``fp16`` force one."""
    if amp == "auto":
        return torch.bfloat16 if native_bf16(device) else (
            torch.float16 if device.type == "cuda" else None)
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)

def checkout_root() -> Path | None:
    """The repository's root when labcnn is imported from a checkout, else ``None`` (a regular
    install, as on Colab)."""
    import labcnn

    root = Path(labcnn.__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() and (root / "notebooks").is_dir() else None

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
        """One split, as :func:`labcnn.data.load_cifar10` returns it."""
        from labcnn.data import load_cifar10

        return load_cifar10(self.data_dir, train, self.download, self.verify, self.url)

    def show(self, fig, name: str, alt: str) -> None:
        """Save ``fig`` in ``run_dir`` (and ``images_dir``) as ``name``; display it with ``alt``."""
        from labcnn import plots

        for folder in filter(None, (self.run_dir, self.images_dir)):
            plots.save(fig, folder / name)
        plots.show(fig, alt)

    def __str__(self) -> str:
        size = f"{self.config.subset or 'all'} training images"
        return (f"lab recipe, {self.config.epochs} epochs, {size}, on "
                f"{describe_device(self.device)}\ndata: {self.data_dir} (download if missing: "
                f"{'yes' if self.download else 'no'})"
                f"\nrun folder: {self.run_dir}")

def notebook_settings(epochs=50, subset=None, data_dir="data", download=True, device="auto",
                      runs_dir="runs", env=os.environ) -> Settings:
    """The notebook's :class:`Settings`, each overridden by its ``LABCNN_*`` variable (read
    through :data:`RANGES`; empty means unset). Relative paths start at the checkout's root, else
    the working directory. The full lab run trains in ``RUNS_DIR/lab``, where ``python -m labcnn
    train --out runs/lab`` writes. Raises ConfigError naming the variable, or DeviceError."""
    import warnings

    # In the notebook a warning is one plain line, not a red box quoting labcnn's source.
    warnings.showwarning = lambda message, *args, **kwargs: print(f"warning: {message}")
    base = checkout_root() or Path.cwd()

    def where(name, value):
        path = Path(env.get(name, "").strip() or value).expanduser()
        return path if path.is_absolute() else base / path

    epochs = env_value(env, "LABCNN_EPOCHS", "epochs", epochs)
    subset = env_value(env, "LABCNN_SUBSET", "subset", subset)
    config, full = make_config(epochs=epochs, subset=subset), make_config()
    set_threads()
    return Settings(
        config=config, data_dir=where("LABCNN_DATA_DIR", data_dir),
        download=env_value(env, "LABCNN_DOWNLOAD", "download", download),
        url=env.get("LABCNN_CIFAR10_URL", "").strip() or None,
        verify=env_value(env, "LABCNN_VERIFY", "verify", True),
        device=select_device(env.get("LABCNN_DEVICE", "").strip() or device),
        run_dir=where("LABCNN_RUNS_DIR", runs_dir) / (
            "lab" if config == full else f"lab-{epochs}ep-{subset or 'all'}img"),
        images_dir=where("LABCNN_IMAGES_DIR", "Images") if config == full and (
            checkout_root() or env.get("LABCNN_IMAGES_DIR")) else None)
