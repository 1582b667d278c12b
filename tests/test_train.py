import pytest
import torch

from labcnn.errors import CheckpointError, ConfigError
from labcnn.model import LabCNN
from labcnn.train import TIME_FIELDS, augment, evaluate, fit, load_checkpoint, make_config

QUICK = dict(epochs=2, batch_size=32, lr=0.001)


def without_times(history):
    return [{k: v for k, v in r.items() if k not in TIME_FIELDS} for r in history]


def test_loss_falls_and_accuracy_beats_chance(tree_data):
    _, train, test = tree_data
    _, history = fit(make_config(**{**QUICK, "epochs": 3}), train, test, device="cpu", log=lambda s: None)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["test_acc"] > 0.5  # chance is 0.1
    assert set(history[0]) >= {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds"}


def test_evaluate_does_not_depend_on_batch_size_and_keeps_state(tree_data):
    _, train, _ = tree_data
    model = LabCNN().train()
    model(torch.randn(8, 3, 32, 32))  # move the BatchNorm running statistics away from their init
    before = {k: v.clone() for k, v in model.state_dict().items()}
    full = evaluate(model, *train, batch_size=len(train[1]))
    for batch_size in (1, 7):  # 7 leaves a partial last batch
        part = evaluate(model, *train, batch_size=batch_size)
        assert part["loss"] == pytest.approx(full["loss"], rel=1e-5)
        assert part["accuracy"] == full["accuracy"]
        assert torch.equal(part["confusion"], full["confusion"])
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    again = evaluate(model, *train, batch_size=len(train[1]))
    assert again["loss"] == full["loss"] and torch.equal(again["predictions"], full["predictions"])
    assert full["confusion"].sum() == len(train[1])
    assert full["accuracy"] == pytest.approx(full["confusion"].diag().sum().item() / len(train[1]))


def test_same_seed_same_history(tree_data):
    _, train, test = tree_data
    runs = [fit(make_config(**QUICK), train, test, device="cpu", log=lambda s: None)[1] for _ in range(2)]
    assert without_times(runs[0]) == without_times(runs[1])


def test_resumed_run_ends_like_an_uninterrupted_one(tree_data, tmp_path):
    _, train, test = tree_data
    config = make_config(**{**QUICK, "epochs": 3})
    _, reference = fit(config, train, test, run_dir=tmp_path / "a", device="cpu", log=lambda s: None)

    def stop_at_epoch_2(line):
        if line.startswith("epoch 2/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(config, train, test, run_dir=tmp_path / "b", device="cpu", log=stop_at_epoch_2)
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["epoch"] == 1
    lines = []
    _, resumed = fit(config, train, test, run_dir=tmp_path / "b", device="cpu", log=lines.append)
    assert without_times(resumed) == without_times(reference)
    assert "resuming: 1 of 3 epochs restored" in " ".join(lines)


def test_checkpoint_is_plain_and_complete(tree_data, tmp_path):
    _, train, test = tree_data
    fit(make_config(**{**QUICK, "epochs": 1}), train, test, run_dir=tmp_path, device="cpu", log=lambda s: None)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True, map_location="cpu")
    assert {"model", "optimizer", "epoch", "history", "config"} <= set(state)
    assert state["epoch"] == 1 and state["config"]["epochs"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "history.json"]


def test_resume_with_other_settings_is_refused(tree_data, tmp_path):
    _, train, test = tree_data
    fit(make_config(**{**QUICK, "epochs": 1}), train, test, run_dir=tmp_path, device="cpu", log=lambda s: None)
    with pytest.raises(CheckpointError, match=r"lr=0.001 \(now 0.002\)"):
        fit(make_config(**{**QUICK, "epochs": 1, "lr": 0.002}), train, test, run_dir=tmp_path, device="cpu", log=print)


def test_lab_recipe_defaults():
    config = make_config()
    assert (config.epochs, config.batch_size, config.optimizer, config.lr, config.weight_decay, config.seed) == (
        50, 100, "adam", 0.01, 0.001, 0)
    assert config.mean == (0.4914, 0.4822, 0.4465) and config.std == (0.2023, 0.1994, 0.2010)
    with pytest.raises(ConfigError, match="unknown recipe"):
        make_config("fast")
    with pytest.raises(ConfigError, match="batch_size=0"):
        make_config(batch_size=0)


def test_augment_crops_and_flips_like_torchvision():
    images = torch.arange(2 * 3 * 32 * 32).reshape(2, 3, 32, 32).to(torch.uint8)
    out = augment(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for i in range(2):  # each output is some 32x32 window of the padded image, maybe mirrored
        windows = [padded[i, :, r : r + 32, c : c + 32] for r in range(9) for c in range(9)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)
