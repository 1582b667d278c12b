"""Reliability: every bad input gets one clear error, nothing is lost, interrupted training resumes exactly.

Every test writes small synthetic files in a temporary folder (tests/synthetic.py). The two
subprocess tests run the real command line, one thread each, so their runs are reproducible.
"""
import errno
import hashlib
import json
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from PIL import Image
from synthetic import make_dataset, make_images, pickle_batch, write_archive, write_batches, write_png, write_tree
from torchvision.datasets import CIFAR10

from labcnn import train as T
from labcnn.cli import main
from labcnn.data import CLASSES, load_cifar10
from labcnn.errors import CheckpointError, DataError, TrainingDiverged
from labcnn.model import LabCNN
from labcnn.train import CHECKPOINT_FORMAT, TIME_FIELDS, evaluate, fit, load_checkpoint, load_model, make_config

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CI": "1"}
QUICK = dict(epochs=3, batch_size=32, lr=0.001)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on a busy machine these tiny models then train several times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load(root, train=True, verify=False):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the verify=False warning
        return load_cifar10(root, train=train, verify=verify)


def tiny_batches(root):
    """The official layout with 2 training and 1 test image per class; returns its folder."""
    return write_batches(root / "cifar-10-batches-py", make_images(2), make_images(1, seed=1))


def without_times(history):
    return [{k: v for k, v in r.items() if k not in TIME_FIELDS} for r in history]


def corrupt(blob: bytes, rng: random.Random) -> bytes:
    """``blob`` with 1-4 flipped bytes, or cut short."""
    if rng.random() < 0.3:
        return blob[: rng.randrange(len(blob))]
    out = bytearray(blob)
    for _ in range(rng.randint(1, 4)):
        out[rng.randrange(len(out))] ^= rng.randint(1, 255)
    return bytes(out)


def assert_well_formed(images, labels):
    assert images.dtype == torch.uint8 and images.shape[1:] == (3, 32, 32)
    assert labels.dtype == torch.int64 and labels.shape == (len(images),)
    assert len(labels) and 0 <= labels.min() and labels.max() < 10


# ---------------------------------------------------------------- official files


def test_missing_batch_file_is_named(tmp_path):
    (tiny_batches(tmp_path) / "data_batch_1").unlink()
    for verify in (True, False):
        with pytest.raises(DataError, match=r"missing CIFAR-10 file .*data_batch_1: expected the official"):
            load(tmp_path, verify=verify)
    with pytest.raises(DataError, match=r"missing CIFAR-10 file .*test_batch: expected the official"):
        (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
        load(tmp_path, train=False)


def test_checksum_mismatch_of_official_files(tmp_path, monkeypatch):
    folder = tiny_batches(tmp_path)
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    # Pretend the synthetic files are the release: their own MD5s are the published ones.
    monkeypatch.setattr(CIFAR10, "train_list", [[n, md5[n]] for n, _ in CIFAR10.train_list])
    monkeypatch.setattr(CIFAR10, "test_list", [[n, md5[n]] for n, _ in CIFAR10.test_list])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5["batches.meta"]})
    images, labels = load_cifar10(tmp_path)  # intact: loads with verify=True
    images[0, 0, 0, 0] ^= 1  # one changed pixel still unpickles fine; only the MD5 tells
    pickle_batch(folder / "data_batch_1", images[:4], labels[:4])
    with pytest.raises(DataError, match=r"data_batch_1 does not match the official CIFAR-10 release \(MD5"):
        load_cifar10(tmp_path)
    (folder / "data_batch_1").write_bytes((folder / "data_batch_2").read_bytes()[:100])  # truncated
    with pytest.raises(DataError, match=r"data_batch_1 does not match the official"):
        load_cifar10(tmp_path)


def batch_entry(data, labels):
    return pickle.dumps({"data": data, "labels": labels}, protocol=2)


DAMAGED = {
    "truncated": (lambda good: good[: len(good) // 2], "is not a readable CIFAR-10 pickle batch"),
    "not a pickle": (lambda good: b"\x89PNG not a pickle" * 10, "is not a readable CIFAR-10 pickle batch"),
    "not a dict": (lambda good: pickle.dumps([1, 2, 3], protocol=2), "expected a pickled dict, found list"),
    "no labels": (lambda good: pickle.dumps({"data": make_images(1)[0].reshape(10, -1).numpy()}), r"expected keys 'data' \(numpy array\) and 'labels'"),
    "wrong shape": (lambda good: batch_entry(make_images(1)[0].reshape(10, -1)[:, :3000].numpy(), list(range(10))), r"'data' is uint8 \[10, 3000\], expected uint8 \[N, 3072\]"),
    "wrong dtype": (lambda good: batch_entry(make_images(1)[0].reshape(10, -1).float().numpy(), list(range(10))), r"'data' is float32 \[10, 3072\], expected uint8"),
    "labels out of range": (lambda good: batch_entry(make_images(1)[0].reshape(10, -1).numpy(), [10] * 10), "expected 10 labels in 0..9"),
    "labels too few": (lambda good: batch_entry(make_images(1)[0].reshape(10, -1).numpy(), [0] * 9), "expected 10 labels in 0..9"),
    "labels huge": (lambda good: batch_entry(make_images(1)[0].reshape(10, -1).numpy(), [2**70] * 10), "'labels' are not integers in 0..9"),
}


@pytest.mark.parametrize("damage", DAMAGED)
def test_damaged_copy_without_verify_names_the_file(tmp_path, damage):
    make, message = DAMAGED[damage]
    path = tiny_batches(tmp_path) / "data_batch_2"
    path.write_bytes(make(path.read_bytes()))
    with pytest.raises(DataError, match=f"{re.escape(str(path))}:? .*{message}"):
        load(tmp_path)


def test_batch_pickle_cannot_run_code(tmp_path):
    from numpy.testing._private.utils import runstring  # runs its argument: any numpy global is not safe

    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return runstring, (f"open({str(marker)!r}, 'w').close()", {})

    path = tiny_batches(tmp_path) / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": Exploit(), "labels": [0]}, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_1 is not a readable .*unexpected global numpy\.testing"):
        load(tmp_path)
    assert not marker.exists()


def test_bytes_keys_and_bytes_label_names(tmp_path):
    train, test = make_images(2), make_images(1, seed=1)
    folder = write_batches(tmp_path / "cifar-10-batches-py", train, test, bytes_keys=True)
    meta = {b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    assert torch.equal(load(tmp_path)[0], train[0])
    meta[b"label_names"] = meta[b"label_names"][::-1]
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    with pytest.raises(DataError, match=r"batches.meta: label_names \['truck', .* are not CIFAR-10's \['airplane'"):
        load(tmp_path)


def test_batches_pickled_with_any_protocol_load(tmp_path):
    folder = tiny_batches(tmp_path)
    images, labels = make_images(2)
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        entry = {"data": images[:4].reshape(4, -1).numpy(), "labels": labels[:4].tolist()}
        (folder / "data_batch_1").write_bytes(pickle.dumps(entry, protocol=protocol))
        assert torch.equal(load(tmp_path)[0], images), protocol


def test_unreadable_file_is_a_data_error(tmp_path, monkeypatch):
    folder = tiny_batches(tmp_path)

    def denied(path, md5=None):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr("labcnn.data.check_integrity", denied)
    with pytest.raises(DataError, match=re.escape(f"cannot read {folder / 'data_batch_1'} (Permission denied)")):
        load_cifar10(tmp_path)


# ---------------------------------------------------------------- archives


def test_truncated_or_incomplete_archive_leaves_nothing_behind(tmp_path, monkeypatch):
    train, test = make_images(2), make_images(1, seed=1)
    root = tmp_path / "root"
    root.mkdir()
    archive = write_archive(root, train, test)
    good = archive.read_bytes()
    for fraction in (0.1, 0.5, 0.9):
        archive.write_bytes(good[: int(len(good) * fraction)])
        for _ in range(2):  # a second run does not accept what the first one left
            with pytest.raises(DataError, match=f"could not extract {re.escape(str(archive))} .*truncated or damaged"):
                load(root)
            assert [p.name for p in root.iterdir()] == [archive.name]

    staging = tmp_path / "staging"  # a whole archive that lacks two of the release's files
    write_batches(staging / "cifar-10-batches-py", train, test)
    with tarfile.open(archive, "w:gz") as tar:
        for p in sorted((staging / "cifar-10-batches-py").iterdir())[2:]:
            tar.add(p, arcname=f"cifar-10-batches-py/{p.name}")
    with pytest.raises(DataError, match=r"lacks cifar-10-batches-py/data_batch_1, batches.meta: expected the CIFAR-10"):
        load(root)
    assert [p.name for p in root.iterdir()] == [archive.name]

    archive.write_bytes(good)  # Ctrl-C halfway through the extraction

    def interrupted(self, path, *args, **kwargs):
        (path / "cifar-10-batches-py").mkdir()
        (path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(tarfile.TarFile, "extractall", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load(root)
    assert [p.name for p in root.iterdir()] == [archive.name]


def test_leftover_of_a_killed_extraction_is_ignored(tmp_path):
    train, test = make_images(2), make_images(1, seed=1)
    archive = write_archive(tmp_path, train, test)
    leftover = tmp_path / ".labcnn-extract-killed" / "cifar-10-batches-py"  # as a SIGKILL leaves it
    leftover.mkdir(parents=True)
    (leftover / "data_batch_1").write_bytes(b"half")
    images, labels = load(tmp_path)
    assert torch.equal(images, train[0]) and torch.equal(labels, train[1])
    assert (archive.parent / "cifar-10-batches-py" / "test_batch").is_file()


# ---------------------------------------------------------------- where the data is


@pytest.mark.parametrize("layout", ["archive", "tree"])
@pytest.mark.parametrize("where", ["itself", "parent"])
def test_root_may_be_the_data_folder_or_its_parent(tmp_path, layout, where):
    train, _ = make_dataset(tmp_path / "outer" / "cifar", layout, train_per_class=2, test_per_class=1)
    root = tmp_path / "outer" / "cifar" if where == "itself" else tmp_path / "outer"
    assert torch.equal(load(root)[0], train[0])


# ---------------------------------------------------------------- image-folder trees


def test_image_tree_ignores_hidden_files_folders_and_litter(tmp_path):
    train, test = make_images(2), make_images(1, seed=1)
    write_tree(tmp_path, train, test)
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()  # would be an 11th class folder
    (tmp_path / "train" / "lost+found").mkdir()
    (tmp_path / "train" / "cat" / "._0000.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # would not decode
    (tmp_path / "train" / "cat" / "desktop.ini").write_text("[.ShellClassInfo]")  # not an image
    (tmp_path / "train" / "dog" / ".thumbnails").mkdir()
    images, labels = load(tmp_path)
    assert torch.equal(images, train[0]) and torch.equal(labels, train[1])


def remove_tree(path):
    for p in sorted(path.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    path.rmdir()


def alias_beside_name(root):
    (root / "test" / "airplane").rename(root / "test" / "plane")
    (root / "test" / "airplane").mkdir()


TREE_FAULTS = {
    "missing class": (lambda r: remove_tree(r / "test" / "frog"), r"test: missing class folders \['frog'\]; expected all of \['airplane'"),
    "missing split": (lambda r: remove_tree(r / "test"), r"missing folder .*test: expected train/<class>/ and test/<class>/"),
    "empty class": (lambda r: (r / "test" / "ship" / "0000.png").unlink(), r"test/ship holds no images"),
    "alias and name": (alias_beside_name, r"test: both airplane/ and plane/ name the class airplane"),
    "capitalised": (lambda r: (r / "test" / "cat").rename(r / "test" / "Cat"), r"test: class folders \['Cat', 'airplane'.*are not CIFAR-10's \['airplane'"),
    "not an image": (lambda r: (r / "test" / "cat" / "notes.txt").write_text("x"), r"unexpected .*test/cat/notes.txt: class folders may hold only"),
    "wrong size": (lambda r: write_png(torch.zeros(3, 16, 24, dtype=torch.uint8), r / "test" / "cat" / "0000.png"), r"test/cat/0000.png is 24x16 pixels; CIFAR-10 images are 32x32"),
}


@pytest.mark.parametrize("fault", TREE_FAULTS)
def test_image_tree_faults_are_named(tmp_path, fault):
    make_fault, message = TREE_FAULTS[fault]
    write_tree(tmp_path, make_images(1), make_images(1, seed=1))
    make_fault(tmp_path)
    with pytest.raises(DataError, match=message):
        load(tmp_path, train=False)


# ---------------------------------------------------------------- fuzzing


def test_fuzzed_batch_file_loads_or_is_a_data_error(tmp_path):
    path = tiny_batches(tmp_path) / "data_batch_1"
    good = path.read_bytes()
    rng = random.Random(0)
    rejected = 0
    for _ in range(50):
        path.write_bytes(corrupt(good, rng))
        try:
            assert_well_formed(*load(tmp_path))
        except DataError as e:
            assert str(path) in str(e) and "\n" not in str(e)
            rejected += 1
    assert 10 < rejected < 50  # the corruptions hit both parsing and pixel data


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_fuzzed_image_file_loads_or_is_a_data_error(tmp_path, suffix):
    write_tree(tmp_path, make_images(1), make_images(1, seed=1))
    path = tmp_path / "train" / "cat" / f"0000{suffix}"
    (tmp_path / "train" / "cat" / "0000.png").unlink()
    Image.fromarray(make_images(1)[0][3].permute(1, 2, 0).numpy()).save(path)
    good = path.read_bytes()
    rng = random.Random(1)
    rejected = 0
    for _ in range(40):
        path.write_bytes(corrupt(good, rng))
        for cache in tmp_path.glob(".labcnn-*"):
            cache.unlink()  # decode every time: a flipped byte keeps the size, maybe the mtime too
        try:
            assert_well_formed(*load(tmp_path))
        except DataError as e:
            assert str(path) in str(e) and "\n" not in str(e)
            rejected += 1
    assert rejected > 5


# ---------------------------------------------------------------- the command line on bad data


def cli_bad_batches(root):
    (tiny_batches(root) / "test_batch").write_bytes(b"")


def cli_bad_archive(root):
    archive = write_archive(root, make_images(1), make_images(1, seed=1))
    archive.write_bytes(archive.read_bytes()[:2000])


def cli_bad_tree(root):
    write_tree(root, make_images(1), make_images(1, seed=1))
    remove_tree(root / "train" / "horse")


@pytest.mark.parametrize("make_bad, message", [
    (cli_bad_batches, "error: {root}/cifar-10-batches-py/test_batch is not a readable CIFAR-10 pickle batch"),
    (cli_bad_archive, "error: could not extract {root}/cifar-10-python.tar.gz"),
    (cli_bad_tree, "error: {root}/train: missing class folders ['horse']"),
])
def test_cli_data_errors_are_one_line(tmp_path, capsys, make_bad, message):
    root = tmp_path / "data"
    root.mkdir()
    make_bad(root)
    args = ["train", "--data-dir", str(root), "--out", str(tmp_path / "run"), "--no-verify", "--device", "cpu"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(message.format(root=root)) and err.count("\n") == 1
    assert not (tmp_path / "run").exists()  # no training started on partial data


# ---------------------------------------------------------------- training faults


def test_divergence_names_epoch_and_step_and_keeps_the_last_checkpoint(tree_data, tmp_path, capsys, monkeypatch):
    root, _, _ = tree_data
    calls = []
    real = T.normalize

    def poisoned(x, mean, std):  # NaN inputs from the 3rd step of epoch 2
        calls.append(len(x))
        out = real(x, mean, std)
        return out * float("nan") if len(calls) >= 7 + 1 + 3 else out  # 7 steps and 1 test batch per epoch

    monkeypatch.setattr(T, "normalize", poisoned)
    out = tmp_path / "run"
    args = ["train", "--data-dir", str(root), "--out", str(out), "--epochs", "3", "--batch-size", "32", "--lr", "0.001", "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == (f"error: the training loss became nan at epoch 2, step 3; {out / 'checkpoint.pt'} (epoch 1) is kept. "
                   "Lower the learning rate and train into a new run folder\n")
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    assert len(json.loads((out / "history.json").read_text())) == 1
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "history.json"]


def test_enormous_learning_rate_diverges_with_a_clear_error(tree_data, tmp_path):
    _, train, test = tree_data
    with pytest.raises(TrainingDiverged, match=r"the training loss became (nan|inf) at epoch 1, step \d+; no checkpoint was written"):
        fit(make_config(epochs=1, batch_size=32, lr=1e30), train, test, run_dir=tmp_path, device="cpu", log=lambda s: None)
    assert list(tmp_path.iterdir()) == []


def test_full_disk_keeps_the_previous_checkpoint(tree_data, tmp_path, monkeypatch):
    _, train, test = tree_data
    real_save, disk = torch.save, {"full": False}

    def save(obj, f, *args, **kwargs):
        if not disk["full"]:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"the first bytes of a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def log(line):
        disk["full"] |= line.startswith("epoch 2/")

    monkeypatch.setattr(torch, "save", save)
    config = make_config(**QUICK)
    with pytest.raises(CheckpointError, match=r"could not write .*checkpoint.pt \(No space left on device\); the previous checkpoint.pt is kept"):
        fit(config, train, test, run_dir=tmp_path, device="cpu", log=log)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "history.json"]  # no .tmp left
    disk["full"] = False
    lines = []
    _, history = fit(config, train, test, run_dir=tmp_path, device="cpu", log=lines.append)
    assert "resuming: 1 of 3 epochs restored" in " ".join(lines) and len(history) == 3


def test_unusable_run_folder_fails_before_training(tree_data, tmp_path):
    _, train, test = tree_data
    (tmp_path / "run").write_text("a file, not a folder")
    lines = []
    with pytest.raises(CheckpointError, match=re.escape(f"cannot create the run folder {tmp_path / 'run'}")):
        fit(make_config(**QUICK), train, test, run_dir=tmp_path / "run", device="cpu", log=lines.append)
    assert lines == []  # not after an epoch of training


def test_history_json_is_rewritten_on_resume(tree_data, tmp_path):
    _, train, test = tree_data
    config = make_config(**{**QUICK, "epochs": 1})
    fit(config, train, test, run_dir=tmp_path, device="cpu", log=lambda s: None)
    (tmp_path / "history.json").write_text("[]\n")  # as a kill between the checkpoint and history.json leaves it
    fit(config, train, test, run_dir=tmp_path, device="cpu", log=lambda s: None)
    assert json.loads((tmp_path / "history.json").read_text()) == load_checkpoint(tmp_path / "checkpoint.pt")["history"]


def wait_for_epoch_lines(proc, after: int, count: int) -> list[float]:
    """Read ``proc``'s output until ``count`` epochs past ``after`` are logged; their read times."""
    times = []
    for line in proc.stdout:
        if line.startswith("epoch ") and int(line.split()[1].split("/")[0]) > after:
            times.append(time.perf_counter())
            if len(times) == count:
                return times
    pytest.fail(f"the run ended before {count} new epochs (exit status {proc.wait()})")


def start_train(root, out, epochs):
    command = [sys.executable, "-m", "labcnn", "train", "--data-dir", str(root), "--out", str(out), "--epochs", str(epochs),
               "--subset", "160", "--batch-size", "8", "--lr", "0.002", "--seed", "3", "--device", "cpu"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    watchdog = threading.Timer(120, proc.kill)  # a hung run fails the test instead of blocking it
    watchdog.daemon = True
    watchdog.start()
    return proc


def test_ctrl_c_ends_with_one_line_saying_where_to_resume(tree_data, tmp_path):
    root, _, _ = tree_data
    out = tmp_path / "run"
    command = [sys.executable, "-m", "labcnn", "train", "--data-dir", str(root), "--out", str(out), "--epochs", "1000",
               "--subset", "80", "--batch-size", "8", "--device", "cpu"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        wait_for_epoch_lines(proc, 0, 2)  # epoch 1 is saved before epoch 2 is logged
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130
    assert err.strip() == f"interrupted: completed epochs are saved in {out}; run the same command to resume"
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["epoch"] == len(state["history"]) >= 1


def test_killed_training_resumes_exactly(tmp_path):
    """SIGKILL a real training run at 5 seeded random moments, resume, compare with an uninterrupted run."""
    root = tmp_path / "data"
    make_dataset(root, "tree")
    load(root), load(root, train=False)  # write the decode caches before two processes read them
    epochs, rng = 12, random.Random(3)
    reference = start_train(root, tmp_path / "reference", epochs)  # runs alongside the killed ones
    out, snapshots, epoch_seconds = tmp_path / "killed", [], None
    for kill in range(5):
        done = len(snapshots[-1]) if snapshots else 0
        proc = start_train(root, out, epochs)
        times = wait_for_epoch_lines(proc, done, 1 if epoch_seconds else 2)
        epoch_seconds = epoch_seconds or times[1] - times[0]
        # An epoch is logged just before its checkpoint is written: the short waits (kills 0, 2
        # and 4) mostly land in that write, the long ones in training or evaluation.
        time.sleep(rng.uniform(0, 0.1 if kill % 2 == 0 else 1.2) * epoch_seconds)
        proc.kill()
        proc.wait()
        state = load_checkpoint(out / "checkpoint.pt")  # always a complete checkpoint...
        assert state["epoch"] == len(state["history"]) >= done  # ...of an earlier epoch
        on_disk = json.loads((out / "history.json").read_text())
        assert on_disk == state["history"][: len(on_disk)] and len(on_disk) >= state["epoch"] - 1
        snapshots.append(state["history"])
    done = len(snapshots[-1])
    proc = start_train(root, out, epochs)
    printed, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, printed
    assert f"resuming: {done} of {epochs} epochs restored" in printed
    assert f"epochs restored from {out / 'checkpoint.pt'}\nepoch {done + 1}/{epochs}  train loss" in printed
    printed_reference, _ = reference.communicate(timeout=120)
    assert reference.returncode == 0, printed_reference
    expected = json.loads((tmp_path / "reference" / "history.json").read_text())
    resumed = json.loads((out / "history.json").read_text())
    assert len(expected) == epochs and without_times(resumed) == without_times(expected)
    for history in snapshots:
        assert without_times(history) == without_times(expected[: len(history)])
    final, reference_state = load_checkpoint(out / "checkpoint.pt"), load_checkpoint(tmp_path / "reference" / "checkpoint.pt")
    assert all(torch.equal(final["model"][k], v) for k, v in reference_state["model"].items())
    assert not list(out.glob("*.tmp"))


# ---------------------------------------------------------------- checkpoints


def checkpoint_state(**changes):
    state = {
        "format": CHECKPOINT_FORMAT, "model": LabCNN().state_dict(), "optimizer": {}, "scheduler": None, "epoch": 0,
        "history": [], "config": asdict(make_config()), "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3},
    }
    return {k: v for k, v in {**state, **changes}.items() if v is not ...}


class Payload:
    def __reduce__(self):  # what a malicious file would do on an unsafe load
        return os.system, ("echo unsafe",)


def write_bad(path, kind):
    if kind in ("truncated", "garbage"):
        torch.save(checkpoint_state(), path)
        blob = path.read_bytes()
        path.write_bytes(blob[: len(blob) // 2] if kind == "truncated" else bytes(random.Random(0).randbytes(2000)))
    else:
        torch.save({
            "python object": checkpoint_state(history=[Payload()]),
            "plain state dict": LabCNN().state_dict(),
            "other model": checkpoint_state(model=torch.nn.Linear(2, 2).state_dict()),
            "incomplete": checkpoint_state(history=...),
        }[kind], path)


BAD_CHECKPOINTS = {
    "truncated": r"is not a readable checkpoint \(RuntimeError: PytorchStreamReader failed reading zip archive: failed finding central directory\): it is truncated",
    "garbage": r"is not a readable checkpoint \(UnpicklingError: not a torch checkpoint\): it is truncated or damaged",
    "python object": r"holds Python objects besides tensors \(refused by torch.load\(weights_only=True\)\)",
    "plain state dict": r"is not a labcnn checkpoint \(expected format 'labcnn-checkpoint-1'\)",
    "other model": r"holds weights of another model, not LabCNN's \(Error\(s\) in loading state_dict for LabCNN: Missing key\(s\)",
    "incomplete": r"lacks \['history'\]: expected a complete labcnn-checkpoint-1 checkpoint",
}


@pytest.mark.parametrize("kind", BAD_CHECKPOINTS)
def test_bad_checkpoints_give_one_clear_line(tmp_path, capsys, kind):
    path = tmp_path / "checkpoint.pt"
    write_bad(path, kind)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))} {BAD_CHECKPOINTS[kind]}") as info:
        load_model(path)
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
        torch.save(checkpoint_state(model=torch.nn.Linear(2, 2).state_dict(), config=asdict(config)), tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=BAD_CHECKPOINTS[kind]):
        fit(config, train, test, run_dir=tmp_path, device="cpu", log=lambda s: None)


def test_gpu_checkpoint_loads_on_a_cpu_only_machine(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    with monkeypatch.context() as m:  # write it as a CUDA machine would: every storage tagged cuda:0
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(checkpoint_state(), path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    state = load_checkpoint(path)
    assert all(t.device.type == "cpu" for t in state["model"].values())
    model, config = load_model(path)
    assert next(model.parameters()).device.type == "cpu" and config["epochs"] == 50


# ---------------------------------------------------------------- batch sizes


def test_last_training_batch_of_one_sample(tree_data):
    _, train, test = tree_data
    config = make_config(epochs=1, batch_size=8, subset=17, lr=0.001)  # batches of 8, 8 and 1
    _, history = fit(config, train, test, device="cpu", log=lambda s: None)
    assert torch.isfinite(torch.tensor(history[0]["train_loss"]))


def test_evaluate_leaves_an_eval_mode_model_in_eval_mode(tree_data):
    _, _, test = tree_data
    model = LabCNN().train()
    model(torch.randn(8, 3, 32, 32))  # move the BatchNorm running statistics away from their init
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = evaluate(model, *test, batch_size=1, flip_tta=True)
    second = evaluate(model, *test, batch_size=len(test[1]), flip_tta=True)
    assert not model.training and not any(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert second["loss"] == pytest.approx(first["loss"], rel=1e-5) and torch.equal(first["predictions"], second["predictions"])
