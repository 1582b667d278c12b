"""Where training runs: device choice and checks, CPU threads, mixed precision, progress bars.

Every command and the notebook pick their device through :func:`select_device`, which checks the
name before any data is loaded, so a typo or a missing GPU costs one line, not a traceback.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from labcnn.errors import DeviceError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"
AMP_CHOICES = ("off", "auto", "native", "bf16", "fp16")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def select_device(name: str | None = None) -> torch.device:
    """The device called ``name``, checked; ``None`` or ``"auto"``: CUDA, then Apple MPS, then CPU.

    Raises:
        DeviceError: ``name`` is not a device name (``"cdua"``), or names a device this machine
            lacks (``cuda`` without a GPU or with a CPU-only torch, ``cuda:1`` with one GPU,
            ``mps`` off Apple silicon). The message lists what is available.
    """
    if isinstance(name, torch.device):
        name = str(name)
    if name in (None, "", "auto"):
        return _best_device()
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {name!r}: expected {DEVICE_CHOICES}") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = "a CPU-only build of torch" if torch.version.cuda is None else "no CUDA GPU visible"
            raise DeviceError(f"device {name!r} is not available here ({build}); available: {available()}")
        if device.index is not None and device.index >= count:
            raise DeviceError(f"device {name!r} is not available: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"device 'mps' is not available here (Apple silicon with macOS 12.3+ only); available: {available()}")
        return device
    raise DeviceError(f"device {name!r} is not supported: expected {DEVICE_CHOICES}")


def _best_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def available() -> str:
    """The devices this machine has, e.g. ``"cpu, cuda:0"``."""
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        names.append("mps")
    return ", ".join(names)


def describe_device(device: torch.device) -> str:
    """A one-line description such as ``cpu (2 threads)`` or ``cuda (NVIDIA H200)``."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return f"cpu ({threads} thread{'s' if threads != 1 else ''})"
    return device.type


def use_physical_cores(threads: int | None = None) -> int:
    """Set torch's CPU threads to ``threads``, or else to the physical core count, and return it.

    Hyper-threads share a core's arithmetic units, so one thread per physical core is the usual
    optimum for dense CPU kernels. ``OMP_NUM_THREADS``, when set, wins over the core count.
    """
    import psutil

    if threads is None and not os.environ.get("OMP_NUM_THREADS"):
        threads = psutil.cpu_count(logical=False)
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU computes bfloat16 natively: the ``avx512_bf16`` or ``amx_bf16`` flag of
    ``/proc/cpuinfo`` (Linux; ``False`` elsewhere). Without it, bfloat16 is emulated and slower."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype for ``amp`` (one of :data:`AMP_CHOICES`) on ``device``, or ``None`` for fp32.

    ``"auto"``: on CUDA, bfloat16 where the GPU computes it natively
    (``torch.cuda.is_bf16_supported(including_emulation=False)``: Ampere and newer), else float16
    (Colab's T4); on a CPU with native bfloat16 (:func:`cpu_has_native_bf16`), bfloat16; elsewhere
    (other CPUs, MPS) fp32. ``"native"``: bfloat16 where ``"auto"`` picks it, else fp32 (never
    float16): the default of the improved recipes, whose accuracy in bfloat16 was measured (README,
    Results). ``"bf16"`` and ``"fp16"`` force that dtype on any device.
    """
    if amp == "off":
        return None
    if amp in AMP_DTYPES:
        return AMP_DTYPES[amp]
    if amp == "native":
        return torch.bfloat16 if native_bf16(device) else None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: what ``--amp auto`` picks (:func:`amp_dtype`)."""
    return amp_dtype(device, "auto") == torch.bfloat16


def bf16_absence(device: torch.device) -> str:
    """Why bfloat16 is not measured on ``device``, in one phrase."""
    if device.type == "cpu":
        return "this CPU has neither the avx512_bf16 nor the amx_bf16 flag, so bfloat16 would be emulated, slower than float32"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} has no native bfloat16 (before Ampere)"
    return f"bfloat16 autocast is not measured on {device.type}"


def grad_scaler(device: torch.device, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """``torch.amp.GradScaler``, enabled only for float16 (whose narrow range underflows small
    gradients; torch's AMP recipe). Disabled, its calls pass through unchanged."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def show_progress() -> bool:
    """Progress bars in any interactive front end (a terminal, or any Jupyter kernel: Jupyter,
    Colab, VS Code); never when ``CI`` is set or output goes to a pipe or file outside a kernel.
    ``TQDM_DISABLE=1`` also turns them off (tqdm's own switch)."""
    if os.environ.get("CI"):
        return False
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython else None
    return getattr(shell, "kernel", None) is not None or sys.stderr.isatty()
