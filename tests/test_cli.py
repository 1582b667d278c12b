"""The command line: a whole run, verify, every option's checks (one line, exit status 2, nothing
written) and the one error boundary. In-process through ``labcnn.cli.main``."""

import argparse
import contextlib
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.error
import warnings

import pytest
import torch
from helpers import ENV, LABCNN, QUICK, options, train_args

from labcnn import checkpoint as K
from labcnn import cli
from labcnn.cli import main
from labcnn.device import select_device
from labcnn.fileio import write_json
from labcnn.settings import RANGES

pytestmark = pytest.mark.usefixtures("one_thread")
QUICK_ARGS = [*options(**QUICK, subset=100), "--device", "cpu"]


@pytest.fixture(autouse=True)
def omp_threads(monkeypatch):
    """The command line keeps the one thread the tests train with."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def status(argv) -> int:
    """``main(argv)``'s exit status, whether returned or raised (argparse, verify)."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def run(tree_data, tmp_path_factory):
    """``(data folder, run folder, what train printed)``: a QUICK run, trained once."""
    root, _, _ = tree_data
    out = tmp_path_factory.mktemp("cli") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setenv("OMP_NUM_THREADS", "1")
        assert main(["train", "--data-dir", str(root), "--out", str(out), *QUICK_ARGS]) == 0
    torch.set_num_threads(threads)
    return root, out, printed.getvalue()


def test_train_then_evaluate(run, capsys):
    root, out, printed = run
    assert "data: 200 training and 50 test images" in printed
    assert "epoch 1/2  train loss" in printed and "epoch 2/2  train loss" in printed
    assert sorted(p.name for p in out.iterdir()) == [
        ".lock",
        "accuracy.png",
        "checkpoint.pt",
        "history.json",
        "loss.png",
    ]
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 2 and {
        "epoch",
        "train_loss",
        "train_acc",
        "test_loss",
        "test_acc",
        "seconds",
        "elapsed_train_seconds",
    } <= set(history[0])
    assert f"final test accuracy {history[-1]['test_acc']:.2%}" in printed

    assert main(["train", "--data-dir", str(root), "--out", str(out), *QUICK_ARGS]) == 0
    assert "run complete: 2 of 2 epochs restored" in capsys.readouterr().out

    assert status(["evaluate", "--data-dir", root, "--checkpoint", out / "checkpoint.pt"]) == 0
    printed = capsys.readouterr().out
    assert f"top-1 accuracy {history[-1]['test_acc']:.2%}" in printed
    assert "confusion matrix" in printed and "airplane" in printed


def subparsers() -> dict:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_help_for_each_command_and_a_help_line_for_each_option(capsys):
    commands = subparsers()
    assert set(commands) == {"train", "evaluate", "verify", "filters", "gifs", "bench"}
    for command in ([], *([c] for c in commands)):
        assert status([*command, "--help"]) == 0
        assert capsys.readouterr().out.startswith(f"usage: python -m labcnn {' '.join(command)}")
    options = set()
    for name, parser in commands.items():
        for action in parser._actions:
            assert action.help, (name, action.dest)
            options |= {o for o in action.option_strings if o not in ("-h", "--help")}
    assert len(options) <= 24, sorted(options)  # the surface the small-labcnn issue allows


def test_user_errors_are_one_line_not_a_traceback(tmp_path, capsys):
    nb = tmp_path / "notes.ipynb"
    nb.write_text("not json")
    for args, message in [
        (
            ["train", "--data-dir", tmp_path, "--out", tmp_path / "run"],
            f"error: no CIFAR-10 data found in {tmp_path}",
        ),
        (
            ["evaluate", "--data-dir", tmp_path, "--checkpoint", tmp_path / "none.pt"],
            f"error: no checkpoint at {tmp_path}/none.pt",
        ),
        (
            ["evaluate", "--checkpoint", tmp_path / "none.pt", "--mean", "0.5", "0.5", "0.5"],
            "error: --mean and --std go together",
        ),
        (
            ["verify", tmp_path / "none", "--data-dir", tmp_path],
            f"error: no checkpoint at {tmp_path}/none",
        ),
        (["filters", tmp_path / "none.pt"], f"error: no checkpoint at {tmp_path}/none.pt"),
        (
            ["train", "--out", "x", "--epochs", "0"],
            "error: python -m labcnn train: argument --epochs: expected an integer >= 1, got '0'",
        ),
        (
            ["train", "--out", "x", "--epochs", "a: b"],
            "error: python -m labcnn train: argument --epochs: expected an integer >= 1, "
            "got 'a: b'",
        ),
        (
            ["train", "--out", "x", "--amp", "native"],
            "error: python -m labcnn train: argument --amp: invalid choice: 'native'",
        ),
        (["bench", "--rounds", "0"], "error: python -m labcnn bench: argument --rounds: expected"),
        (["train"], "error: python -m labcnn train: the following arguments are required: --out"),
        (["frobnicate"], "error: python -m labcnn: argument command: invalid choice"),
    ]:
        assert status(args) == 2
        err = capsys.readouterr().err
        assert err.startswith(message) and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.ipynb"]


BAD_DEVICES = {
    "cdua": "unknown device 'cdua': expected auto, cpu, cuda, cuda:N or mps",
    "cuda": "device 'cuda' is not available here",
    "cuda:1": "device 'cuda:1' is not available here",
    "mps": "device 'mps' is not available here (not Apple silicon with macOS 12.3+)",
    "meta": "device 'meta' is not supported: expected auto, cpu, cuda, cuda:N or mps",
    "cuda:x": "unknown device 'cuda:x'",
}


def exists(name: str) -> bool:
    try:
        select_device(name)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("name", BAD_DEVICES)
@pytest.mark.parametrize("command", ["train", "evaluate", "bench"])
def test_bad_device_is_one_line_before_any_data_or_folder(tmp_path, capsys, name, command):
    if exists(name):
        pytest.skip(f"{name} exists on this machine")
    args = {
        "train": ["train", "--data-dir", tmp_path / "no-data", "--out", tmp_path / "run"],
        "evaluate": [
            "evaluate",
            "--data-dir",
            tmp_path / "no-data",
            "--checkpoint",
            tmp_path / "no.pt",
        ],
        "bench": ["bench", "--data-dir", tmp_path / "no-data"],
    }[command]
    assert status([*args, "--device", name]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {BAD_DEVICES[name]}") and err.count("\n") == 1  # not the data's
    assert list(tmp_path.iterdir()) == []  # no run folder


BAD_NUMBERS = {
    "--seed": ["18446744073709551616", "-1", "1.5"],
    "--lr": ["inf", "nan", "0", "-0.1", "x"],
    "--weight-decay": ["-1", "nan", "inf"],
    "--label-smoothing": ["1", "-0.1"],
    "--epochs": ["0", "1.5", ""],
    "--batch-size": ["0", "-3"],
    "--subset": ["0"],
    "--val-size": ["-1"],
}


@pytest.mark.parametrize(
    "option, value", [(o, v) for o, values in BAD_NUMBERS.items() for v in values]
)
def test_out_of_range_numbers_are_refused_before_anything_is_written(
    tmp_path, capsys, option, value
):
    assert status(["train", "--data-dir", tmp_path, "--out", tmp_path / "run", option, value]) == 2
    expected = RANGES[option[2:].replace("-", "_")].expected()  # the one range table
    err = capsys.readouterr().err
    assert (
        err.startswith(
            f"error: python -m labcnn train: argument {option}: expected {expected}, got {value!r}"
        )
        and err.count("\n") == 1
    )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option", ["--rounds", "--images-per-round"])
def test_bench_sizes_are_refused_through_the_range_table(capsys, option):
    assert status(["bench", option, "0"]) == 2
    expected = RANGES[option[2:].replace("-", "_")].expected()
    assert f"argument {option}: expected {expected}, got '0'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--subset", "100000", "subset size 100000 must be between 1 and 200"),
        ("--val-size", "200", "val_size 200 must be smaller than the 200 training images"),
    ],
)
def test_sizes_too_large_for_the_data_leave_no_run_folder(
    tree_data, tmp_path, capsys, option, value, message
):
    root, _, _ = tree_data
    assert (
        main(
            [
                "train",
                "--data-dir",
                str(root),
                "--out",
                str(tmp_path / "run"),
                option,
                value,
                "--device",
                "cpu",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_every_path_option_expands_the_home_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    seen = set()
    for name, parser in subparsers().items():
        paths = [a for a in parser._actions if a.type is cli.path]
        argv = [name]
        for action in paths:
            argv += [*action.option_strings[:1], f"~/{action.dest}"]
        args = vars(cli.build_parser().parse_args(argv))
        for action in paths:
            value = args[action.dest]
            expected = tmp_path / action.dest
            assert value == ([expected] if action.nargs == "+" else expected)
            seen.add(f"{name} {action.dest}")
    assert seen == {
        "train data_dir",
        "train out",
        "evaluate data_dir",
        "evaluate checkpoint",
        "verify run",
        "verify data_dir",
        "verify notebook",
        "filters checkpoints",
        "filters json",
        "gifs out",
        "gifs notebook",
    }  # bench parses its own --data-dir: the next test runs it with ~/data


class Captured(Exception):
    """Raised by a stand-in, carrying what the command line passed it."""


def test_every_command_reads_and_writes_where_the_home_folder_is(
    run, tmp_path, monkeypatch, capsys
):
    """``~`` in --data-dir, --out, --checkpoint, RUN_DIR, filters, --json, gifs --out and
    --notebook, bench --data-dir: each reaches the files; no folder literally named ~."""
    root, out, _ = run
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    cwd.mkdir()
    home.mkdir()
    (home / "data").symlink_to(root, target_is_directory=True)
    shutil.copytree(out, home / "run")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    monkeypatch.setattr("labcnn.animations.gif_bytes", lambda name: b"GIF89a" + name.encode())
    assert (
        main(
            [
                "train",
                "--data-dir",
                "~/data",
                "--out",
                "~/runs/x",
                "--epochs",
                "1",
                "--subset",
                "50",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert (home / "runs" / "x" / "checkpoint.pt").is_file()
    assert main(["evaluate", "--data-dir", "~/data", "--checkpoint", "~/runs/x/checkpoint.pt"]) == 0
    assert main(["verify", "~/run", "--data-dir", "~/data"]) == 0
    assert main(["filters", "~/run/checkpoint.pt", "--json", "~/filters.json"]) == 0
    assert (home / "filters.json").is_file()
    assert main(["gifs", "--out", "~/gifs", "--notebook", "~/missing.ipynb"]) == 0
    assert sorted(p.name for p in (home / "gifs").iterdir()) == ["convolution.gif", "maxpool.gif"]

    def fake_run(images, labels, *args, **kwargs):
        raise Captured(len(labels))

    monkeypatch.setattr("benchmarks.bench.run", fake_run)
    with pytest.raises(Captured) as caught:
        main(["bench", "--data-dir", "~/data", "--device", "cpu"])
    assert caught.value.args == (200,)
    capsys.readouterr()
    assert list(cwd.iterdir()) == []  # no folder literally named ~


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], dict(recipe="lab", amp="off", epochs=50, batch_size=100)),
        (["--recipe", "improved"], dict(recipe="improved", amp="auto", label_smoothing=0.1)),
        (
            ["--recipe", "improved", "--amp", "off", "--label-smoothing", "0.2"],
            dict(amp="off", label_smoothing=0.2, optimizer="sgd"),
        ),
        (["--recipe", "fast", "--amp"], dict(recipe="fast", amp="auto")),
        (["--amp", "--epochs", "3"], dict(recipe="lab", amp="auto", epochs=3)),  # the flag alone
        (["--amp", "fp16"], dict(amp="fp16")),
        (
            [
                "--amp",
                "bf16",
                "--epochs",
                "3",
                "--batch-size",
                "7",
                "--lr",
                "0.5",
                "--weight-decay",
                "0",
                "--seed",
                str(2**64 - 1),
                "--subset",
                "10",
                "--val-size",
                "2",
            ],
            dict(
                amp="bf16",
                epochs=3,
                batch_size=7,
                lr=0.5,
                weight_decay=0.0,
                seed=2**64 - 1,
                subset=10,
                val_size=2,
            ),
        ),  # the largest seed torch accepts
    ],
)
def test_train_options_reach_the_config(tree_data, tmp_path, monkeypatch, argv, expected):
    def fake_fit(config, *args, **kwargs):
        raise Captured(config)

    monkeypatch.setattr("labcnn.harness.train", fake_fit)
    root, _, _ = tree_data
    with pytest.raises(Captured) as caught:
        main(["train", "--data-dir", str(root), "--out", str(tmp_path / "run"), *argv])
    config = caught.value.args[0]
    assert {k: getattr(config, k) for k in expected} == expected


# --- the one error boundary ------------------------------------------------------------------
@pytest.mark.parametrize(
    "error, line",
    [
        (
            PermissionError(13, "Permission denied", "/mnt/usb/data"),
            "error: /mnt/usb/data: Permission denied",
        ),
        (OSError(5, "Input/output error"), "error: Input/output error"),
        (
            urllib.error.URLError("timed out", "http://127.0.0.1:9/c.tar.gz"),
            "error: http://127.0.0.1:9/c.tar.gz: <urlopen error timed out>",
        ),
    ],
)
@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_any_os_error_is_one_error_line_naming_the_path(
    run, tmp_path, monkeypatch, capsys, error, line, command
):
    def load(*args, **kwargs):
        raise error

    monkeypatch.setattr("labcnn.cli.load_cifar10", load)
    _, out, _ = run
    args = {
        "train": ["--out", tmp_path / "run"],
        "evaluate": ["--checkpoint", out / "checkpoint.pt"],
    }
    assert status([command, "--data-dir", tmp_path, *args[command]]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"{line}\n" and "Traceback" not in captured.out + captured.err


def test_a_warning_is_one_warning_line(run, monkeypatch, capsys):
    from labcnn.data import load_cifar10

    def load(*args, **kwargs):
        warnings.warn("loading without checking MD5s (verify=False)", UserWarning, stacklevel=2)
        return load_cifar10(*args, **kwargs)

    monkeypatch.setattr("labcnn.cli.load_cifar10", load)
    root, out, _ = run
    assert status(["evaluate", "--data-dir", root, "--checkpoint", out / "checkpoint.pt"]) == 0
    assert capsys.readouterr().err == "warning: loading without checking MD5s (verify=False)\n"


def test_gifs_refuse_a_file_that_is_no_notebook_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("labcnn.animations.gif_bytes", lambda name: b"GIF89a")
    (tmp_path / "nb.ipynb").write_text("{}")
    assert status(["gifs", "--out", tmp_path / "gifs", "--notebook", tmp_path / "nb.ipynb"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path}/nb.ipynb is not a Jupyter notebook")
    assert err.count("\n") == 1 and (tmp_path / "gifs" / "maxpool.gif").is_file()


# --- verify ----------------------------------------------------------------------------------
def notebook(path, *lines: str):
    """A notebook whose one code cell printed ``lines``."""
    output = {"output_type": "stream", "name": "stdout", "text": [f"{line}\n" for line in lines]}
    cell = {"cell_type": "code", "source": [], "metadata": {}, "outputs": [output]}
    nb = {"cells": [cell], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb))
    return path


@pytest.fixture
def copied(run, tmp_path):
    """A copy of the run folder that a test may tamper with."""
    shutil.copytree(run[1], tmp_path / "run")
    return tmp_path / "run"


def test_verify_confirms_an_untouched_run(run, tmp_path, capsys):
    root, out, _ = run
    history = json.loads((out / "history.json").read_text())
    accuracy = f"{history[-1]['test_acc']:.2%}"
    assert main(["verify", str(out), "--data-dir", str(root)]) == 0
    printed = capsys.readouterr().out
    assert f"final test accuracy {accuracy}, recorded {accuracy} at epoch 2 (tolerance" in printed
    assert "evaluated on cpu (1 thread), float32; recorded on cpu (1 thread), float32" in printed
    assert f"final test loss {history[-1]['test_loss']:.4f}" in printed
    assert "weights sha256 " in printed and printed.rstrip().endswith("verified")
    good = notebook(tmp_path / "good.ipynb", "Done.", f"final test accuracy {accuracy}")
    assert main(["verify", str(out), "--data-dir", str(root), "--notebook", str(good)]) == 0
    bad = notebook(tmp_path / "bad.ipynb", "final test accuracy 12.34%")
    assert status(["verify", out, "--data-dir", root, "--notebook", bad]) == 1
    assert (
        f"MISMATCH: {bad} prints final test accuracy ['12.34%'], the run has {accuracy}"
        in capsys.readouterr().out
    )
    silent = notebook(tmp_path / "silent.ipynb", "nothing here")
    assert status(["verify", out, "--data-dir", root, "--notebook", silent]) == 1
    (tmp_path / "broken.ipynb").write_text("{")
    assert status(["verify", out, "--data-dir", root, "--notebook", tmp_path / "broken.ipynb"]) == 2


def test_verify_catches_a_history_edited_by_hand(run, copied, capsys):
    history = json.loads((copied / "history.json").read_text())
    history[-1]["test_acc"] = 0.99 if history[-1]["test_acc"] < 0.985 else 0.5
    write_json(copied / "history.json", history)
    assert status(["verify", copied, "--data-dir", run[0]]) == 1
    printed = capsys.readouterr().out
    assert f"MISMATCH: {copied}/history.json differs from the history saved in" in printed
    assert f"the history says {history[-1]['test_acc']:.2%}" in printed
    write_json(copied / "history.json", [])
    assert status(["verify", copied, "--data-dir", run[0]]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {copied}/history.json is not a run's history")


def test_verify_catches_changed_weights(run, copied, capsys):
    state = torch.load(copied / "checkpoint.pt", weights_only=True)
    state["model"]["fc3.bias"][0] += 20.0  # class 0 for almost every image
    torch.save(state, copied / "checkpoint.pt")
    assert status(["verify", copied, "--data-dir", run[0]]) == 1
    assert "MISMATCH: the test loss of the weights is" in capsys.readouterr().out


def test_an_exported_state_dict_verifies_with_its_history_beside_it(run, tmp_path, capsys):
    root, out, _ = run
    trained = K.load_trained(out / "checkpoint.pt")
    K.export(tmp_path / "lab.pt", trained)
    write_json(tmp_path / "lab.json", trained.history)
    assert main(["verify", str(tmp_path / "lab.pt"), "--data-dir", str(root)]) == 0
    assert capsys.readouterr().out.rstrip().endswith("verified")
    assert status(["evaluate", "--data-dir", root, "--checkpoint", tmp_path / "lab.pt"]) == 0
    assert f"top-1 accuracy {trained.history[-1]['test_acc']:.2%}" in capsys.readouterr().out
    edited = [*trained.history[:-1], {**trained.history[-1], "train_loss": 0.01}]
    write_json(tmp_path / "lab.json", edited)
    assert status(["verify", tmp_path / "lab.pt", "--data-dir", root]) == 1
    printed = capsys.readouterr().out
    assert (
        f"MISMATCH: {tmp_path}/lab.json differs from the history saved in {tmp_path}/lab.pt"
        in printed
    )


def test_a_run_recorded_on_a_gpu_verifies_on_a_cpu_within_the_tf32_tolerance(run, tmp_path, capsys):
    """Ampere GPUs convolve float32 in TF32 (pytorch/pytorch#107514): verify on a CPU allows
    twice what TF32's rounding moves, simulated here by rounding inputs and weights, says so
    and names both devices; a 0.5-point change or a perturbed tensor is still a mismatch."""
    from labcnn.data import load_cifar10
    from labcnn.device import tf32_emulated
    from labcnn.lab import evaluate

    root, out, _ = run
    trained = K.load_trained(out / "checkpoint.pt")
    images, labels = load_cifar10(root, train=False, verify=False)
    with tf32_emulated(trained.model):
        gpu = evaluate(trained, images, labels)
    device = "cuda (NVIDIA H100 80GB HBM3), float32 (TF32 allowed)"

    def export(history, model_edit=None):
        if model_edit:
            model_edit(trained.model)
        trained.history = history
        K.export(tmp_path / "lab.pt", trained)
        write_json(tmp_path / "lab.json", history)
        return status(["verify", tmp_path / "lab.pt", "--data-dir", root])

    last = {**trained.history[-1], "test_acc": gpu["accuracy"], "test_loss": gpu["loss"]}
    assert export([*trained.history[:-1], {**last, "device": device}]) == 0
    printed = capsys.readouterr().out
    assert f"recorded on {device}" in printed and "evaluated on cpu" in printed
    assert "tolerance" in printed and printed.rstrip().endswith("verified")
    moved = {**last, "device": device, "test_acc": gpu["accuracy"] - 0.005}
    assert export([*trained.history[:-1], moved]) == 1
    assert "MISMATCH: the test accuracy of the weights is" in capsys.readouterr().out

    def perturb(model):
        with torch.no_grad():
            model.fc3.bias[0] += 1.0

    assert export([*trained.history[:-1], {**last, "device": device}], perturb) == 1
    assert "MISMATCH: the test loss of the weights is" in capsys.readouterr().out


# --- processes that are not a terminal session (issue 26) ---------------------------------------


def train_command(root, out, epochs=2):
    """``python -m labcnn train`` on the QUICK settings, as a subprocess's argument list."""
    quick = options(batch_size=QUICK["batch_size"], lr=QUICK["lr"], subset=100)
    return [*LABCNN, *train_args(root, out, epochs, *quick)]


def test_training_without_a_stderr_into_a_reader_that_exits_goes_to_the_end(tree_data, tmp_path):
    """pythonw and ``2>&-`` start Python with sys.stderr None (tqdm/tqdm#1654); ``| head -n 1``
    closes the pipe after a line (pypa/pip#5907). The run trains every epoch, with no traceback;
    ``evaluate | head -n 1`` exits cleanly too."""
    root, _, _ = tree_data
    out = tmp_path / "run"
    command = " ".join(map(shlex.quote, train_command(root, out, epochs=3)))
    result = subprocess.run(
        f"set -o pipefail; {command} 2>&- | head -n 1",
        shell=True,
        executable="/bin/bash",
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.stdout.startswith("data: ") and result.stdout.count("\n") == 1
    assert result.returncode == 0 and result.stderr == ""  # nothing from a closed stderr
    assert len(json.loads((out / "history.json").read_text())) == 3
    evaluate = f"{sys.executable} -m labcnn evaluate --checkpoint {out}/checkpoint.pt "
    evaluate += f"--data-dir {root} | head -n 1"
    result = subprocess.run(evaluate, shell=True, env=ENV, capture_output=True, text=True)
    assert result.stderr == "" and result.stdout.count("\n") == 1


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_end_as_ctrl_c_does(tree_data, tmp_path, monkeypatch, capsys, name):
    """Slurm preemption, ``docker stop``, a closed terminal: a real signal, sent to this process
    once the first epoch is logged, ends ``train`` with its saved epochs kept, one line and the
    status 128 + N; the same command resumes."""
    root, _, _ = tree_data
    out = tmp_path / "run"
    argv = train_args(root, out, 30, *options(batch_size=QUICK["batch_size"], subset=100))

    def say(*lines):
        print(*lines, sep="\n")
        if lines[0].startswith("epoch 1/"):
            os.kill(os.getpid(), getattr(signal, name))  # handled before the next epoch starts

    monkeypatch.setattr(cli, "say", say)
    assert status(argv) == 128 + getattr(signal, name)
    resume = f"completed epochs are saved in {out}; run the same command to resume"
    assert capsys.readouterr().err.strip() == f"stopped by {name}: {resume}"
    assert len(json.loads((out / "history.json").read_text())) == 1
    assert not list(out.glob(".labcnn-*.tmp"))  # no half-written file left
    monkeypatch.setattr(cli, "say", lambda *lines: print(*lines, sep="\n"))
    monkeypatch.setattr("labcnn.harness.fit", no_training)
    with pytest.raises(Stop):  # the run is restored and logged, then fit is not entered
        status(argv)
    assert f"resuming: 1 of 30 epochs restored from {out}\n" in capsys.readouterr().out


class Stop(Exception):
    """Raised in place of training, once a run's saved epochs are restored."""


def no_training(*args, **hooks):
    """A ``fit`` that stops at once: :class:`Stop`."""
    raise Stop


def test_a_foreign_process_environment_trains_verifies_and_draws(run, tmp_path):
    """Two variables a process may inherit, in one real process. ``MPLBACKEND`` naming a module
    this Python lacks (Jupyter's inline backend: kohya-ss/sd-scripts#2521): one warning, then
    curves and GIFs are drawn. A locale whose encoding is not UTF-8 (GBK on Chinese Windows:
    jupyter/nbconvert#1868; here the C locale, ASCII, without Python's coercion to UTF-8):
    verify and gifs read and write a notebook holding non-ASCII text."""
    root, out, _ = run
    env = {**ENV, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    env["MPLBACKEND"] = "module://no_such_backend_module.backend"
    probe = [sys.executable, "-c", "import locale; print(locale.getpreferredencoding())"]
    encoding = subprocess.run(probe, env=env, capture_output=True, text=True).stdout.strip()
    assert encoding.lower().replace("-", "") != "utf8", "this Python reads the C locale as UTF-8"
    history = json.loads((out / "history.json").read_text(encoding="utf-8"))
    accuracy = f"{history[-1]['test_acc']:.2%}"
    good = notebook(tmp_path / "report.ipynb", "é 测试 ✓", f"final test accuracy {accuracy}")
    cells = json.loads(good.read_text(encoding="utf-8"))
    cells["cells"].append(
        {
            "cell_type": "code",
            "source": 'show_gif("maxpool")',
            "metadata": {},
            "outputs": [
                {"output_type": "display_data", "metadata": {}, "data": {"image/gif": "R0lG"}}
            ],
        }
    )
    good.write_text(json.dumps(cells, ensure_ascii=False), encoding="utf-8")  # raw UTF-8 bytes
    commands = [
        train_args(root, tmp_path / "run", 1, *options(batch_size=32, subset=100)),
        ["verify", out, "--data-dir", root, "--notebook", good],
        ["gifs", "--out", tmp_path / "gifs", "--notebook", good],
    ]
    commands = [[str(a) for a in command] for command in commands]
    script = f"import sys; from labcnn.cli import main; sys.exit(max(map(main, {commands!r})))"
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True)
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 0 and "Traceback" not in stderr, stderr[-2000:]
    assert stderr.count("warning: matplotlib backend") == 1  # checked before the first epoch
    assert (tmp_path / "run" / "loss.png").is_file()
    assert (tmp_path / "gifs" / "maxpool.gif").is_file()
    text = good.read_text(encoding="utf-8")
    assert "é 测试 ✓" in text and '"R0lG"' not in text  # refreshed; the text kept whole
