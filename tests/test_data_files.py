"""The official files (labcnn.cifar_files): batches and archive, checked, and every damage named."""
import errno
import hashlib
import io
import pickle
import random
import re
import tarfile

import pytest
import torch
from synthetic import (assert_well_formed, corrupt, load, make_dataset, make_images, pickle_batch, tiny_batches, write_archive,
                       write_batches)
from torchvision.datasets import CIFAR10

from labcnn.data import CLASSES, load_cifar10
from labcnn.errors import DataError

RELEASE = sorted([*(name for name, _ in CIFAR10.train_list + CIFAR10.test_list), "batches.meta"])


# ---------------------------------------------------------------- batches


def test_official_layout_is_verified_by_default(tmp_path):
    make_dataset(tmp_path, "batches")
    with pytest.raises(DataError, match="does not match the official CIFAR-10 release"):
        load_cifar10(tmp_path)
    with pytest.warns(UserWarning, match="without checking MD5s"):
        load_cifar10(tmp_path, verify=False)


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

    monkeypatch.setattr("labcnn.cifar_files.check_integrity", denied)
    with pytest.raises(DataError, match=re.escape(f"cannot read {folder / 'data_batch_1'} (Permission denied)")):
        load_cifar10(tmp_path)


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


# ---------------------------------------------------------------- the archive


def test_archive_is_verified_then_extracted_next_to_itself(tmp_path):
    make_dataset(tmp_path, "archive")
    with pytest.raises(DataError, match="does not match"):
        load_cifar10(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-python.tar.gz"]
    load(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    assert sorted(p.name for p in (tmp_path / "cifar-10-batches-py").iterdir()) == RELEASE


def test_archive_members_outside_the_release_folder_are_skipped(tmp_path):
    train, test = make_images(2), make_images(1, seed=1)
    write_batches(tmp_path / "staging" / "cifar-10-batches-py", train, test)
    (tmp_path / "staging" / "README").write_text("not CIFAR-10")
    (tmp_path / "staging" / "cifar-10-batches-py" / "readme.html").write_text("<p>")
    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "staging", arcname=".")
    assert torch.equal(load(root)[0], train[0])
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    assert sorted(p.name for p in (root / "cifar-10-batches-py").iterdir()) == sorted([*RELEASE, "readme.html"])


@pytest.mark.parametrize("with_filter", [True, False], ids=["data-filter", "older-python"])
@pytest.mark.parametrize("member", ["../escaped.txt", "cifar-10-batches-py/../../escaped.txt", "link"])
def test_archive_members_escaping_the_folder_are_refused(tmp_path, monkeypatch, with_filter, member):
    if not with_filter:  # Pythons before 3.10.12 / 3.11.4 have no extraction filters
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    archive = tmp_path / "root" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo(member if member != "link" else "cifar-10-batches-py/data_batch_1")
        if member == "link":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        else:
            info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(DataError, match="cifar-10-python.tar.gz: refusing a member"):
        load(archive.parent)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["cifar-10-python.tar.gz", "root"]


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
        (path / "data_batch_1").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(tarfile.TarFile, "extractall", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load(root)
    assert [p.name for p in root.iterdir()] == [archive.name]


def test_leftover_of_a_killed_extraction_is_ignored(tmp_path):
    train, test = make_images(2), make_images(1, seed=1)
    archive = write_archive(tmp_path, train, test)
    leftover = tmp_path / ".cifar-10-batches-py.killed.tmp"  # as a SIGKILL leaves fileio.staged_dir's folder
    leftover.mkdir()
    (leftover / "data_batch_1").write_bytes(b"half")
    images, labels = load(tmp_path)
    assert torch.equal(images, train[0]) and torch.equal(labels, train[1])
    assert (archive.parent / "cifar-10-batches-py" / "test_batch").is_file()


def test_a_folder_in_the_way_of_the_extraction_is_named(tmp_path):
    archive = write_archive(tmp_path, make_images(1), make_images(1, seed=1))
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "notes.txt").write_text("not a batch file")
    with pytest.raises(DataError, match=re.escape(
            f"cannot extract {archive}: {tmp_path / 'cifar-10-batches-py'} is in the way (a folder without batch files); move or delete it")):
        load(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    (tmp_path / "cifar-10-batches-py" / "notes.txt").unlink()  # an empty folder is replaced
    load(tmp_path)
