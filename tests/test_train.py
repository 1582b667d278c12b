"""labcnn.lab and labcnn.harness: the split, the batches and their augmentation, one epoch,
evaluation, fit; learning, seeding, resuming, divergence, interruption, and what a run folder
holds after each epoch."""

import json
import math
import random
import signal
import subprocess
import threading
import time

import pytest
import torch
from helpers import ENV, LABCNN, QUICK, options, quiet, train_args, without_times
from synthetic import load, make_dataset, make_images
from torchvision.transforms.v2 import functional as TF

from labcnn import ConfigError, TrainingDiverged
from labcnn import harness as H
from labcnn import lab as T
from labcnn.checkpoint import load_checkpoint
from labcnn.device import amp_dtype
from labcnn.model import LAB_NORMALIZATION, LabCNN, Trained
from labcnn.settings import RECIPES, make_config

pytestmark = pytest.mark.usefixtures("one_thread")
RUN_FILES = [".lock", "accuracy.png", "checkpoint.pt", "history.json", "loss.png"]


def figures(record: dict) -> list[float]:
    """A history record's numbers (it also holds the device line)."""
    return [v for v in record.values() if isinstance(v, (int, float))]


# ---------------------------------------------------------------- split, batches, augmentation


def test_subset_is_seeded_and_checked():
    images, labels = make_images(3)
    (a, a_labels), val = T.training_split(make_config(subset=10, seed=1), images, labels)
    (b, b_labels), _ = T.training_split(make_config(subset=10, seed=1), images, labels)
    assert (
        val is None
        and len(a_labels) == 10
        and torch.equal(a, b)
        and torch.equal(a_labels, b_labels)
    )
    (c, _), _ = T.training_split(make_config(subset=10, seed=2), images, labels)
    assert not torch.equal(a, c)
    assert T.training_split(make_config(), images, labels)[0][0] is images  # no subset: all, as is
    with pytest.raises(ConfigError, match=r"^subset size 31 must be between 1 and 30$"):
        T.training_split(make_config(subset=31), images, labels)


def test_validation_split_is_seeded_disjoint_and_checked():
    images, labels = make_images(3)
    (train, train_labels), (val, val_labels) = T.training_split(
        make_config(val_size=10), images, labels
    )
    assert len(train_labels) == 20 and len(val_labels) == 10
    rows = {tuple(x.flatten()[:64].tolist()) for x in torch.cat([train, val])}
    assert len(rows) == 30  # every image in exactly one part
    assert torch.equal(T.training_split(make_config(val_size=10), images, labels)[1][1], val_labels)
    (_, sub_labels), (sub_val, _) = T.training_split(
        make_config(subset=20, val_size=5), images, labels
    )
    assert len(sub_labels) == 15 and len(sub_val) == 5
    for bad, n in ((dict(val_size=30), 30), (dict(subset=10, val_size=10), 10)):
        with pytest.raises(
            ConfigError,
            match=f"^val_size {bad['val_size']} must be smaller than the {n} training images$",
        ):
            T.training_split(make_config(**bad), images, labels)


def crops(images):
    """Every torchvision ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip`` outcome of each
    image: ``{(top, left, flipped): uint8 [N, 3, 32, 32]}``."""
    padded = TF.pad(images, [4], fill=0)
    out = {}
    for top in range(9):
        for left in range(9):
            crop = TF.crop(padded, top, left, 32, 32)
            out[top, left, False], out[top, left, True] = crop, TF.horizontal_flip(crop)
    return out


def test_augment_crops_and_flips_like_torchvision():
    """Each output is one of torchvision's crop-and-flip outcomes of its image; over a batch the
    offsets (0 to 8 each way) and flips vary as torchvision draws them (an identity would fail)."""
    images = torch.randint(
        0, 256, (256, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    out = T.augment(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out, T.augment(images, torch.Generator().manual_seed(0)))  # seeded
    drawn = [None] * len(images)
    for key, candidate in crops(images).items():
        for i in (candidate == out).flatten(1).all(1).nonzero().flatten().tolist():
            drawn[i] = drawn[i] or key
    assert None not in drawn, f"image {drawn.index(None)} is not a crop of its padded input"
    assert {top for top, _, _ in drawn} == {left for _, left, _ in drawn} == set(range(9))
    assert 0.35 < sum(flip for _, _, flip in drawn) / len(drawn) < 0.65
    assert sum(key == (4, 4, False) for key in drawn) < 15  # mostly not the identity


def test_batches_cover_the_epoch_once_in_a_seeded_order():
    images, labels = make_images(3)
    batches = list(T.batches(images, labels, 8, T.epoch_generator(0, 1), LAB_NORMALIZATION))
    assert [len(y) for _, y in batches] == [8, 8, 8, 6]
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == sorted(labels.tolist())
    x = batches[0][0]
    assert x.dtype == torch.float32 and x.shape == (8, 3, 32, 32)
    assert x.is_contiguous(memory_format=torch.channels_last)
    index = [i for i in range(30) if torch.equal(LAB_NORMALIZATION(images[i : i + 1]), x[:1])]
    assert index and labels[index[0]] == batches[0][1][0]  # images keep their labels, normalized
    again = list(T.batches(images, labels, 8, T.epoch_generator(0, 1), LAB_NORMALIZATION))
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        for a, b in zip(batches, again, strict=False)
    )
    other = T.batches(images, labels, 8, T.epoch_generator(0, 2), LAB_NORMALIZATION)
    assert not torch.equal(torch.cat([y for _, y in other]), torch.cat([y for _, y in batches]))
    augmented = list(T.batches(images, labels, 8, T.epoch_generator(0, 1), LAB_NORMALIZATION, True))
    assert all(
        torch.equal(a[1], b[1]) for a, b in zip(batches, augmented, strict=False)
    )  # same order
    assert not torch.equal(augmented[0][0], x)
    assert augmented[0][0].is_contiguous(memory_format=torch.channels_last)


def test_epoch_generators_differ_by_seed_and_epoch():
    def draw(seed, epoch):
        return torch.randint(0, 2**62, (1,), generator=T.epoch_generator(seed, epoch)).item()

    draws = {(s, e): draw(s, e) for s in (0, 1, 2**64 - 1) for e in (1, 2)}
    assert len(set(draws.values())) == len(draws) and draw(0, 1) == draws[0, 1]


def test_format_duration():
    assert [H.format_duration(s) for s in (0.4, 37, 2472, 3599.6, 7500, 36000)] == [
        "0 s",
        "37 s",
        "41 min 12 s",
        "1 h 00 min",
        "2 h 05 min",
        "10 h 00 min",
    ]


# ---------------------------------------------------------------- one epoch, evaluation


def test_train_one_epoch_reports_loss_accuracy_and_the_step_that_diverged():
    images, labels = make_images(2)
    torch.manual_seed(0)
    model = LabCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.001)

    def epoch(poison_step=None):
        data = T.batches(images, labels, 8, T.epoch_generator(0, 1), LAB_NORMALIZATION)
        data = ((x * math.nan if step == poison_step else x, y) for step, (x, y) in enumerate(data))
        return T.train_one_epoch(model, torch.nn.CrossEntropyLoss(), optimizer, data)

    loss, accuracy = epoch()
    assert math.isfinite(loss) and loss > 0 and 0 <= accuracy <= 1 and model.training
    with pytest.raises(TrainingDiverged, match=r"^the training loss became nan at step 2$"):
        epoch(poison_step=1)


def trained_model(train: bool) -> Trained:
    model = LabCNN().train()
    model(torch.randn(8, 3, 32, 32))  # move the BatchNorm running statistics away from their init
    return Trained(model.train(train), LAB_NORMALIZATION)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_evaluate_does_not_depend_on_batch_size_and_leaves_the_model_as_it_was(tree_data, mode):
    _, _, (images, labels) = tree_data
    trained = trained_model(mode == "train")
    before = {k: v.clone() for k, v in trained.model.state_dict().items()}
    full = T.evaluate(trained, images, labels, batch_size=len(labels))
    for batch_size in (1, 7):  # 7 leaves a partial last batch
        part = T.evaluate(trained, images, labels, batch_size=batch_size)
        assert (
            part["loss"] == pytest.approx(full["loss"], rel=1e-5)
            and part["accuracy"] == full["accuracy"]
        )
        assert torch.equal(part["confusion"], full["confusion"])
        assert torch.equal(part["predictions"], full["predictions"])
        assert torch.allclose(part["confidence"], full["confidence"], atol=1e-5)
    assert all(m.training == (mode == "train") for m in trained.model.modules())
    assert all(torch.equal(before[k], v) for k, v in trained.model.state_dict().items())
    assert full["confusion"].sum() == len(labels) and full["confusion"].dtype == torch.int64
    assert full["accuracy"] == pytest.approx(full["confusion"].diag().sum().item() / len(labels))
    assert full["accuracy"] == pytest.approx((full["predictions"] == labels).double().mean().item())
    assert full["per_class_accuracy"] == pytest.approx(
        [(full["predictions"][labels == c] == c).double().mean().item() for c in range(10)]
    )
    assert full["confidence"].dtype == torch.float32
    assert (
        (full["confidence"] > 0.1 - 1e-6) & (full["confidence"] <= 1)
    ).all()  # top of 10 probabilities
    with torch.no_grad():
        logits = trained.model.eval()(LAB_NORMALIZATION(images))
    assert full["loss"] == pytest.approx(
        torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5
    )


# ---------------------------------------------------------------- fit


def test_loss_falls_and_accuracy_beats_chance(tree_data):
    _, train, test = tree_data
    lines = []
    history = H.train(make_config(**QUICK), train, test, device="cpu", log=lines.append).history
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["test_acc"] > 0.5  # chance is 0.1
    assert set(history[0]) >= {
        "epoch",
        "train_loss",
        "train_acc",
        "test_loss",
        "test_acc",
        "lr",
        "seconds",
        "elapsed_train_seconds",
    }
    assert [r["epoch"] for r in history] == [1, 2]
    assert history[0]["elapsed_train_seconds"] < history[1]["elapsed_train_seconds"]
    assert lines[0].startswith("device: cpu (1 thread") and lines[0].endswith(", float32")
    assert lines[2].startswith("epoch 2/2  train loss ") and " test loss " in lines[2]


def test_same_seed_same_history(tree_data):
    _, train, test = tree_data
    runs = [
        H.train(make_config(**QUICK), train, test, device="cpu", log=quiet).history
        for _ in range(2)
    ]
    assert without_times(runs[0]) == without_times(runs[1])
    other = H.train(
        make_config(**{**QUICK, "epochs": 1, "seed": 1}), train, test, device="cpu", log=quiet
    )
    assert without_times(other.history) != without_times(runs[0][:1])


def stop_at_epoch_1(line):
    if line.startswith("epoch 1/"):
        raise KeyboardInterrupt


def test_resumed_run_ends_like_an_uninterrupted_one(tree_data, tmp_path):
    _, train, test = tree_data
    config = make_config(**QUICK)
    reference = H.train(config, train, test, device="cpu", log=quiet)
    with pytest.raises(KeyboardInterrupt):
        H.train(config, train, test, run_dir=tmp_path, device="cpu", log=stop_at_epoch_1)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1  # logged after it was saved
    lines = []
    resumed = H.train(config, train, test, run_dir=tmp_path, device="cpu", log=lines.append)
    assert without_times(resumed.history) == without_times(reference.history)
    assert all(
        torch.equal(v, resumed.model.state_dict()[k])
        for k, v in reference.model.state_dict().items()
    )
    assert f"resuming: 1 of 2 epochs restored from {tmp_path}" in lines
    assert [ln.split()[1] for ln in lines if ln.startswith("epoch ")] == ["1/2", "2/2"]


def test_run_folder_is_complete_when_each_epoch_is_logged(tree_data, tmp_path):
    """Checkpoint, history and both curves exist (and are current) before the epoch's line."""
    _, train, test = tree_data
    seen = []

    def log(line):
        if line.startswith("epoch "):
            seen.append(
                (
                    sorted(p.name for p in tmp_path.iterdir()),
                    load_checkpoint(tmp_path / "checkpoint.pt")["epoch"],
                    len(json.loads((tmp_path / "history.json").read_text())),
                    line,
                )
            )

    H.train(make_config(**QUICK), train, test, run_dir=tmp_path, device="cpu", log=log)
    assert [s[0] for s in seen] == [RUN_FILES] * 2
    assert [(s[1], s[2]) for s in seen] == [(1, 1), (2, 2)]
    assert "left" in seen[0][3] and "left" not in seen[1][3]  # time left, until the last epoch


def test_last_training_batch_of_one_image(tree_data):
    _, train, test = tree_data
    config = make_config(epochs=1, batch_size=8, subset=17, lr=0.001)  # batches of 8, 8 and 1
    assert math.isfinite(
        H.train(config, train, test, device="cpu", log=quiet).history[0]["train_loss"]
    )


def test_fit_trains_the_model_it_is_given_and_replays_its_run(tree_data, tmp_path):
    """The notebook's experiments: another network, in a run folder that a re-run replays."""
    _, train, test = tree_data

    def network():
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))

    config, model = make_config(**{**QUICK, "epochs": 1}), network()
    before = model[1].weight.detach().clone()
    trained = H.train(config, train, test, run_dir=tmp_path, device="cpu", log=quiet, model=model)
    assert trained.model is model and not torch.equal(before, model[1].weight)
    assert trained.history[0]["test_acc"] > 0.3
    lines, again = [], network()
    replayed = H.train(
        config, train, test, run_dir=tmp_path, device="cpu", log=lines.append, model=again
    )
    assert f"run complete: 1 of 1 epochs restored from {tmp_path}" in lines
    assert replayed.history == trained.history and torch.equal(again[1].weight, model[1].weight)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_recipe_trains_one_epoch(tree_data, recipe):
    """The smoke test of each named recipe: its own settings, one epoch, on the synthetic data;
    the device line names the precision it got."""
    _, train, test = tree_data
    config = make_config(
        recipe, epochs=1, subset=150, val_size=50 if RECIPES[recipe].get("val_size") else None
    )
    lines = []
    history = H.train(config, train, test, device="cpu", log=lines.append).history
    assert len(history) == 1 and all(map(math.isfinite, figures(history[0])))
    assert ("val_acc" in history[0]) == bool(config.val_size)
    dtype = amp_dtype(torch.device("cpu"), config.amp)
    assert lines[0].endswith(
        ", float32" if dtype is None else f", mixed precision {str(dtype)[6:]}"
    )


# ---------------------------------------------------------------- divergence


def poison_evaluation(monkeypatch, split_index: int, epoch: int):
    """Make the ``split_index``-th evaluation (0: validation, 1: test) of ``epoch`` return NaN."""
    real, calls = T.evaluate, []

    def evaluate(*args, **kwargs):
        calls.append(1)
        result = real(*args, **kwargs)
        return (
            {**result, "loss": math.nan}
            if len(calls) == split_index + 1 + (epoch - 1) * 2
            else result
        )

    monkeypatch.setattr(T, "evaluate", evaluate)


@pytest.mark.parametrize("where, name", [(0, "val loss"), (1, "test loss")])
def test_non_finite_evaluation_stops_at_once_and_keeps_the_last_finite_checkpoint(
    tree_data, tmp_path, monkeypatch, where, name
):
    _, train, test = tree_data
    poison_evaluation(monkeypatch, where, epoch=2)
    config = make_config(**{**QUICK, "epochs": 3, "val_size": 40})
    with pytest.raises(
        TrainingDiverged,
        match=f"^the {name} became nan at epoch 2; .*checkpoint.pt "
        r"\(epoch 1, all figures finite\) is kept",
    ):
        H.train(config, train, test, run_dir=tmp_path, device="cpu", log=quiet)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["epoch"] == 1 and all(map(math.isfinite, figures(state["history"][0])))
    assert (
        json.loads((tmp_path / "history.json").read_text()) == state["history"]
    )  # strict JSON: no NaN


def test_divergence_names_epoch_and_step(tree_data, tmp_path, monkeypatch):
    _, train, test = tree_data
    real, calls = T.train_one_epoch, []

    def poisoned(model, criterion, optimizer, batches, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # NaN inputs from the 3rd step of epoch 2
            batches = ((x * math.nan if step >= 2 else x, y) for step, (x, y) in enumerate(batches))
        return real(model, criterion, optimizer, batches, *args, **kwargs)

    monkeypatch.setattr(T, "train_one_epoch", poisoned)
    with pytest.raises(TrainingDiverged) as info:
        H.train(
            make_config(**{**QUICK, "epochs": 3}),
            train,
            test,
            run_dir=tmp_path,
            device="cpu",
            log=quiet,
        )
    assert str(info.value) == (
        f"the training loss became nan at step 3 of epoch 2; {tmp_path / 'checkpoint.pt'} "
        "(epoch 1, all figures finite) is kept. Lower the learning rate and train into a new "
        "run folder"
    )
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1


def test_enormous_learning_rate_stops_in_the_first_epoch_and_writes_nothing(tree_data, tmp_path):
    """The improved recipe at lr 1000 gave NaN validation and test losses at epoch 1 while its
    training loss was still finite; it must stop there, with no checkpoint to mistake for good."""
    _, train, test = tree_data
    config = make_config("improved", epochs=2, batch_size=32, lr=1000.0, val_size=40)
    with pytest.raises(
        TrainingDiverged,
        match=r"became (nan|inf|-inf) at (step \d+ of )?epoch 1; "
        "no checkpoint was written",
    ):
        H.train(config, train, test, run_dir=tmp_path, device="cpu", log=quiet)
    assert not (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "history.json").exists()


# ---------------------------------------------------------------- interruption (real processes)


def wait_for_epoch_lines(proc, after: int, count: int) -> list[float]:
    """Read ``proc``'s output until ``count`` epochs past ``after`` are logged; their read times."""
    times = []
    for line in proc.stdout:
        if line.startswith("epoch ") and int(line.split()[1].split("/")[0]) > after:
            times.append(time.perf_counter())
            if len(times) == count:
                return times
    pytest.fail(f"the run ended before {count} new epochs (exit status {proc.wait()})")


TRAIN_ARGS = dict(subset=96, batch_size=8, lr=0.002, seed=3)


def start_train(root, out, epochs, **popen):
    command = [*LABCNN, *train_args(root, out, epochs)]
    command += options(**TRAIN_ARGS)
    # A shell's background job starts with SIGINT ignored, and a child inherits that: give it back
    # its default, so Ctrl-C reaches the run however the tests were started.
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=popen.pop("stderr", subprocess.STDOUT),
        text=True,
        env=ENV,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    watchdog = threading.Timer(300, proc.kill)  # a hung run fails the test instead of blocking it
    watchdog.daemon = True
    watchdog.start()
    return proc


def test_ctrl_c_then_kill_9_then_resume_ends_like_an_uninterrupted_run(tmp_path):
    """A real training run: Ctrl-C (one line, exit 130), resumed in a new process and SIGKILLed at
    a seeded random moment (in training, evaluation or the writes), resumed again to the end (here:
    the files are what the boundary leaves); every checkpoint on the way is complete, and the end is
    the uninterrupted run's, figure for figure and weight for weight."""
    root, out, epochs = tmp_path / "data", tmp_path / "run", 6
    make_dataset(root, "tree")
    snapshots = []

    def check_folder(done):
        state = load_checkpoint(out / "checkpoint.pt")  # always a complete checkpoint...
        assert state["epoch"] == len(state["history"]) >= done  # ...of an earlier epoch
        on_disk = json.loads((out / "history.json").read_text())
        assert on_disk == state["history"][: len(on_disk)] and len(on_disk) >= state["epoch"] - 1
        snapshots.append(state["history"])
        return state["epoch"]

    proc = start_train(root, out, epochs, stderr=subprocess.PIPE)
    try:
        times = wait_for_epoch_lines(proc, 0, 2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert (
        err.strip()
        == f"interrupted: completed epochs are saved in {out}; run the same command to resume"
    )
    done = check_folder(2)
    proc = start_train(root, out, epochs)
    wait_for_epoch_lines(proc, done, 1)
    time.sleep(random.Random(3).uniform(0, 0.8) * (times[1] - times[0]))
    proc.kill()
    proc.wait()
    done = check_folder(done)
    # the uninterrupted run, then the killed one resumed here (its lock died with it)
    reference = H.train(
        make_config(epochs=epochs, **TRAIN_ARGS),
        load(root),
        load(root, train=False),
        device="cpu",
        log=quiet,
    )
    lines = []
    resumed = H.train(
        make_config(epochs=epochs, **TRAIN_ARGS),
        load(root),
        load(root, train=False),
        run_dir=out,
        device="cpu",
        log=lines.append,
    )
    assert f"resuming: {done} of {epochs} epochs restored from {out}" in lines
    expected = without_times(reference.history)
    assert without_times(resumed.history) == expected
    assert without_times(json.loads((out / "history.json").read_text())) == expected
    for history in snapshots:
        assert without_times(history) == expected[: len(history)]
    final = load_checkpoint(out / "checkpoint.pt")["model"]
    assert all(torch.equal(final[k], v) for k, v in reference.model.state_dict().items())
