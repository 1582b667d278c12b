import json
import os
import subprocess
import sys

import pytest

from labcnn.cli import main

REPO_ENV = {**os.environ, "PYTHONPATH": os.getcwd()}


def test_train_then_evaluate(tree_data, tmp_path, capsys):
    root, _, _ = tree_data
    out = tmp_path / "run"
    assert main(["train", "--data-dir", str(root), "--out", str(out), "--epochs", "1", "--subset", "100", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "data: 200 training and 50 test images" in printed
    assert "epoch 1/1  train loss" in printed and "test loss" in printed
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.png", "checkpoint.pt", "history.json", "loss.png"]
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


@pytest.mark.parametrize("args, message", [
    (["train", "--data-dir", "{tmp}", "--out", "{tmp}/run"], "error: no CIFAR-10 data found in {tmp}"),
    (["evaluate", "--data-dir", "{tmp}", "--checkpoint", "{tmp}/none.pt"], "error: no checkpoint at {tmp}/none.pt"),
    (["train", "--out", "x", "--epochs", "0"], "argument --epochs: must be positive, got 0"),
])
def test_user_errors_are_one_line_not_a_traceback(tmp_path, args, message):
    args = [a.format(tmp=tmp_path) for a in args]
    result = subprocess.run([sys.executable, "-m", "labcnn", *args], capture_output=True, text=True, env=REPO_ENV)
    assert result.returncode == 2
    assert message.format(tmp=tmp_path) in result.stderr
    assert "Traceback" not in result.stderr


def test_help_works_for_each_command():
    for command in ([], ["train"], ["evaluate"], ["summary"], ["gifs"], ["bench"]):
        result = subprocess.run([sys.executable, "-m", "labcnn", *command, "--help"], capture_output=True, text=True, env=REPO_ENV)
        assert result.returncode == 0 and "usage: python -m labcnn" in result.stdout
