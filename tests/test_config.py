"""labcnn.config: the one range table, recipes, LABCNN_* variables, device choice, CPU threads
under quotas, CPU flags and mixed precision."""

import math
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from helpers import ENV

from benchmarks import bench
from labcnn import ConfigError, DeviceError
from labcnn import device as D
from labcnn import notebook as N
from labcnn import settings as S
from labcnn.settings import RANGES, RECIPES, make_config

pytestmark = pytest.mark.usefixtures("one_thread")


def fake_files(monkeypatch, files: dict) -> None:
    """``Path.read_text`` answers the paths in ``files`` with their text (``None``: no such
    file); every other path reads as usual. Simulates /proc and /sys on any machine."""
    real = Path.read_text

    def read_text(self, *args, **kwargs):
        if str(self) in files:
            if files[str(self)] is None:
                raise FileNotFoundError(2, "No such file or directory", str(self))
            return files[str(self)]
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)


# --- the range table -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key, text, value",
    [
        ("epochs", " 3 ", 3),
        ("seed", str(2**64 - 1), 2**64 - 1),
        ("seed", "0", 0),
        ("lr", "1e-3", 0.001),
        ("momentum", "0", 0.0),
        ("label_smoothing", "0.999", 0.999),
        ("amp", "fp16", "fp16"),
        ("download", "OFF", False),
        ("verify", "Yes", True),
    ],
)
def test_range_table_reads_what_it_accepts(key, text, value):
    assert RANGES[key].parse("--x", text) == value


@pytest.mark.parametrize(
    "key, text",
    [
        ("epochs", "0"),
        ("epochs", "1.5"),
        ("epochs", "abc"),
        ("seed", str(2**64)),
        ("seed", "-1"),
        ("lr", "0"),
        ("lr", "nan"),
        ("lr", "inf"),
        ("weight_decay", "-1"),
        ("momentum", "1"),
        ("label_smoothing", "1"),
        ("amp", "native"),
        ("download", "maybe"),
        ("subset", "0"),
    ],
)
def test_range_table_refuses_naming_the_setting_and_what_it_expects(key, text):
    with pytest.raises(ConfigError) as info:
        RANGES[key].parse("NAME", text)
    assert str(info.value) == f"NAME={text!r}: expected {RANGES[key].expected()}"


def test_expected_values_read_as_bounds():
    assert RANGES["epochs"].expected() == "an integer >= 1"
    assert RANGES["lr"].expected() == "a finite number > 0"
    assert RANGES["momentum"].expected() == "a finite number >= 0 and < 1"
    assert RANGES["seed"].expected() == f"an integer >= 0 and <= {2**64 - 1}"
    assert RANGES["amp"].expected() == "one of off, auto, bf16, fp16"
    assert "0/false/no/off/n" in RANGES["download"].expected()


def test_config_checks_every_field_through_the_range_table():
    for field in ("epochs", "batch_size", "lr", "seed", "subset", "amp"):
        bad = {
            "epochs": 0,
            "batch_size": True,
            "lr": math.nan,
            "seed": 2**64,
            "subset": 0,
            "amp": "native",
        }[field]
        with pytest.raises(
            ConfigError,
            match=rf"{field}={bad!r} \(expected "
            rf"{RANGES[field].expected()}\)",
        ):
            make_config(**{field: bad})
    assert make_config(seed=2**64 - 1).seed == 2**64 - 1  # the largest seed torch accepts
    for name, value in (("mean", (0.5, 0.5)), ("std", (0.2, 0.0, 0.2)), ("std", "abc")):
        with pytest.raises(ConfigError, match=f"{name}=.*expected three finite numbers"):
            make_config(**{name: value})


def test_recipes():
    lab = make_config()
    assert (lab.epochs, lab.batch_size, lab.optimizer, lab.lr, lab.weight_decay, lab.seed) == (
        50,
        100,
        "adam",
        0.01,
        0.001,
        0,
    )
    assert lab.mean == (0.4914, 0.4822, 0.4465) and lab.std == (0.2023, 0.1994, 0.2010)
    assert lab.amp == "off"  # the graded run reproduces exactly
    assert set(RECIPES) == {"lab", "improved", "fast"}
    assert {make_config(name).amp for name in RECIPES if name != "lab"} == {"auto"}
    assert make_config("fast").epochs == 2 and not make_config("fast").augment
    with pytest.raises(ConfigError, match="unknown recipe 'long': expected one of lab, improved"):
        make_config("long")
    with pytest.raises(ConfigError, match="unknown TrainConfig fields"):
        make_config(cutout=8)
    assert make_config(epochs=None).epochs == 50  # an option not given keeps the recipe's


def test_saved_configs_of_earlier_versions_read_or_are_refused_in_one_line():
    config = make_config("improved", epochs=3)
    assert S.config_from_dict(asdict(config)) == config
    saved = {**asdict(make_config()), "amp": True, "cutout": 0, "ema": 0.0, "whiten": False}
    assert S.config_from_dict(saved).amp == "auto"  # a flag in the first checkpoints
    assert S.config_from_dict({**saved, "amp": "native"}).amp == "auto"
    with pytest.raises(ConfigError, match="uses cutout, which this labcnn no longer has"):
        S.config_from_dict({**saved, "cutout": 8})
    with pytest.raises(ConfigError, match=r"\(warmup\): it comes from a newer labcnn; update"):
        S.config_from_dict({**saved, "warmup": 5})


# --- the notebook's LABCNN_* variables -------------------------------------------------------
@pytest.fixture
def settings(monkeypatch):
    """``notebook_settings(env=...)`` without changing this process's threads."""
    monkeypatch.setattr(N, "set_threads", lambda threads=None: torch.get_num_threads())
    return lambda env, **kwargs: N.notebook_settings(env=env, **kwargs)


def test_empty_variables_mean_unset(settings):
    names = (
        "EPOCHS",
        "SUBSET",
        "DATA_DIR",
        "DOWNLOAD",
        "DEVICE",
        "RUNS_DIR",
        "CIFAR10_URL",
        "VERIFY",
    )
    empty = settings({f"LABCNN_{name}": " " * (i % 2) for i, name in enumerate(names)})
    assert empty == settings({})
    assert (empty.config, empty.download, empty.verify) == (make_config(), True, True)
    assert empty.url is None
    assert empty.data_dir.name == "data" and empty.data_dir.is_absolute()
    assert empty.run_dir.parts[-2:] == ("runs", "lab") and empty.device == D.select_device("auto")


def test_variables_override_the_notebook(settings, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    s = settings(
        {
            "LABCNN_EPOCHS": "1",
            "LABCNN_SUBSET": "300",
            "LABCNN_DATA_DIR": "~/d",
            "LABCNN_RUNS_DIR": str(tmp_path / "r"),
            "LABCNN_DEVICE": "cpu",
            "LABCNN_CIFAR10_URL": "http://127.0.0.1:1/c.tar.gz",
        },
        epochs=5,
    )
    assert (s.config.epochs, s.config.subset, s.device) == (1, 300, torch.device("cpu"))
    assert s.data_dir == tmp_path / "d" and s.run_dir == tmp_path / "r" / "lab-1ep-300img"
    assert s.url == "http://127.0.0.1:1/c.tar.gz" and s.images_dir is None
    assert settings({}, epochs=2, subset=100).config.epochs == 2  # the notebook's own values


@pytest.mark.parametrize("name", ["LABCNN_DOWNLOAD", "LABCNN_VERIFY"])
@pytest.mark.parametrize(
    "text, value",
    [
        *((t, False) for t in ("0", "false", "no", "off", "n", "OFF", "N", "False", " No ")),
        *((t, True) for t in ("1", "true", "yes", "on", "y", "ON", "Y", "TRUE", "Yes")),
    ],
)
def test_booleans_in_any_case(settings, name, text, value):
    s = settings({name: text}, download=not value)
    assert (s.download if name == "LABCNN_DOWNLOAD" else s.verify) is value


@pytest.mark.parametrize(
    "name, key, text",
    [
        *(
            (n, k, t)
            for n, k in (("LABCNN_EPOCHS", "epochs"), ("LABCNN_SUBSET", "subset"))
            for t in ("abc", "2.5", "5k", "0", "-3", "1e3")
        ),
        *(
            (n, k, t)
            for n, k in (("LABCNN_DOWNLOAD", "download"), ("LABCNN_VERIFY", "verify"))
            for t in ("abc", "2", "maybe", "nein")
        ),
    ],
)
def test_bad_values_name_the_variable_and_what_it_accepts(settings, name, key, text):
    with pytest.raises(ConfigError) as info:
        settings({name: text})
    assert str(info.value) == f"{name}={text!r}: expected {RANGES[key].expected()}"


def test_command_line_and_variables_share_one_range_table(settings, capsys, tmp_path):
    from labcnn.cli import main

    with pytest.raises(ConfigError) as env:
        settings({"LABCNN_EPOCHS": "0"})
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path / "run"), "--epochs", "0"])
    expected = RANGES["epochs"].expected()
    assert f"argument --epochs: expected {expected}" in capsys.readouterr().err
    assert str(env.value).endswith(f": expected {expected}")
    with pytest.raises(ConfigError, match=f"epochs=0 \\(expected {expected}\\)"):
        make_config(epochs=0)


def test_bad_device_variable(settings):
    with pytest.raises(DeviceError, match="unknown device 'cdua'"):
        settings({"LABCNN_DEVICE": "cdua"})


# --- the device ------------------------------------------------------------------------------
BAD = {
    "cdua": "unknown device 'cdua': expected auto, cpu, cuda, cuda:N or mps",
    "cuda:x": "unknown device 'cuda:x': expected auto, cpu, cuda, cuda:N or mps",
    "meta": "device 'meta' is not supported: expected auto, cpu, cuda, cuda:N or mps",
    "mps": "device 'mps' is not available here (not Apple silicon with macOS 12.3+)",
}


@pytest.mark.parametrize("name", BAD)
def test_bad_device_names(name):
    if name == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    with pytest.raises(DeviceError) as info:
        D.select_device(name)
    assert str(info.value).startswith(BAD[name])


def test_second_gpu_is_refused_on_a_one_gpu_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert D.select_device("cuda:0") == torch.device("cuda:0")
    assert D.select_device("cuda") == torch.device("cuda")
    with pytest.raises(
        DeviceError,
        match=r"'cuda:1' is not available here \(1 CUDA GPU\(s\)\); "
        r"available: cpu, cuda:0$",
    ):
        D.select_device("cuda:1")


def test_cuda_on_a_cpu_only_build_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(
        DeviceError,
        match=r"'cuda' is not available here \(a CPU-only build of "
        r"torch\); available: cpu",
    ):
        D.select_device("cuda")


def test_auto_picks_a_device_that_exists(monkeypatch):
    assert D.select_device(None) == D.select_device("auto") == D.select_device("")
    assert D.select_device("cpu") == D.select_device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert D.select_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert D.select_device(None) == torch.device("cuda")


def fake_cuda(monkeypatch, native: bool) -> list:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    calls = []

    def is_bf16_supported(including_emulation=True):
        calls.append(including_emulation)
        return native or including_emulation  # a T4: bfloat16 only by emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    return calls


@pytest.mark.parametrize("native, dtype", [(False, torch.float16), (True, torch.bfloat16)])
def test_amp_on_cuda_uses_native_bf16_else_fp16(monkeypatch, native, dtype):
    calls = fake_cuda(monkeypatch, native)
    cuda = torch.device("cuda")
    assert D.amp_dtype(cuda, "auto") == dtype and set(calls) == {False}  # never emulation
    assert D.amp_dtype(cuda, "fp16") == torch.float16  # forced
    assert D.amp_dtype(cuda, "bf16") == torch.bfloat16
    assert D.amp_dtype(cuda, "off") is None
    assert D.describe_device(cuda) == "cuda (Tesla T4)"
    assert bench.bf16_absence(cuda) == "cuda (Tesla T4) has no native bfloat16"


@pytest.mark.parametrize(
    "flags, native",
    [
        ("fpu avx2 avx512f avx512_bf16", True),
        ("fpu avx2 amx_bf16 amx_tile", True),
        ("fpu avx2 avx512f", False),
    ],
)
def test_cpu_bf16_only_where_native(monkeypatch, flags, native):
    fake_files(
        monkeypatch,
        {
            "/proc/cpuinfo": f"processor\t: 0\nmodel name\t: Some CPU\n"
            f"flags\t\t: {flags}\n\nprocessor\t: 1\n"
        },
    )
    cpu = torch.device("cpu")
    assert D.cpu_flags() == set(flags.split()) and D.cpu_name() == "Some CPU"
    assert D.native_bf16(cpu) is native
    assert D.amp_dtype(cpu, "auto") == (torch.bfloat16 if native else None)
    assert D.amp_dtype(cpu, "bf16") == torch.bfloat16 and D.amp_dtype(cpu, "off") is None
    assert "neither avx512_bf16 nor amx_bf16" in bench.bf16_absence(cpu)


def test_no_cpuinfo_means_no_flags(monkeypatch):
    fake_files(monkeypatch, {"/proc/cpuinfo": None})
    assert D.cpu_flags() == set() and not D.native_bf16(torch.device("cpu")) and D.cpu_name()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")
def test_a_real_gpu():
    cuda = D.select_device("cuda")
    assert D.select_device("auto").type == "cuda"
    assert D.describe_device(cuda) == f"cuda ({torch.cuda.get_device_name(cuda)})"
    expected = torch.bfloat16 if torch.cuda.get_device_capability(cuda)[0] >= 8 else torch.float16
    assert D.amp_dtype(cuda, "auto") == expected
    with pytest.raises(DeviceError, match="available: cpu, cuda:0"):
        D.select_device(f"cuda:{torch.cuda.device_count()}")


# --- CPU threads within quotas ---------------------------------------------------------------
CGROUP = "/sys/fs/cgroup/"
V2, V1_QUOTA, V1_PERIOD = (
    CGROUP + "cpu.max",
    CGROUP + "cpu/cpu.cfs_quota_us",
    CGROUP + "cpu/cpu.cfs_period_us",
)


@pytest.mark.parametrize(
    "affinity, files, usable",
    [
        (4, {}, 4),
        (4, {V2: "max 100000\n"}, 4),
        (4, {V2: "200000 100000\n"}, 2),
        (4, {V2: "150000 100000\n"}, 1),  # 1.5 CPUs: one thread
        (4, {V2: "50000 100000\n"}, 1),  # half a CPU: still one thread
        (1, {V2: "400000 100000\n"}, 1),  # taskset -c 0 under a larger quota
        (4, {V1_QUOTA: "-1\n", V1_PERIOD: "100000\n"}, 4),
        (4, {V1_QUOTA: "300000\n", V1_PERIOD: "100000\n"}, 3),
        (4, {V2: "garbage"}, 4),
    ],
)
def test_usable_cpus_read_the_affinity_mask_and_the_cgroup_quota(
    monkeypatch, affinity, files, usable
):
    fake_files(monkeypatch, {V2: None, V1_QUOTA: None, V1_PERIOD: None, **files})
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert D.usable_cpus() == (usable, 4)


def test_threads_never_exceed_the_usable_cpus_and_omp_num_threads_wins(monkeypatch):
    import psutil

    cpu = torch.device("cpu")
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 2 if not logical else 4)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(D, "usable_cpus", lambda: (4, 4))
    assert D.set_threads() == torch.get_num_threads() == 2  # one per physical core
    assert D.describe_device(cpu) == "cpu (2 threads)"
    monkeypatch.setattr(D, "usable_cpus", lambda: (1, 4))  # taskset -c 0, or a 1-CPU quota
    assert D.set_threads() == torch.get_num_threads() == 1
    assert D.describe_device(cpu) == "cpu (1 thread; 1 of 4 CPUs usable)"
    torch.set_num_threads(3)  # what torch took from OMP_NUM_THREADS=3 at start
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert D.set_threads() == torch.get_num_threads() == 3
    assert D.describe_device(cpu) == "cpu (3 threads; 1 of 4 CPUs usable)"
    assert D.set_threads(2) == 2  # asked for explicitly


@pytest.mark.skipif(
    not shutil.which("taskset")
    or not hasattr(os, "sched_getaffinity")
    or len(os.sched_getaffinity(0)) < 2,
    reason="needs taskset and 2 CPUs",
)
def test_under_taskset_threads_stay_on_the_one_cpu():
    """The real condition: ``taskset -c N`` lets the process use one CPU of several."""
    script = (
        "import torch; from labcnn.device import describe_device, set_threads; "
        "print(set_threads(), torch.get_num_threads()); "
        "print(describe_device(torch.device('cpu')))"
    )
    env = {k: v for k, v in ENV.items() if k != "OMP_NUM_THREADS"}
    cpu = str(min(os.sched_getaffinity(0)))
    result = subprocess.run(
        ["taskset", "-c", cpu, sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "1 1",
        f"cpu (1 thread; 1 of {os.cpu_count()} CPUs usable)",
    ]
