"""A run's settings: TrainConfig, recipes, RANGES (the one range table), device, threads, AMP."""
import math
import operator
import os
import platform
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import psutil
import torch

from labcnn import ConfigError, DeviceError

TRUE, FALSE = ("1", "true", "yes", "on", "y"), ("0", "false", "no", "off", "n")
COMPARE = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"

class Range:
    """What a setting accepts: a ``kind`` within ``bounds`` (``(">=", 1)``, ...), or one of
    ``choices``; ``None`` only if ``optional``."""

    def __init__(self, kind: type, *bounds: tuple, choices=(), optional=False):
        self.kind, self.bounds, self.choices, self.optional = kind, bounds, choices, optional

    def expected(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.kind is bool:
            return f"a boolean ({'/'.join(TRUE)} or {'/'.join(FALSE)}, any case)"
        number = "an integer" if self.kind is int else "a finite number"
        return number + " and".join(f" {op} {bound}" for op, bound in self.bounds)

    def holds(self, value) -> bool:
        if value is None or self.choices:
            return self.optional if value is None else value in self.choices
        kinds = (int, float) if self.kind is float else self.kind
        if not isinstance(value, kinds) or isinstance(value, bool) != (self.kind is bool):
            return False
        finite = isinstance(value, int) or math.isfinite(value)
        return finite and all(COMPARE[op](value, bound) for op, bound in self.bounds)

    def parse(self, name: str, text: str):
        word, bools = text.strip(), {w: w in TRUE for w in TRUE + FALSE}
        try:
            value = bools[word.lower()] if self.kind is bool else self.kind(word)
        except (KeyError, ValueError):
            value = None
        if value is None or not self.holds(value):
            raise ConfigError(f"{name}={text!r}: expected {self.expected()}")
        return value

@dataclass(frozen=True)
class TrainConfig:
    """A training run's settings, by default the lab's. ``schedule``: constant, or OneCycleLR per
    batch peaking at ``lr`` (Smith and Topin, 2017); ``mean``, ``std``: fractions of 255 or None."""
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
        for name, low in (("mean", -math.inf), ("std", 0)):  # None: measured on the data
            value = getattr(self, name)
            try:
                value = None if value is None else tuple(map(float, value))
                good = value is None or (len(value) == 3 and all(low < v < math.inf for v in value))
            except (TypeError, ValueError):
                good = False
            bad += [f"{name}={value!r} (expected three finite numbers)"] * (not good)
            object.__setattr__(self, name, value)
        if bad:
            raise ConfigError(f"invalid TrainConfig {'; '.join(bad)}")

# Named recipes: overrides of the TrainConfig defaults (results/README.md has their runs).
RECIPES = {"lab": {}, "improved": dict(  # chosen on 5,000 held-out images, never the test set
    epochs=40, batch_size=128, optimizer="sgd", lr=0.1, weight_decay=5e-4, schedule="onecycle",
    label_smoothing=0.1, augment=True, mean=None, std=None, val_size=5000, amp="auto")}
# The improved recipe for a 2-epoch budget: no augmentation, batch 64 (results/README.md).
RECIPES["fast"] = {**RECIPES["improved"], "epochs": 2, "augment": False, "batch_size": 64}
COUNT, FRACTION, FLAG = Range(int, (">=", 1)), Range(float, (">=", 0), ("<", 1)), Range(bool)
RANGES = {
    "recipe": Range(str, choices=tuple(RECIPES)),
    "optimizer": Range(str, choices=("adam", "adamw", "sgd")),
    "schedule": Range(str, choices=("constant", "onecycle")),
    "amp": Range(str, choices=("off", "auto", "bf16", "fp16")),
    "epochs": COUNT, "batch_size": COUNT, "eval_batch_size": COUNT, "rounds": COUNT,
    "images_per_round": COUNT, "momentum": FRACTION, "label_smoothing": FRACTION,
    "lr": Range(float, (">", 0)), "weight_decay": Range(float, (">=", 0)),
    "val_size": Range(int, (">=", 0)), "subset": Range(int, (">=", 1), optional=True),
    "seed": Range(int, (">=", 0), ("<=", 2**64 - 1)),  # what torch.manual_seed accepts
    "augment": FLAG, "download": FLAG, "verify": FLAG,
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

def select_device(name=None) -> torch.device:
    """The device called ``name``, checked; ``None``/``"auto"``: CUDA, then Apple MPS, then CPU.
    Raises DeviceError: not a device name, or one this machine lacks (lists what it has)."""
    name = str(name) if isinstance(name, torch.device) else name
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name in (None, "", "auto"):
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {name!r}: expected {DEVICE_CHOICES}") from None
    count = torch.cuda.device_count() if cuda else 0
    usable = {"cpu": True, "mps": mps, "cuda": (device.index or 0) < count}.get(device.type)
    if usable is None:
        raise DeviceError(f"device {name!r} is not supported: expected {DEVICE_CHOICES}")
    if usable:
        return device
    why = ("not Apple silicon with macOS 12.3+" if device.type == "mps" else f"{count} CUDA GPU(s)"
           if torch.version.cuda is not None else "a CPU-only build of torch")
    have = ", ".join(["cpu", *(f"cuda:{i}" for i in range(count)), *["mps"] * mps])
    raise DeviceError(f"device {name!r} is not available here ({why}); available: {have}")

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
    """Set and return torch's CPU threads: ``threads``, else ``OMP_NUM_THREADS``'s, else one per
    physical core, within :func:`usable_cpus` (oversubscribed, a quota trains many times slower)."""
    if threads is not None or not os.environ.get("OMP_NUM_THREADS", "").strip():
        usable = usable_cpus()[0]
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

def cpu_info(key: str) -> str:  # the first `key` line of /proc/cpuinfo (Linux), else ""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(key)), "")

def cpu_flags() -> set[str]:
    return set(cpu_info("flags").split())

def cpu_name() -> str:
    return cpu_info("model name") or platform.machine()

def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (an avx512_bf16/amx_bf16 CPU, Ampere+ GPU)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and bool({"avx512_bf16", "amx_bf16"} & cpu_flags())

def bf16_absence(device: torch.device) -> str:
    if device.type == "cpu":
        return "this CPU has neither avx512_bf16 nor amx_bf16: bfloat16 would be emulated, slower"
    return f"{describe_device(device)} has no native bfloat16"

def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype of ``amp`` on ``device`` (``None``: float32). ``auto``: bfloat16 where
    native, else float16 on CUDA (a T4), else float32; ``bf16``, ``fp16`` force one."""
    if amp == "auto":
        amp = "bf16" if native_bf16(device) else "fp16" if device.type == "cuda" else "off"
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)

def checkout_root() -> Path | None:
    """The repository's root when labcnn is imported from a checkout, else ``None`` (Colab)."""
    root = Path(__file__).resolve().parents[1]
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
        from labcnn.data import load_cifar10  # torchvision only once data is read
        return load_cifar10(self.data_dir, train, self.download, self.verify, self.url)

    def show(self, fig, name: str, alt: str) -> None:
        from labcnn import plots  # matplotlib only where figures are drawn
        for folder in filter(None, (self.run_dir, self.images_dir)):
            plots.save(fig, folder / name)
        plots.show(fig, alt)

def notebook_settings(epochs=50, subset=None, data_dir="data", download=True, device="auto",
                      runs_dir="runs", env=os.environ) -> Settings:
    """The notebook's :class:`Settings`, each overridden by its ``LABCNN_*`` variable (empty:
    unset); relative paths start at the checkout's root. Raises ConfigError, DeviceError."""
    def var(name: str, default, key: str | None = None):
        text = env.get(f"LABCNN_{name}", "").strip()
        return RANGES[key].parse(f"LABCNN_{name}", text) if text and key else text or default

    def where(name: str, default) -> Path:  # an absolute path stays as it is
        return (checkout_root() or Path.cwd()) / Path(var(name, default)).expanduser()

    # In the notebook a warning is one plain line, not a red box quoting labcnn's source.
    warnings.showwarning = lambda message, *args, **kwargs: print(f"warning: {message}")
    epochs, subset = var("EPOCHS", epochs, "epochs"), var("SUBSET", subset, "subset")
    config, full = make_config(epochs=epochs, subset=subset), make_config()
    set_threads()
    return Settings(
        config=config, data_dir=where("DATA_DIR", data_dir),
        download=var("DOWNLOAD", download, "download"), url=var("CIFAR10_URL", None),
        verify=var("VERIFY", True, "verify"), device=select_device(var("DEVICE", device)),
        run_dir=where("RUNS_DIR", runs_dir) / (  # the full run: where train --out runs/lab writes
            "lab" if config == full else f"lab-{config.epochs}ep-{config.subset or 'all'}img"),
        images_dir=where("IMAGES_DIR", "Images") if config == full and (
            checkout_root() or env.get("LABCNN_IMAGES_DIR")) else None)
