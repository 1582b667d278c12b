"""labcnn.checkpoint: what a run folder holds, the one loader, and every bad file a user may hand it."""
import errno
import json
import os
import random
import re

import pytest
import torch
from helpers import QUICK, quiet

from labcnn.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, load_trained
from labcnn.cli import main
from labcnn.config import config_dict, make_config
from labcnn.errors import CheckpointError, WriteError
from labcnn.evaluate import evaluate
from labcnn.model import LabCNN
from labcnn.train import fit
from labcnn.transforms import LAB_NORMALIZATION, Normalization

pytestmark = pytest.mark.usefixtures("one_thread")


def checkpoint_state(**changes):
    state = {
        "format": CHECKPOINT_FORMAT, "model": LabCNN().state_dict(), "optimizer": {}, "scheduler": None, "epoch": 0,
        "history": [], "config": config_dict(make_config()), "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3},
    }
    return {k: v for k, v in {**state, **changes}.items() if v is not ...}


class Payload:
    def __reduce__(self):  # what a malicious file would do on an unsafe load
        return os.system, ("echo unsafe",)


BAD_FILES = {
    "truncated": r"is not a readable checkpoint: it is truncated or damaged",
    "garbage": r"is not a readable checkpoint: it is truncated or damaged",
    "python object": r"holds pickled Python objects \(such as a whole model saved with torch.save\(model\)\)",
    "whole model": r"holds pickled Python objects .*save model.state_dict\(\) instead",
    "other model": r"holds weights of another model, not LabCNN's \(missing \['conv1.0.weight'",
    "other keys": r"holds weights of another model, not LabCNN's \(unexpected \['weight', 'bias'\]\)",
    "other shapes": r"holds weights of another model, not LabCNN's \(shapes differ: \['fc3.weight \[5, 128\] \(LabCNN: \[10, 128\]\)'",
    "not a state dict": r"is not a labcnn checkpoint nor a state dict: found a list\. Accepted: a checkpoint.pt",
    "incomplete": r"lacks \['history'\]: expected a complete labcnn-checkpoint-1 checkpoint",
}


def write_bad(path, kind):
    if kind in ("truncated", "garbage"):
        torch.save(checkpoint_state(), path)
        blob = path.read_bytes()
        path.write_bytes(blob[: len(blob) // 2] if kind == "truncated" else random.Random(0).randbytes(2000))
        return
    other = LabCNN(num_classes=5).state_dict()
    torch.save({
        "python object": lambda: checkpoint_state(history=[Payload()]),
        "whole model": lambda: LabCNN(),
        "other model": lambda: checkpoint_state(model=torch.nn.Linear(2, 2).state_dict()),
        "other keys": lambda: {**LabCNN().state_dict(), **torch.nn.Linear(2, 2).state_dict()},
        "other shapes": lambda: other,
        "not a state dict": lambda: [1, 2, 3],
        "incomplete": lambda: checkpoint_state(history=...),
    }[kind](), path)


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_files_give_one_clear_line(tmp_path, capsys, kind):
    path = tmp_path / "checkpoint.pt"
    write_bad(path, kind)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))} {BAD_FILES[kind]}") as info:
        load_trained(path)
    assert "\n" not in str(info.value)
    assert main(["evaluate", "--data-dir", str(tmp_path), "--checkpoint", str(path)]) == 2
    assert capsys.readouterr().err == f"error: {info.value}\n"


@pytest.mark.parametrize("kind", ["truncated", "other model"])
def test_resume_from_a_bad_checkpoint_is_refused(tree_data, tmp_path, kind):
    _, train, test = tree_data
    config = make_config(**QUICK)
    if kind == "truncated":
        write_bad(tmp_path / "checkpoint.pt", kind)
    else:  # same settings, so only the weights differ
        torch.save(checkpoint_state(model=torch.nn.Linear(2, 2).state_dict(), config=config_dict(config)), tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=BAD_FILES[kind]):
        fit(config, train, test, run_dir=tmp_path, device="cpu", log=quiet)


@pytest.mark.parametrize("wrap", ["bare", "model_state_dict", "state_dict", "module.", "_orig_mod."])
def test_state_dict_of_the_original_lab_script_evaluates_with_the_labs_normalization(tree_data, tmp_path, capsys, wrap):
    """``torch.save(net.state_dict(), "model.pth")``, alone, wrapped, or with DataParallel's or
    torch.compile's key prefix; ``--mean``/``--std`` choose other statistics."""
    root, _, test = tree_data
    net = LabCNN().eval()
    weights = net.state_dict()
    if wrap.endswith("."):
        weights = {wrap + k: v for k, v in weights.items()}
    elif wrap != "bare":
        weights = {wrap: weights, "epoch": 3}
    torch.save(weights, tmp_path / "model.pth")
    trained = load_trained(tmp_path / "model.pth")
    assert trained.normalization == LAB_NORMALIZATION and "bare state dict: normalization is the lab's" in trained.note
    assert all(torch.equal(a, b) for a, b in zip(trained.model.state_dict().values(), net.state_dict().values()))
    assert main(["evaluate", "--data-dir", str(root), "--checkpoint", str(tmp_path / "model.pth")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"{tmp_path / 'model.pth'} is a bare state dict: normalization is the lab's (mean (0.4914, 0.4822, 0.4465)")
    assert f"top-1 accuracy {evaluate(trained, *test)['accuracy']:.2%}" in printed
    assert main(["evaluate", "--data-dir", str(root), "--checkpoint", str(tmp_path / "model.pth"), "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25"]) == 0
    assert capsys.readouterr().out.startswith("normalization: as given (mean (0.5000, 0.5000, 0.5000), std (0.2500, 0.2500, 0.2500))")


def test_improved_recipe_checkpoint_is_evaluated_with_its_own_normalization(tree_data, tmp_path, capsys):
    """The loader, the command line and ``fit`` agree with the run's history; the lab's
    normalization, the old silent default, would give other figures."""
    root, train, test = tree_data
    config = make_config("improved", epochs=2, batch_size=32, val_size=40)
    trained = fit(config, train, test, run_dir=tmp_path, device="cpu", log=quiet)
    loaded = load_trained(tmp_path / "checkpoint.pt")
    assert loaded.normalization == trained.normalization == Normalization.measure(train[0][torch.randperm(200, generator=torch.Generator().manual_seed(1))[40:]])
    assert loaded.normalization != LAB_NORMALIZATION and loaded.config == config and loaded.epoch == 2
    result = evaluate(loaded, *test)
    last = trained.history[-1]
    assert (result["accuracy"], result["loss"]) == pytest.approx((last["test_acc"], last["test_loss"]), rel=1e-6)
    assert main(["evaluate", "--data-dir", str(root), "--checkpoint", str(tmp_path / "checkpoint.pt")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("normalization: the checkpoint's (mean (") and f"top-1 accuracy {last['test_acc']:.2%}" in printed
    assert f"loss {last['test_loss']:.4f}" in printed
    lab = evaluate(load_trained(tmp_path / "checkpoint.pt", normalization=LAB_NORMALIZATION), *test)
    assert lab["loss"] != pytest.approx(last["test_loss"], rel=1e-3)


def test_checkpoint_is_plain_and_complete(tree_data, tmp_path):
    _, train, test = tree_data
    fit(make_config(**{**QUICK, "epochs": 1}), train, test, run_dir=tmp_path, device="cpu", log=quiet)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True, map_location="cpu")
    assert {"format", "model", "optimizer", "scheduler", "scaler", "epoch", "history", "config", "normalization"} <= set(state)
    assert state["epoch"] == 1 and state["config"]["epochs"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "accuracy.png", "checkpoint.pt", "history.json", "loss.png"]


def test_checkpoint_of_an_older_version_replays(tree_data, tmp_path):
    """A checkpoint written before a config field or the gradient scaler existed (``amp`` a flag,
    no ``scaler``) reads the missing values as their defaults, so an existing run replays."""
    _, train, test = tree_data
    config = make_config(**{**QUICK, "epochs": 1})
    fit(config, train, test, run_dir=tmp_path, device="cpu", log=quiet)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    del state["scaler"], state["config"]["compile"]
    state["config"]["amp"] = False
    torch.save(state, tmp_path / "checkpoint.pt")
    lines = []
    replayed = fit(config, train, test, run_dir=tmp_path, device="cpu", log=lines.append)
    assert "run complete: 1 of 1 epochs restored" in lines[-1] and replayed.history == state["history"]


def test_gpu_checkpoint_loads_on_a_cpu_only_machine(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    with monkeypatch.context() as m:  # write it as a CUDA machine would: every storage tagged cuda:0
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(checkpoint_state(), path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert all(t.device.type == "cpu" for t in load_checkpoint(path)["model"].values())
    trained = load_trained(path)
    assert next(trained.model.parameters()).device.type == "cpu" and trained.config.epochs == 50
    assert trained.normalization == Normalization((0.5,) * 3, (0.25,) * 3)


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), RuntimeError("No space left on device\nmore")])
def test_full_disk_keeps_the_previous_checkpoint(tree_data, tmp_path, monkeypatch, error):
    """``torch.save`` reports a full disk as OSError or, from its zip writer, as RuntimeError."""
    _, train, test = tree_data
    real_save, disk = torch.save, {"full": False}

    def save(obj, f, *args, **kwargs):
        if not disk["full"]:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"the first bytes of a checkpoint")
        raise error

    def log(line):
        disk["full"] |= line.startswith("epoch 1/")

    monkeypatch.setattr(torch, "save", save)
    config = make_config(**{**QUICK, "epochs": 3})
    with pytest.raises(WriteError, match=r"cannot write .*checkpoint.pt \(No space left on device\): the previous checkpoint.pt \(epoch 1\) is kept"):
        fit(config, train, test, run_dir=tmp_path, device="cpu", log=log)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "accuracy.png", "checkpoint.pt", "history.json", "loss.png"]
    disk["full"] = False
    lines = []
    assert len(fit(config, train, test, run_dir=tmp_path, device="cpu", log=lines.append).history) == 3
    assert "resuming: 1 of 3 epochs restored" in " ".join(lines)


def test_unusable_run_folder_fails_before_training(tree_data, tmp_path):
    _, train, test = tree_data
    (tmp_path / "run").write_text("a file, not a folder")
    lines = []
    with pytest.raises(WriteError, match=re.escape(f"cannot write {tmp_path / 'run'} (File exists)")):
        fit(make_config(**QUICK), train, test, run_dir=tmp_path / "run", device="cpu", log=lines.append)
    assert lines == []  # not after an epoch of training


def test_history_json_is_rewritten_on_resume(tree_data, tmp_path):
    _, train, test = tree_data
    config = make_config(**{**QUICK, "epochs": 1})
    fit(config, train, test, run_dir=tmp_path, device="cpu", log=quiet)
    (tmp_path / "history.json").write_text("[]\n")  # as a kill between the checkpoint and history.json leaves it
    fit(config, train, test, run_dir=tmp_path, device="cpu", log=quiet)
    assert json.loads((tmp_path / "history.json").read_text()) == load_checkpoint(tmp_path / "checkpoint.pt")["history"]
