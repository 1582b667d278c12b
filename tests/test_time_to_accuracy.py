"""``python -m labcnn bench --time-to-accuracy`` on the synthetic data: the report's arithmetic."""
import json

import pytest
import torch
from helpers import QUICK, quiet

from labcnn import time_to_accuracy as T
from labcnn.cli import main
from labcnn.config import RECIPES, make_config
from labcnn.model import LabCNN

pytestmark = pytest.mark.usefixtures("one_thread")


def forward_flops_by_layer() -> int:
    """2 FLOPs per multiply-add of every convolution and linear layer for one image."""
    model, shapes = LabCNN(), {}
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.__setitem__(m, o.shape)) for m in model.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    model.eval()(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    total = 0
    for m, shape in shapes.items():
        per_output = m.in_channels * m.kernel_size[0] * m.kernel_size[1] if isinstance(m, torch.nn.Conv2d) else m.in_features
        total += 2 * per_output * shape.numel()
    return total


def test_flops_are_forward_and_backward_of_every_layer():
    per_image = T.training_flops_per_image(make_config(batch_size=10), torch.device("cpu"))
    forward = forward_flops_by_layer()
    conv1_input_grad = 2 * 3 * 4 * 32 * 33 * 33  # the first layer's input needs no gradient
    assert per_image == 3 * forward - conv1_input_grad


def test_time_to_accuracy_reads_the_history(tree_data):
    _, train, test = tree_data
    config = make_config(**{**QUICK, "epochs": 3})
    result = T.time_to_accuracy(config, train, test, target=0.3, device="cpu", log=quiet)
    history = T.fit(config, train, test, device="cpu", log=quiet).history  # same seed, same run
    first = next(r for r in history if r["test_acc"] >= 0.3)
    assert result["epoch_reached"] == first["epoch"] and result["final_test_acc"] == history[-1]["test_acc"]
    assert result["img_s"] == pytest.approx(len(train[1]) * 3 / result["train_seconds"])
    assert result["gflop_s"] == pytest.approx(result["gflop_per_image"] * result["img_s"])
    unreachable = T.time_to_accuracy(config, train, test, target=1.01, device="cpu", log=quiet)
    assert unreachable["seconds_to_target"] is None and unreachable["epoch_reached"] is None


def test_command_needs_real_data(capsys):
    assert main(["bench", "--time-to-accuracy", "--device", "cpu"]) == 2
    assert "give --data-dir" in capsys.readouterr().err


def test_command_prints_the_json_line(tree_data, capsys, monkeypatch):
    root, _, _ = tree_data
    monkeypatch.setitem(RECIPES, "fast", {**RECIPES["fast"], "epochs": 1, "subset": 150, "val_size": 50})  # a tiny fast recipe
    assert main(["bench", "--time-to-accuracy", "--data-dir", str(root), "--device", "cpu", "--seed", "3"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(printed.strip().splitlines()[-1])
    assert (result["recipe"], result["seed"], result["epochs"], result["target"]) == ("fast", 3, 1, 0.6926)
    assert f"{result['gflop_s']:.2f} GFLOP/s" in printed and "MFLOP per training image" in printed
