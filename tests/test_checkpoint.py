"""labcnn.checkpoint: what a run folder's checkpoint holds, resuming it (and refusing another run's,
another version's or other data's), the one loader and every bad file a user may hand it,
provenance hashes and exported weights."""

import errno
import json
import os
import random
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from helpers import QUICK, quiet, without_times

from labcnn import CheckpointError, WriteError
from labcnn import checkpoint as C
from labcnn.harness import train as fit
from labcnn.lab import evaluate
from labcnn.model import LAB_NORMALIZATION, LabCNN, Normalization, Trained
from labcnn.settings import make_config

pytestmark = pytest.mark.usefixtures("one_thread")
RUN_FILES = [".lock", "accuracy.png", "checkpoint.pt", "history.json", "loss.png"]
CONFIG = make_config(**QUICK)  # 2 epochs


def stop_after_epoch_1(line):
    if line.startswith("epoch 1/"):
        raise KeyboardInterrupt


@pytest.fixture(scope="module")
def run(tree_data, tmp_path_factory):
    """A run folder of ``CONFIG`` stopped after epoch 1 of 2; the uninterrupted run's history."""
    _, train, test = tree_data
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("run") / "run"
    with pytest.raises(KeyboardInterrupt):
        fit(CONFIG, train, test, run_dir=folder, device="cpu", log=stop_after_epoch_1)
    reference = fit(CONFIG, train, test, device="cpu", log=quiet)
    torch.set_num_threads(threads)
    return folder, reference


@pytest.fixture
def run_dir(run, tmp_path):
    """A copy of ``run``'s folder to change."""
    return Path(shutil.copytree(run[0], tmp_path / "run"))


def checkpoint_state(**changes):
    state = {
        "format": f"{C.FORMAT}-{C.VERSION}",
        "model": LabCNN().state_dict(),
        "optimizer": {},
        "scheduler": None,
        "epoch": 0,
        "history": [],
        "config": asdict(make_config()),
        "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3},
    }
    return {k: v for k, v in {**state, **changes}.items() if v is not ...}


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # what a malicious file would do on an unsafe load
        return Path.touch, (Path(self.marker),)


ACCEPTED = re.escape(C.ACCEPTED)
BAD_FILES = {
    "missing": r"no checkpoint at {path}",
    "truncated": r"{path} is not a readable checkpoint: it is truncated or damaged, .*",
    "not a zip": r"{path} is not a readable checkpoint: it is truncated or damaged, or was not "
    r"written by torch.save",
    "python object": r"{path} holds pickled Python objects \(such as a whole model saved with "
    r"torch.save\(model\)\), .*: save model.state_dict\(\) instead",
    "whole model": r"{path} holds pickled Python objects .*save model.state_dict\(\) instead",
    "other model": r"{path} holds weights of another model, not LabCNN's "
    r"\(missing \['conv1.0.weight', "
    r".*unexpected \['weight', 'bias'\]\); " + ACCEPTED,
    "other keys": r"{path} holds weights of another model, not LabCNN's \(unexpected \['weight', "
    r"'bias'\]\); " + ACCEPTED,
    "other shapes": r"{path} holds weights of another model, not LabCNN's \(shapes differ: "
    r"\['fc3.weight \[5, 128\] \(LabCNN: \[10, 128\]\)', 'fc3.bias \[5\] "
    r"\(LabCNN: \[10\]\)'\]\); " + ACCEPTED,
    "not a state dict": r"{path} is not a labcnn checkpoint nor a state dict: found a list; "
    + ACCEPTED,
    "incomplete": r"{path} lacks \['history'\]: expected a complete labcnn-checkpoint-2 checkpoint",
    # issue 19, case 7: never evaluated as a bare state dict with the lab's normalization
    "newer format": r"{path} comes from a newer labcnn \(format labcnn-checkpoint-99; .*\): "
    r"update labcnn.*",
    "unknown setting": r"{path} holds settings this labcnn does not know \(mixup\): it comes "
    r"from a "
    r"newer labcnn; update labcnn.*",
    "removed feature": r"{path} uses ema, which this labcnn no longer has.*",
}


def write_bad(path: Path, kind: str) -> None:
    if kind == "missing":
        return
    if kind in ("truncated", "not a zip"):
        torch.save(checkpoint_state(), path)
        blob = path.read_bytes()
        path.write_bytes(
            blob[: len(blob) // 2] if kind == "truncated" else random.Random(0).randbytes(2000)
        )
        return
    torch.save(
        {
            "python object": lambda: checkpoint_state(history=[Payload(path.parent / "ran")]),
            "whole model": lambda: LabCNN(),
            "other model": lambda: checkpoint_state(model=torch.nn.Linear(2, 2).state_dict()),
            "other keys": lambda: {**LabCNN().state_dict(), **torch.nn.Linear(2, 2).state_dict()},
            "other shapes": lambda: LabCNN(num_classes=5).state_dict(),
            "not a state dict": lambda: [1, 2, 3],
            "incomplete": lambda: checkpoint_state(history=...),
            "newer format": lambda: checkpoint_state(format="labcnn-checkpoint-99"),
            "unknown setting": lambda: checkpoint_state(
                config={**asdict(make_config()), "mixup": 0.2}
            ),
            "removed feature": lambda: checkpoint_state(
                config={**asdict(make_config()), "ema": 0.999}
            ),
        }[kind](),
        path,
    )


@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_files_give_one_clear_line(tmp_path, kind):
    path = tmp_path / "checkpoint.pt"
    write_bad(path, kind)
    with pytest.raises(CheckpointError) as info:
        C.load_trained(path)
    assert re.fullmatch(BAD_FILES[kind].format(path=re.escape(str(path))), str(info.value))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "ran").exists()  # no code in the file ran


@pytest.mark.parametrize("kind", ["truncated", "other model", "newer format", "unknown setting"])
def test_resume_from_a_bad_checkpoint_is_refused_and_overwrites_nothing(tree_data, tmp_path, kind):
    _, train, test = tree_data
    path = tmp_path / "checkpoint.pt"
    if kind == "other model":  # the run's settings, so only the weights differ
        torch.save(
            checkpoint_state(model=torch.nn.Linear(2, 2).state_dict(), config=asdict(CONFIG)),
            path,
        )
    else:
        write_bad(path, kind)
    blob = path.read_bytes()
    with pytest.raises(CheckpointError) as info:
        fit(CONFIG, train, test, run_dir=tmp_path, device="cpu", log=quiet)
    assert re.fullmatch(BAD_FILES[kind].format(path=re.escape(str(path))), str(info.value))
    # refused before the folder is locked: nothing written, not even the lock file
    assert path.read_bytes() == blob and sorted(p.name for p in tmp_path.iterdir()) == [
        "checkpoint.pt"
    ]


@pytest.mark.parametrize("change", ["settings", "train", "test", "train and test"])
def test_resume_with_other_settings_or_data_is_refused_and_overwrites_nothing(
    tree_data, run_dir, change
):
    """Issue 19, case 8: a run resumed on other images would mix two data sets in one history."""
    _, train, test = tree_data
    config, data = CONFIG, {"train": train, "test": test}
    if change == "settings":
        config = make_config(**{**QUICK, "lr": 0.002})
    if "train" in change:  # one pixel
        images = train[0].clone()
        images[7, 1, 2, 3] ^= 1
        data["train"] = (images, train[1])
    if "test" in change:  # one label
        labels = test[1].clone()
        labels[0] = (labels[0] + 1) % 10
        data["test"] = (test[0], labels)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    with pytest.raises(CheckpointError) as info:
        fit(config, data["train"], data["test"], run_dir=run_dir, device="cpu", log=quiet)
    message = str(info.value)
    assert message.startswith(f"{run_dir / 'checkpoint.pt'} ") and "\n" not in message
    if change == "settings":
        assert "other settings: lr=0.001 (now 0.002)." in message
    original = {"train": train, "test": test}
    for split in ("train", "test"):
        old, now = C.fingerprint(*original[split]), C.fingerprint(*data[split])
        assert (f"{split} images (fingerprint {old}, now {now})" in message) == (split in change)
    assert ("other data" in message) == (change != "settings")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before


def test_fingerprint_changes_with_one_pixel_or_one_label():
    images = torch.randint(
        0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    labels = torch.arange(5)
    first = C.fingerprint(images, labels)
    assert (
        re.fullmatch("[0-9a-f]{16}", first)
        and C.fingerprint(images.clone(), labels.clone()) == first
    )
    changed = images.clone()
    changed[4, 2, 31, 31] ^= 1
    assert C.fingerprint(changed, labels) != first
    assert C.fingerprint(images, labels.flip(0)) != first


# ---------------------------------------------------------------- what a run folder holds


def test_checkpoint_is_plain_and_complete(tree_data, run):
    _, train, test = tree_data
    folder, reference = run
    state = torch.load(folder / "checkpoint.pt", weights_only=True, map_location="cpu")
    assert set(state) == {
        "format",
        "model",
        "optimizer",
        "scheduler",
        "scaler",
        "epoch",
        "history",
        "config",
        "normalization",
        "data",
    }
    assert state["format"] == "labcnn-checkpoint-2" and state["epoch"] == len(state["history"]) == 1
    assert state["config"] == asdict(CONFIG) and state["config"]["epochs"] == 2
    assert state["normalization"] == asdict(LAB_NORMALIZATION)
    assert state["data"] == {"train": C.fingerprint(*train), "test": C.fingerprint(*test)}
    assert without_times(state["history"]) == without_times(reference.history[:1])
    assert json.loads((folder / "history.json").read_text()) == state["history"]
    assert sorted(p.name for p in folder.iterdir()) == RUN_FILES


def test_history_json_is_rewritten_on_resume(tree_data, run_dir):
    _, train, test = tree_data
    (run_dir / "history.json").write_text(
        "[]\n"
    )  # as a kill between the checkpoint and history.json leaves it

    def stop_when_restored(line):
        if line.startswith("resuming:"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(CONFIG, train, test, run_dir=run_dir, device="cpu", log=stop_when_restored)
    history = json.loads((run_dir / "history.json").read_text())
    assert len(history) == 1 and history == C.load_checkpoint(run_dir / "checkpoint.pt")["history"]


def test_checkpoint_of_the_previous_version_resumes(tree_data, run_dir, run):
    """A labcnn-checkpoint-1: no data fingerprints, no gradient scaler, the removed settings at
    their unused values, ``amp`` a flag. It loads, and its run resumes like an uninterrupted one."""
    _, train, test = tree_data
    path = run_dir / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    del state["data"], state["scaler"]
    state["format"] = "labcnn-checkpoint-1"
    state["config"] = {
        **state["config"],
        "cutout": 0,
        "ema": 0.0,
        "whiten": False,
        "compile": False,
        "amp": False,
    }
    torch.save(state, path)
    loaded = C.load_trained(path)
    assert (
        loaded.config == CONFIG and loaded.epoch == 1 and loaded.normalization == LAB_NORMALIZATION
    )
    lines = []
    resumed = fit(CONFIG, train, test, run_dir=run_dir, device="cpu", log=lines.append)
    assert f"resuming: 1 of 2 epochs restored from {run_dir}" in lines
    assert without_times(resumed.history) == without_times(run[1].history)
    assert C.load_checkpoint(path)["format"] == "labcnn-checkpoint-2"  # now with fingerprints
    assert C.load_checkpoint(path)["data"]["train"] == C.fingerprint(*train)


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
        RuntimeError("No space left on device\nmore"),
    ],
)
def test_full_disk_keeps_the_previous_checkpoint(tree_data, run_dir, monkeypatch, error):
    """``torch.save`` reports a full disk as OSError or, from its zip writer, as RuntimeError."""
    _, train, test = tree_data
    real_save, disk = torch.save, {"full": True}

    def save(obj, f, *args, **kwargs):
        if not disk["full"]:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"the first bytes of a checkpoint")
        raise error

    monkeypatch.setattr(torch, "save", save)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    with pytest.raises(WriteError) as info:  # at the end of epoch 2
        fit(CONFIG, train, test, run_dir=run_dir, device="cpu", log=quiet)
    assert re.fullmatch(
        rf"cannot write {re.escape(str(run_dir / 'checkpoint.pt'))} \(No space left on "
        r"device\): the previous checkpoint.pt is kept; .*",
        str(info.value),
    )
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before  # no temporary file left
    disk["full"] = False
    lines = []
    assert (
        len(fit(CONFIG, train, test, run_dir=run_dir, device="cpu", log=lines.append).history) == 2
    )
    assert f"resuming: 1 of 2 epochs restored from {run_dir}" in lines


def test_unusable_run_folder_fails_before_training(tree_data, tmp_path):
    _, train, test = tree_data
    (tmp_path / "run").write_text("a file, not a folder")
    lines = []
    with pytest.raises(
        WriteError, match=re.escape(f"cannot write {tmp_path / 'run'} (File exists)")
    ):
        fit(CONFIG, train, test, run_dir=tmp_path / "run", device="cpu", log=lines.append)
    assert lines == []  # not after an epoch of training


# ---------------------------------------------------------------- loading trained models


@pytest.mark.parametrize(
    "wrap", ["bare", "model_state_dict", "state_dict", "model", "module.", "_orig_mod."]
)
def test_state_dict_of_the_original_lab_script_evaluates_with_the_labs_normalization(
    tree_data, tmp_path, wrap
):
    """``torch.save(net.state_dict(), "model.pth")``, alone, wrapped, or with DataParallel's or
    torch.compile's key prefix; a given normalization replaces the lab's."""
    _, _, test = tree_data
    net = LabCNN().train()
    net(torch.randn(4, 3, 32, 32))  # running statistics of its own
    weights = net.state_dict()
    if wrap.endswith("."):
        weights = {wrap + k: v for k, v in weights.items()}
    elif wrap != "bare":
        weights = {wrap: weights, "epoch": 3}
    path = tmp_path / "model.pth"
    torch.save(weights, path)
    trained = C.load_trained(path)
    assert (
        trained.normalization == LAB_NORMALIZATION and trained.config is None and trained.epoch == 0
    )
    assert trained.note == (
        f"{path} is a bare state dict: normalization is the lab's (mean (0.4914, "
        "0.4822, 0.4465), std (0.2023, 0.1994, 0.2010)); --mean and --std choose others"
    )
    assert all(torch.equal(v, trained.model.state_dict()[k]) for k, v in net.state_dict().items())
    assert not trained.model.training
    assert trained.model.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
    expected = evaluate(Trained(net, LAB_NORMALIZATION), *test)
    result = evaluate(trained, *test)
    assert result["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert torch.equal(result["predictions"], expected["predictions"])
    given = Normalization((0.5,) * 3, (0.25,) * 3)
    other = C.load_trained(path, normalization=given)
    assert other.normalization == given
    assert (
        other.note
        == "normalization: as given (mean (0.5000, 0.5000, 0.5000), std (0.2500, 0.2500, 0.2500))"
    )


def test_improved_recipe_checkpoint_is_evaluated_with_its_own_normalization(tree_data, tmp_path):
    """The loader agrees with the run's history; the lab's normalization, the old silent default,
    would give other figures."""
    _, train, test = tree_data
    config = make_config("improved", epochs=1, batch_size=32, val_size=40)
    trained = fit(config, train, test, run_dir=tmp_path, device="cpu", log=quiet)
    loaded = C.load_trained(tmp_path / "checkpoint.pt")
    held_out = torch.randperm(200, generator=torch.Generator().manual_seed(1))[40:]
    assert (
        loaded.normalization == trained.normalization == Normalization.measure(train[0][held_out])
    )
    assert (
        loaded.normalization != LAB_NORMALIZATION and loaded.config == config and loaded.epoch == 1
    )
    assert loaded.note.startswith("normalization: the checkpoint's (mean (")
    result, last = evaluate(loaded, *test), trained.history[-1]
    assert (result["accuracy"], result["loss"]) == pytest.approx(
        (last["test_acc"], last["test_loss"]), rel=1e-6
    )
    lab = evaluate(
        C.load_trained(tmp_path / "checkpoint.pt", normalization=LAB_NORMALIZATION), *test
    )
    assert lab["loss"] != pytest.approx(last["test_loss"], rel=1e-3)


def test_gpu_checkpoint_loads_on_a_cpu_only_machine(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    with (
        monkeypatch.context() as m
    ):  # write it as a CUDA machine would: every storage tagged cuda:0
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(checkpoint_state(), path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="on a CUDA device"):  # the file really is a GPU's
        torch.load(path, weights_only=True)
    assert all(t.device.type == "cpu" for t in C.load_checkpoint(path)["model"].values())
    trained = C.load_trained(path)
    assert next(trained.model.parameters()).device.type == "cpu" and trained.config.epochs == 50
    assert trained.normalization == Normalization((0.5,) * 3, (0.25,) * 3)


# ---------------------------------------------------------------- provenance and export


def test_provenance_hashes_are_stable_and_follow_weights_and_history():
    model = LabCNN()
    with torch.no_grad():
        for i, tensor in enumerate(model.state_dict().values()):
            tensor.fill_(i % 3)
    history = [{"epoch": 1, "test_acc": 0.5, "train_loss": 1.25}]
    facts = C.provenance(model, history)
    # the recipe must not change: published results quote these hashes
    assert facts == {
        "weights sha256": "8316f228091bc3003528c9525a6c7a4f154d0abfb4837423eb4c99baad67bdba",
        "history sha256": "b90a746b01d3a908f5bf7d39a0fbf5f8a9f4c9590445ebe0c81607934f7e0d73",
    }
    same = LabCNN().to(memory_format=torch.channels_last)
    same.load_state_dict(model.state_dict())
    assert C.provenance(same, [dict(reversed(history[0].items()))]) == facts  # layout, key order
    with torch.no_grad():
        same.fc3.bias[3] += 1e-3
    assert C.provenance(same, history)["weights sha256"] != facts["weights sha256"]
    assert C.provenance(same, history)["history sha256"] == facts["history sha256"]
    changed = C.provenance(model, [{**history[0], "test_acc": 0.51}])
    assert changed["history sha256"] != facts["history sha256"]
    assert changed["weights sha256"] == facts["weights sha256"]


def test_export_writes_a_state_dict_that_loads_with_the_runs_normalization(run, tmp_path):
    """The exported file is a plain state dict (the lab script's ``load_state_dict`` reads it)
    with the run's normalization: the lab's for a lab run, the measured one for another."""
    lab = C.load_trained(run[0] / "checkpoint.pt")
    measured = Trained(
        LabCNN(), Normalization((0.5, 0.4, 0.3), (0.25, 0.2, 0.3)), history=[{"epoch": 1}]
    )
    for trained in (lab, measured):
        C.export(tmp_path / "weights.pt", trained)
        state = torch.load(tmp_path / "weights.pt", weights_only=True)
        assert (
            state["history_sha256"]
            == C.provenance(trained.model, trained.history)["history sha256"]
        )
        LabCNN().load_state_dict(state["state_dict"])
        loaded = C.load_trained(tmp_path / "weights.pt")
        assert loaded.normalization == trained.normalization
        assert loaded.note.startswith("normalization: the exported run's (mean (")
        weights = C.provenance(loaded.model, [])["weights sha256"]
        assert weights == C.provenance(trained.model, [])["weights sha256"]
    assert lab.normalization == LAB_NORMALIZATION
    with pytest.raises(
        WriteError, match=re.escape(f"cannot write {tmp_path / 'no' / 'weights.pt'} (")
    ):
        C.export(tmp_path / "no" / "weights.pt", lab)


@pytest.mark.parametrize(
    "save",
    ["compile(DataParallel)", "DataParallel(compile)", "legacy format", "no num_batches_tracked"],
)
def test_weights_torch_would_load_evaluate(tmp_path, save):
    """Whatever torch's load_state_dict accepts for LabCNN, wrapper prefixes removed in any
    order, in any format torch.load reads with weights_only=True (pytorch/pytorch#101107)."""
    model = LabCNN()
    weights = model.state_dict()
    path = tmp_path / "weights.pt"
    if save == "compile(DataParallel)":
        weights = {f"_orig_mod.module.{k}": v for k, v in weights.items()}
    elif save == "DataParallel(compile)":
        weights = {f"module._orig_mod.{k}": v for k, v in weights.items()}
    elif save == "no num_batches_tracked":
        weights = {k: v for k, v in weights.items() if "num_batches_tracked" not in k}
    torch.save(weights, path, _use_new_zipfile_serialization=save != "legacy format")
    loaded = C.load_trained(path).model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items() if k in loaded)


def test_a_run_folder_given_as_a_checkpoint_names_the_file_inside(tmp_path):
    torch.save(LabCNN().state_dict(), tmp_path / "checkpoint.pt")
    with pytest.raises(
        CheckpointError, match=f"^{re.escape(str(tmp_path))} is a run folder: pass "
    ):
        C.load_trained(tmp_path)
    (tmp_path / "link.pt").symlink_to(tmp_path / "gone.pt")
    with pytest.raises(CheckpointError, match="is a broken link to .*gone.pt"):
        C.load_trained(tmp_path / "link.pt")
