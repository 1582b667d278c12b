"""labcnn.train: fit, resume, divergence, interruption, and what a run folder holds after each epoch."""
import json
import math
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from helpers import ENV, QUICK, quiet, without_times
from synthetic import make_dataset

from labcnn import train as T
from labcnn.checkpoint import load_checkpoint, load_trained
from labcnn.cli import main
from labcnn.config import RECIPES, applied_settings, make_config
from labcnn.errors import CheckpointError, ConfigError, TrainingDiverged
from labcnn.evaluate import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")


def test_loss_falls_and_accuracy_beats_chance(tree_data):
    _, train, test = tree_data
    history = T.fit(make_config(**{**QUICK, "epochs": 3}), train, test, device="cpu", log=quiet).history
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["test_acc"] > 0.5  # chance is 0.1
    assert set(history[0]) >= {"epoch", "train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds"}


def test_same_seed_same_history(tree_data):
    _, train, test = tree_data
    runs = [T.fit(make_config(**QUICK), train, test, device="cpu", log=quiet).history for _ in range(2)]
    assert without_times(runs[0]) == without_times(runs[1])


def test_resumed_run_ends_like_an_uninterrupted_one(tree_data, tmp_path):
    _, train, test = tree_data
    config = make_config(**{**QUICK, "epochs": 3})
    reference = T.fit(config, train, test, run_dir=tmp_path / "a", device="cpu", log=quiet).history

    def stop_at_epoch_2(line):
        if line.startswith("epoch 2/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        T.fit(config, train, test, run_dir=tmp_path / "b", device="cpu", log=stop_at_epoch_2)
    assert load_checkpoint(tmp_path / "b" / "checkpoint.pt")["epoch"] == 2  # logged after it was saved
    lines = []
    resumed = T.fit(config, train, test, run_dir=tmp_path / "b", device="cpu", log=lines.append).history
    assert without_times(resumed) == without_times(reference)
    assert "resuming: 2 of 3 epochs restored" in " ".join(lines)


def test_run_folder_is_complete_when_each_epoch_is_logged(tree_data, tmp_path):
    """Checkpoint, history and both curves exist (and are current) before the epoch's line."""
    _, train, test = tree_data
    seen = []

    def log(line):
        if line.startswith("epoch "):
            seen.append((sorted(p.name for p in tmp_path.iterdir()), load_checkpoint(tmp_path / "checkpoint.pt")["epoch"],
                         len(json.loads((tmp_path / "history.json").read_text())), line))

    T.fit(make_config(**{**QUICK, "epochs": 3}), train, test, run_dir=tmp_path, device="cpu", log=log)
    assert [s[0] for s in seen] == [[".lock", "accuracy.png", "checkpoint.pt", "history.json", "loss.png"]] * 3
    assert [(s[1], s[2]) for s in seen] == [(1, 1), (2, 2), (3, 3)]
    assert "left" in seen[0][3] and "left" in seen[1][3] and "left" not in seen[2][3]  # time left, until the last epoch


def test_last_training_batch_of_one_image(tree_data):
    _, train, test = tree_data
    config = make_config(epochs=1, batch_size=8, subset=17, lr=0.001)  # batches of 8, 8 and 1
    assert math.isfinite(T.fit(config, train, test, device="cpu", log=quiet).history[0]["train_loss"])


def test_lab_recipe_defaults():
    config = make_config()
    assert (config.epochs, config.batch_size, config.optimizer, config.lr, config.weight_decay, config.seed) == (
        50, 100, "adam", 0.01, 0.001, 0)
    assert config.mean == (0.4914, 0.4822, 0.4465) and config.std == (0.2023, 0.1994, 0.2010)
    assert config.amp == "off" and not config.compile  # the graded run reproduces exactly
    assert {make_config(name).amp for name in RECIPES if name != "lab"} == {"native"}  # bfloat16 where native
    with pytest.raises(ConfigError, match="unknown recipe"):
        make_config("nonexistent")


def test_applied_settings_leave_out_what_does_not_act():
    lab, long = applied_settings(make_config()), applied_settings(make_config("long"))
    assert not {"momentum", "cutout", "ema", "whiten", "val_size", "subset"} & set(lab) and lab["mean"] == (0.4914, 0.4822, 0.4465)
    assert (long["cutout"], long["ema"], long["momentum"], long["val_size"]) == (8, 0.999, 0.9, 5000) and "mean" not in long


def test_resume_with_other_settings_is_refused(tree_data, tmp_path):
    _, train, test = tree_data
    T.fit(make_config(**{**QUICK, "epochs": 1}), train, test, run_dir=tmp_path, device="cpu", log=quiet)
    with pytest.raises(CheckpointError, match=r"lr=0.001 \(now 0.002\)"):
        T.fit(make_config(**{**QUICK, "epochs": 1, "lr": 0.002}), train, test, run_dir=tmp_path, device="cpu", log=quiet)


# ---------------------------------------------------------------- divergence


def poison_evaluation(monkeypatch, split_index: int, epoch: int):
    """Make the ``split_index``-th evaluation (0: validation, or test) of ``epoch`` return NaN."""
    real, calls = T.evaluate, []

    def evaluate(*args, **kwargs):
        calls.append(1)
        result = real(*args, **kwargs)
        return {**result, "loss": math.nan} if len(calls) == split_index + 1 + (epoch - 1) * 2 else result

    monkeypatch.setattr(T, "evaluate", evaluate)


@pytest.mark.parametrize("where, name", [(0, "val loss"), (1, "test loss")])
def test_non_finite_evaluation_stops_at_once_and_keeps_the_last_finite_checkpoint(tree_data, tmp_path, monkeypatch, where, name):
    _, train, test = tree_data
    poison_evaluation(monkeypatch, where, epoch=2)
    config = make_config(**{**QUICK, "epochs": 3, "val_size": 40})
    with pytest.raises(TrainingDiverged, match=f"the {name} became nan at epoch 2; .*checkpoint.pt \\(epoch 1, all its figures finite\\) is kept"):
        T.fit(config, train, test, run_dir=tmp_path, device="cpu", log=quiet)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["epoch"] == 1 and all(math.isfinite(v) for v in state["history"][0].values())
    assert json.loads((tmp_path / "history.json").read_text()) == state["history"]  # strict JSON: no NaN token


def test_divergence_names_epoch_and_step(tree_data, tmp_path, capsys, monkeypatch):
    root, _, _ = tree_data
    real, calls = T.train_one_epoch, []

    def poisoned(model, optimizer, scheduler, scaler, batches, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # NaN inputs from the 3rd step of epoch 2
            batches = ((x * math.nan, y) if step >= 2 else (x, y) for step, (x, y) in enumerate(batches))
        return real(model, optimizer, scheduler, scaler, batches, *args, **kwargs)

    monkeypatch.setattr(T, "train_one_epoch", poisoned)
    out = tmp_path / "run"
    assert main(["train", "--data-dir", str(root), "--out", str(out), "--epochs", "3", "--batch-size", "32", "--lr", "0.001", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == (
        f"error: the training loss became nan at step 3 of epoch 2; {out / 'checkpoint.pt'} (epoch 1, all its figures finite) "
        "is kept. Lower the learning rate and train into a new run folder\n")
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1


def test_enormous_learning_rate_stops_in_the_first_epoch_and_writes_nothing(tree_data, tmp_path):
    """The improved recipe at lr 1000 gave NaN validation and test losses at epoch 1 while its
    training loss was still finite; it must stop there, with no checkpoint to mistake for good."""
    _, train, test = tree_data
    config = make_config("improved", epochs=2, batch_size=32, lr=1000.0, val_size=40)
    with pytest.raises(TrainingDiverged, match=r"became (nan|inf|-inf) at (step \d+ of )?epoch 1; no checkpoint was written"):
        T.fit(config, train, test, run_dir=tmp_path, device="cpu", log=quiet)
    assert not (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "history.json").exists()


# ---------------------------------------------------------------- interruption


def wait_for_epoch_lines(proc, after: int, count: int) -> list[float]:
    """Read ``proc``'s output until ``count`` epochs past ``after`` are logged; their read times."""
    times = []
    for line in proc.stdout:
        if line.startswith("epoch ") and int(line.split()[1].split("/")[0]) > after:
            times.append(time.perf_counter())
            if len(times) == count:
                return times
    pytest.fail(f"the run ended before {count} new epochs (exit status {proc.wait()})")


def start_train(root, out, epochs, **popen):
    command = [sys.executable, "-m", "labcnn", "train", "--data-dir", str(root), "--out", str(out), "--epochs", str(epochs),
               "--subset", "160", "--batch-size", "8", "--lr", "0.002", "--seed", "3", "--device", "cpu"]
    # A shell's background job starts with SIGINT ignored, and a child inherits that: give it back
    # its default, so Ctrl-C reaches the run however the tests were started.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=popen.pop("stderr", subprocess.STDOUT), text=True, env=ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    watchdog = threading.Timer(600, proc.kill)  # a hung run fails the test instead of blocking it
    watchdog.daemon = True
    watchdog.start()
    return proc


def test_ctrl_c_ends_with_one_line_saying_where_to_resume(tree_data, tmp_path):
    root, _, _ = tree_data
    out = tmp_path / "run"
    proc = start_train(root, out, 1000, stderr=subprocess.PIPE)
    try:
        wait_for_epoch_lines(proc, 0, 1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert err.strip() == f"interrupted: completed epochs are saved in {out}; run the same command to resume"
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == len(state["history"]) >= 1


def test_killed_training_resumes_exactly(tmp_path):
    """SIGKILL a real training run at 4 seeded random moments, resume, compare with an uninterrupted run."""
    root = tmp_path / "data"
    make_dataset(root, "tree")
    epochs, rng = 12, random.Random(3)
    reference = start_train(root, tmp_path / "reference", epochs)  # runs alongside the killed ones
    out, snapshots, epoch_seconds = tmp_path / "killed", [], None
    for kill in range(4):
        done = len(snapshots[-1]) if snapshots else 0
        proc = start_train(root, out, epochs)
        times = wait_for_epoch_lines(proc, done, 1 if epoch_seconds else 2)
        epoch_seconds = epoch_seconds or times[1] - times[0]
        time.sleep(rng.uniform(0, 0.8) * epoch_seconds)  # in training, evaluation or the writes
        proc.kill()
        proc.wait()
        state = load_checkpoint(out / "checkpoint.pt")  # always a complete checkpoint...
        assert state["epoch"] == len(state["history"]) >= done  # ...of an earlier epoch
        on_disk = json.loads((out / "history.json").read_text())
        assert on_disk == state["history"][: len(on_disk)] and len(on_disk) >= state["epoch"] - 1
        snapshots.append(state["history"])
    done = len(snapshots[-1])
    proc = start_train(root, out, epochs)  # the killed runs' locks died with them
    printed, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, printed
    assert f"resuming: {done} of {epochs} epochs restored from {out / 'checkpoint.pt'}\nepoch {done + 1}/{epochs}  train loss" in printed
    printed_reference, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, printed_reference
    expected = json.loads((tmp_path / "reference" / "history.json").read_text())
    resumed = json.loads((out / "history.json").read_text())
    assert len(expected) == epochs and without_times(resumed) == without_times(expected)
    for history in snapshots:
        assert without_times(history) == without_times(expected[: len(history)])
    final, reference_state = load_checkpoint(out / "checkpoint.pt"), load_checkpoint(tmp_path / "reference" / "checkpoint.pt")
    assert all(torch.equal(final["model"][k], v) for k, v in reference_state["model"].items())


# ---------------------------------------------------------------- recipes, moving average


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_every_recipe_trains_one_epoch(tree_data, recipe):
    """The smoke test of each named recipe: its own settings, one epoch, on the synthetic data."""
    _, train, test = tree_data
    config = make_config(recipe, epochs=1, subset=150, val_size=50 if RECIPES[recipe].get("val_size") else None)
    history = T.fit(config, train, test, device="cpu", log=quiet).history
    assert len(history) == 1 and all(math.isfinite(v) for v in history[0].values())
    assert ("val_acc" in history[0]) == bool(config.val_size)


def test_moving_average_is_the_model_evaluated_saved_and_resumed(tree_data, tmp_path):
    _, train, test = tree_data
    config = make_config(**{**QUICK, "epochs": 3, "ema": 0.9, "cutout": 8})
    trained = T.fit(config, train, test, run_dir=tmp_path / "a", device="cpu", log=quiet)
    state = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    assert state["ema_steps"] == 3 * math.ceil(len(train[1]) / QUICK["batch_size"])
    averaged, raw = state["model"], state["training_model"]
    assert all(torch.equal(averaged[k], v) for k, v in trained.model.state_dict().items())
    assert not torch.equal(averaged["conv1.0.weight"], raw["conv1.0.weight"])  # the average, not the last step
    loaded = load_trained(tmp_path / "a" / "checkpoint.pt")
    assert evaluate(loaded, *test)["loss"] == pytest.approx(trained.history[-1]["test_loss"], rel=1e-6)

    def stop_at_epoch_2(line):
        if line.startswith("epoch 2/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        T.fit(config, train, test, run_dir=tmp_path / "b", device="cpu", log=stop_at_epoch_2)
    resumed = T.fit(config, train, test, run_dir=tmp_path / "b", device="cpu", log=quiet).history
    assert without_times(resumed) == without_times(trained.history)


def test_moving_average_checkpoint_without_its_step_count_is_refused(tree_data, tmp_path):
    _, train, test = tree_data
    config = make_config(**{**QUICK, "epochs": 2, "ema": 0.9})
    T.fit(make_config(**{**QUICK, "epochs": 1, "ema": 0.9}), train, test, run_dir=tmp_path, device="cpu", log=quiet)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    state["config"]["epochs"] = 2
    del state["ema_steps"]
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"lacks \['ema_steps'\]: a run with a moving average"):
        T.fit(config, train, test, run_dir=tmp_path, device="cpu", log=quiet)


def test_moving_average_changes_the_evaluated_model(tree_data):
    _, train, test = tree_data
    runs = [T.fit(make_config(**{**QUICK, "ema": ema}), train, test, device="cpu", log=quiet).history for ema in (0.0, 0.9)]
    assert [r["train_loss"] for r in runs[0]] == [r["train_loss"] for r in runs[1]]  # same training steps
    assert runs[0][-1]["test_loss"] != runs[1][-1]["test_loss"]  # another model evaluated


def test_device_line_says_which_precision_the_recipe_got():
    assert T.amp_note("off", None) == ""
    assert T.amp_note("native", torch.bfloat16) == ", mixed precision bfloat16"
    assert "float32" in T.amp_note("native", None) and "natively" in T.amp_note("native", None)
