"""Where a run computes: the device, the CPU threads it may use, and its precision."""

import os
import platform
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch
from torch import nn

from labcnn import DeviceError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


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
    if device.type == "mps":
        why = "not Apple silicon with macOS 12.3+"
    elif torch.version.cuda is None:
        why = "a CPU-only build of torch"
    else:
        why = f"{count} CUDA GPU(s)"
    have = ["cpu", *(f"cuda:{i}" for i in range(count))] + (["mps"] if mps else [])
    raise DeviceError(
        f"device {name!r} is not available here ({why}); available: {', '.join(have)}"
    )


def usable_cpus() -> tuple[int, int]:
    """``(CPUs this process may use, CPUs of the machine)``: the affinity mask (``taskset``,
    Docker ``--cpuset-cpus``, Slurm) and a cgroup CPU quota (``cpu.max``, v1 ``cfs_quota_us``)."""
    total = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else total
    for files in (("cpu.max",), ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us")):
        try:
            words = " ".join(
                Path("/sys/fs/cgroup", f).read_text(encoding="ascii") for f in files
            ).split()
            if words[0] not in ("max", "-1"):  # quota and period, in microseconds
                usable = min(usable, max(1, int(words[0]) // int(words[1])))
        except (OSError, ValueError, IndexError, ZeroDivisionError):
            continue
    return usable, total


def set_threads(threads: int | None = None) -> int:
    """Set and return torch's CPU threads: ``threads``, else ``OMP_NUM_THREADS``'s, else one per
    physical core within :func:`usable_cpus` (oversubscribed, a quota trains many times slower)."""
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
    return f"cpu ({threads} thread{'' if threads == 1 else 's'}{limit})"


def cpu_info(key: str) -> str:
    """The first ``key`` line of ``/proc/cpuinfo`` (Linux only), else ``""``."""
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(key)), "")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``avx2``, ``avx512_bf16``, ...); empty off Linux."""
    return set(cpu_info("flags").split())


def cpu_name() -> str:
    """The CPU's model name, else the machine type (``x86_64``)."""
    return cpu_info("model name") or platform.machine()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (an avx512_bf16/amx_bf16 CPU, Ampere+ GPU)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype of ``amp`` on ``device`` (``None``: float32). ``auto``: bfloat16 where
    native, else float16 on CUDA (a T4), else float32; ``bf16``, ``fp16`` force one."""
    if amp == "auto":
        amp = "bf16" if native_bf16(device) else "fp16" if device.type == "cuda" else "off"
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)


def precision_name(device: torch.device, dtype: torch.dtype | None) -> str:
    """``"float32"``, ``"mixed precision bfloat16"``; float32 on CUDA says whether convolutions
    and matrix products may use TF32 (Ampere and newer GPUs; about 10 bits of mantissa)."""
    if dtype is not None:
        return f"mixed precision {str(dtype).removeprefix('torch.')}"
    tf32 = torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32
    return "float32 (TF32 allowed)" if device.type == "cuda" and tf32 else "float32"


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 ``x`` rounded to the nearest TF32 value: 10 of float32's 23 mantissa bits."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)  # round, then drop 13 bits


@contextmanager
def tf32_emulated(model: nn.Module):
    """Within the block, ``model``'s convolutions and linear layers read inputs and weights
    rounded to TF32, as float32 runs on Ampere and newer GPUs do by default (CPUs have no TF32):
    a measure of what that difference can move (pytorch/pytorch#107514)."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    weights = [m.weight.data for m in layers]
    hooks = [m.register_forward_pre_hook(lambda _, args: (round_to_tf32(args[0]),)) for m in layers]
    try:
        for layer in layers:
            layer.weight.data = round_to_tf32(layer.weight.data)
        yield
    finally:
        for layer, weight in zip(layers, weights, strict=False):
            layer.weight.data = weight
        for hook in hooks:
            hook.remove()
