"""labcnn.device: every device string checked before any data is loaded, mixed precision, progress bars."""
import sys
import types

import pytest
import torch

from labcnn import device as D
from labcnn.cli import main
from labcnn.errors import DeviceError

BAD = {
    "cdua": "unknown device 'cdua': expected auto, cpu, cuda, cuda:N or mps",
    "cuda": "device 'cuda' is not available here",
    "cuda:1": "device 'cuda:1' is not available",
    "mps": "device 'mps' is not available here (Apple silicon with macOS 12.3+ only)",
    "meta": "device 'meta' is not supported: expected auto, cpu, cuda, cuda:N or mps",
    "cuda:x": "unknown device 'cuda:x'",
}


def unavailable(name: str) -> bool:
    try:
        D.select_device(name)
    except DeviceError:
        return True
    return False


@pytest.mark.parametrize("name", BAD)
@pytest.mark.parametrize("command", ["train", "evaluate", "bench"])
def test_bad_device_is_one_line_before_any_data_or_folder(tmp_path, capsys, name, command):
    if not unavailable(name):
        pytest.skip(f"{name} exists on this machine")
    args = {
        "train": ["train", "--data-dir", str(tmp_path / "no-data"), "--out", str(tmp_path / "run")],
        "evaluate": ["evaluate", "--data-dir", str(tmp_path / "no-data"), "--checkpoint", str(tmp_path / "none.pt")],
        "bench": ["bench", "--data-dir", str(tmp_path / "no-data")],
    }[command]
    assert main([*args, "--device", name]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {BAD[name]}") and err.count("\n") == 1  # not the missing data or checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run folder


def test_second_gpu_is_refused_on_a_one_gpu_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert D.select_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(DeviceError, match=r"this machine has 1 CUDA GPU\(s\), cuda:0..cuda:0"):
        D.select_device("cuda:1")


def test_auto_picks_a_device_that_exists():
    assert D.select_device(None) == D.select_device("auto")
    assert D.select_device("cpu") == torch.device("cpu")
    assert D.select_device(torch.device("cpu")) == torch.device("cpu")


def fake_cuda(monkeypatch, native_bf16: bool):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    calls = []

    def is_bf16_supported(including_emulation=True):
        calls.append(including_emulation)
        return native_bf16 or including_emulation  # a T4: bf16 only by emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    return calls


@pytest.mark.parametrize("native, dtype, scaled", [(False, torch.float16, True), (True, torch.bfloat16, False)])
def test_amp_on_cuda_uses_native_bf16_else_fp16_with_a_gradient_scaler(monkeypatch, native, dtype, scaled):
    calls = fake_cuda(monkeypatch, native)
    cuda = torch.device("cuda")
    assert D.amp_dtype(cuda, "auto") == dtype and calls == [False]  # asked without emulation
    assert D.grad_scaler(cuda, D.amp_dtype(cuda, "auto")).is_enabled() == scaled
    assert D.amp_dtype(cuda, "fp16") == torch.float16 and D.amp_dtype(cuda, "bf16") == torch.bfloat16  # forced
    assert D.amp_dtype(cuda, "off") is None
    assert D.amp_dtype(cuda, "native") == (torch.bfloat16 if native else None)  # never float16


@pytest.mark.parametrize("flags, native", [("fpu avx2 avx512f avx512_bf16", True), ("fpu avx2 amx_bf16 amx_tile", True), ("fpu avx2 avx512f", False)])
def test_cpu_bf16_only_where_native(monkeypatch, flags, native):
    info = f"processor\t: 0\nflags\t\t: {flags}\n"
    assert D.cpu_has_native_bf16(info) is native
    monkeypatch.setattr(D, "cpu_has_native_bf16", lambda cpuinfo=None: native)
    assert D.amp_dtype(torch.device("cpu"), "auto") == (torch.bfloat16 if native else None)
    assert D.amp_dtype(torch.device("cpu"), "native") == (torch.bfloat16 if native else None)
    assert not D.grad_scaler(torch.device("cpu"), torch.bfloat16).is_enabled()


def test_progress_bars_in_any_kernel_and_terminal_never_in_ci(monkeypatch):
    monkeypatch.setenv("CI", "1")
    assert not D.show_progress()
    monkeypatch.delenv("CI")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: None))
    assert not D.show_progress()  # piped, no kernel
    shell = type("ColabShell", (), {"kernel": object()})()  # Colab's shell class is not Jupyter's
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))
    assert D.show_progress()
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: None))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert D.show_progress()  # a terminal
