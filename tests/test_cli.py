"""The command line: a whole run, and every option's checks (one line, exit status 2, nothing written)."""
import json

import pytest
from helpers import run_cli

from labcnn.cli import main
from labcnn.config import SEED_MAX, make_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_train_then_evaluate(tree_data, tmp_path, capsys):
    root, _, _ = tree_data
    out = tmp_path / "run"
    assert main(["train", "--data-dir", str(root), "--out", str(out), "--epochs", "1", "--subset", "100", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "data: 200 training and 50 test images" in printed
    assert "epoch 1/1  train loss" in printed and "test loss" in printed
    assert sorted(p.name for p in out.iterdir()) == [".lock", "accuracy.png", "checkpoint.pt", "history.json", "loss.png"]
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 1 and {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "seconds"} <= set(history[0])

    assert main(["train", "--data-dir", str(root), "--out", str(out), "--epochs", "1", "--subset", "100"]) == 0
    assert "run complete: 1 of 1 epochs restored" in capsys.readouterr().out

    assert main(["evaluate", "--data-dir", str(root), "--checkpoint", str(out / "checkpoint.pt")]) == 0
    printed = capsys.readouterr().out
    assert f"top-1 accuracy {100 * history[0]['test_acc']:.2f}%" in printed
    assert "confusion matrix" in printed and "airplane" in printed


def test_summary(capsys):
    assert main(["summary"]) == 0
    assert "Total params: 600,746" in capsys.readouterr().out


def test_help_works_for_each_command():
    for command in ([], ["train"], ["evaluate"], ["summary"], ["gifs"], ["bench"]):
        result = run_cli(*command, "--help")
        assert result.returncode == 0 and "usage: python -m labcnn" in result.stdout


def test_user_errors_are_one_line_not_a_traceback(tmp_path):
    for args, message in [
        (["train", "--data-dir", tmp_path, "--out", tmp_path / "run"], f"error: no CIFAR-10 data found in {tmp_path}"),
        (["evaluate", "--data-dir", tmp_path, "--checkpoint", tmp_path / "none.pt"], f"error: no checkpoint at {tmp_path}/none.pt"),
        (["train", "--out", "x", "--epochs", "0"], "error: python -m labcnn train: argument --epochs: expected an integer >= 1, got '0'"),
    ]:
        result = run_cli(*args)
        assert result.returncode == 2 and result.stderr.startswith(message) and result.stderr.count("\n") == 1, result.stderr


BAD_NUMBERS = {
    "--seed": ["18446744073709551616", "-1", "1.5"],
    "--lr": ["inf", "nan", "0", "-0.1", "x"],
    "--weight-decay": ["-1", "nan", "inf"],
    "--epochs": ["0", "1.5"],
    "--batch-size": ["0", "-3"],
    "--subset": ["0"],
    "--val-size": ["-1"],
}


@pytest.mark.parametrize("option, value", [(o, v) for o, values in BAD_NUMBERS.items() for v in values])
def test_out_of_range_numbers_are_refused_before_anything_is_written(tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as info:
        main(["train", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run"), option, value])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith(f"error: python -m labcnn train: argument {option}: expected ")
    assert err.count("\n") == 1 and f"got '{value}'" in err and not (tmp_path / "run").exists()


def test_largest_seed_is_accepted():
    assert make_config(seed=SEED_MAX).seed == 2**64 - 1


@pytest.mark.parametrize("option, value, message", [
    ("--subset", "100000", "subset size 100000 must be between 1 and 200"),
    ("--val-size", "200", "val_size 200 must be smaller than the 200 training images"),
])
def test_sizes_too_large_for_the_data_leave_no_run_folder(tree_data, tmp_path, capsys, option, value, message):
    root, _, _ = tree_data
    assert main(["train", "--data-dir", str(root), "--out", str(tmp_path / "run"), option, value, "--device", "cpu"]) == 2
    assert capsys.readouterr().err == f"error: {message}\n" and not (tmp_path / "run").exists()


def test_every_path_option_expands_the_home_folder(tree_data, tmp_path, monkeypatch, capsys):
    """``~`` in --data-dir, --out, --checkpoint, gifs --out and --notebook, bench --data-dir."""
    root, _, _ = tree_data
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    cwd.mkdir()
    home.mkdir()
    (home / "data").symlink_to(root, target_is_directory=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    assert main(["train", "--data-dir", "~/data", "--out", "~/runs/x", "--epochs", "1", "--subset", "50", "--device", "cpu"]) == 0
    assert (home / "runs" / "x" / "checkpoint.pt").is_file()
    assert main(["evaluate", "--data-dir", "~/data", "--checkpoint", "~/runs/x/checkpoint.pt", "--device", "cpu"]) == 0
    assert main(["gifs", "--out", "~/gifs", "--notebook", "~/missing.ipynb"]) == 0
    assert sorted(p.name for p in (home / "gifs").iterdir()) == ["convolution.gif", "maxpool.gif"]
    assert main(["bench", "--data-dir", "~/data", "--images-per-round", "100", "--rounds", "1", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert list(cwd.iterdir()) == []  # no folder literally named ~


class Captured(Exception):
    """Raised by a stand-in for fit, carrying the config the command line built."""


@pytest.mark.parametrize("argv, expected", [
    ([], dict(recipe="lab", amp="off", whiten=False)),
    (["--recipe", "improved"], dict(recipe="improved", amp="native", whiten=False)),
    (["--recipe", "improved", "--amp", "off", "--whiten", "--cutout", "8", "--ema", "0.99", "--label-smoothing", "0.2"],
     dict(amp="off", whiten=True, cutout=8, ema=0.99, label_smoothing=0.2)),
    (["--recipe", "fast", "--amp"], dict(recipe="fast", amp="auto")),
])
def test_train_options_reach_the_config(tree_data, tmp_path, monkeypatch, argv, expected):
    def fake_fit(config, *args, **kwargs):
        raise Captured(config)

    monkeypatch.setattr("labcnn.train.fit", fake_fit)
    root, _, _ = tree_data
    with pytest.raises(Captured) as caught:
        main(["train", "--data-dir", str(root), "--out", str(tmp_path / "run"), *argv])
    config = caught.value.args[0]
    assert {k: getattr(config, k) for k in expected} == expected
