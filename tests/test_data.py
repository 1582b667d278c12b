"""labcnn.data: every layout loads the same tensors, found by one search rule; damage, refusals,
unwritable folders and failed downloads each end in one clear line and leave nothing behind."""

import errno
import hashlib
import io
import os
import pickle
import random
import re
import shutil
import socket
import stat
import tarfile
import threading
import time
import warnings
import zipfile
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from synthetic import (
    assert_well_formed,
    corrupt,
    load,
    make_dataset,
    make_images,
    pickle_batch,
    tiny_batches,
    write_archive,
    write_batches,
    write_png,
    write_tree,
)
from torchvision.datasets import CIFAR10

from labcnn import DataError, WriteError, data, harness
from labcnn.data import CLASSES, load_cifar10
from labcnn.settings import make_config

RELEASE = sorted([*(name for name, _ in CIFAR10.train_list + CIFAR10.test_list), "batches.meta"])


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def sha(loaded) -> str:
    images, labels = loaded
    return hashlib.sha256(images.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()


def put_layout(folder, layout):
    """Write a small data set so that ``folder`` directly holds ``layout`` (for batches, the
    batch files; the folder's name is not cifar-10-batches-py). Returns ``train``."""
    train, test = make_images(2), make_images(1, seed=1)
    if layout == "batches":
        write_batches(folder, train, test)
    else:
        make_dataset(folder, layout, train_per_class=2, test_per_class=1)
    return train


def small(base, layout):
    return make_dataset(base, layout, train_per_class=2, test_per_class=1)


# ---------------------------------------------------------------- layouts and the search rule


def test_every_layout_loads_the_same_tensors(tmp_path, layout):
    train, test = make_dataset(tmp_path, layout)
    for split, expected in ((True, train), (False, test)):
        images, labels = load(tmp_path, split)
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64
        assert images.shape == (len(expected[1]), 3, 32, 32)
        assert torch.equal(images, expected[0]) and torch.equal(labels, expected[1])


def test_batches_equal_torchvision(tmp_path, monkeypatch):
    make_dataset(tmp_path, "batches")
    # torchvision only reads files with the official MD5s: let it read the synthetic copy.
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a: True)
    for train in (True, False):
        reference = torchvision.datasets.CIFAR10(tmp_path, train=train)
        images, labels = load(tmp_path, train)
        assert torch.equal(images, torch.from_numpy(reference.data).permute(0, 3, 1, 2))
        assert labels.tolist() == reference.targets
        assert reference.classes == list(CLASSES)


@pytest.mark.parametrize("where", ["data folder", "its parent"])
def test_root_may_be_the_data_folder_or_its_parent(tmp_path, layout, where):
    folder = tmp_path / "outer" / "data"
    train = put_layout(folder, layout)
    assert torch.equal(load(folder if where == "data folder" else folder.parent)[0], train[0])


def test_a_folder_named_like_the_release_is_searched_like_any_other(tmp_path, layout):
    """d/cifar-10-batches-py holding its data one level down is not a batches folder by name."""
    root = tmp_path / "d" / "cifar-10-batches-py"
    train, _ = small(root, layout)
    assert torch.equal(load(root)[0], train[0])
    inner = tmp_path / "e" / "cifar-10-batches-py"
    train = put_layout(inner / "copy", layout)
    assert torch.equal(load(inner)[0], train[0])


def test_the_release_folder_is_found_where_its_archive_extracts(tmp_path):
    train, _ = small(tmp_path / "a" / "b", "batches")
    assert torch.equal(load(tmp_path / "a")[0], train[0])
    train, _ = small(tmp_path / "c" / "d", "archive")
    load(tmp_path / "c")
    (tmp_path / "c" / "d" / "cifar-10-python.tar.gz").unlink()  # not extracted again
    assert torch.equal(load(tmp_path / "c")[0], train[0])


def test_data_one_level_deeper_than_searched_is_named(tmp_path, layout):
    deeper = tmp_path / "x" / "y"
    put_layout(deeper, layout)
    for download in (False, True):  # found locally: never downloaded
        with pytest.raises(DataError) as info:
            load(tmp_path, download=download, url="http://127.0.0.1:9/none")
        assert str(info.value) == (
            f"found CIFAR-10 at {deeper}, one level deeper than searched: pass --data-dir {deeper}"
        )
    load(deeper)  # the advice works


def test_data_two_levels_deeper_is_not_found(tmp_path, layout):
    put_layout(tmp_path / "a" / "b" / "c", layout)
    with pytest.raises(DataError, match=f"^no CIFAR-10 data found in {tmp_path} "):
        load(tmp_path)


def test_nothing_found_names_the_folders_searched_and_the_download(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "cifar-10-batches-py").mkdir()  # named like the release, holding nothing
    (tmp_path / "notes.zip").write_bytes(zip_of({"notes/readme.txt": b"hello"}))  # not a layout
    with pytest.raises(DataError) as info:
        load_cifar10(tmp_path)
    searched = f"{tmp_path}, {tmp_path / 'cifar-10-batches-py'}, {tmp_path / 'empty'}"
    assert str(info.value).startswith(
        f"no CIFAR-10 data found in {tmp_path} (searched: {searched}). Put cifar-10-batches-py/, "
        "cifar-10-python.tar.gz or an image tree train/<class>/, test/<class>/ there, "
    )
    assert str(info.value).endswith(f"or pass --download (download=True) to get {CIFAR10.url}")
    with pytest.raises(DataError, match=re.escape("to get http://mirror.example/c.tgz")):
        load_cifar10(tmp_path, url="http://mirror.example/c.tgz")


def test_official_layouts_take_precedence_over_an_image_tree(tmp_path):
    """Layout before folder order: the batches in the last folder win, then the archive."""
    tree_train, _ = small(tmp_path / "a_tree", "tree")
    archive_train, _ = make_dataset(tmp_path / "b_archive", "archive", 3, 1, seed=5)
    batches_train, _ = make_dataset(tmp_path / "c_batches", "batches", 1, 1, seed=7)
    assert torch.equal(load(tmp_path)[0], batches_train[0])
    shutil.rmtree(tmp_path / "c_batches")
    assert torch.equal(load(tmp_path)[0], archive_train[0])
    shutil.rmtree(tmp_path / "b_archive")
    assert torch.equal(load(tmp_path)[0], tree_train[0])


def test_tilde_and_relative_paths_expand(tmp_path, monkeypatch, layout):
    train, _ = small(tmp_path / "d", layout)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert torch.equal(load("~/d")[0], train[0])
    assert torch.equal(load("d")[0], train[0])


def test_constants_are_torchvisions():
    """Written out so that importing labcnn.data does not import torchvision (seconds)."""
    assert (
        CIFAR10.url,
        CIFAR10.filename,
        CIFAR10.tgz_md5,
        CIFAR10.base_folder,
    ) == (data.URL, data.ARCHIVE, data.ARCHIVE_MD5, data.BATCHES_DIR)
    names = [name for name, _ in CIFAR10.train_list + CIFAR10.test_list]
    assert list(data.FILES) == [*names, CIFAR10.meta["filename"]]


# ---------------------------------------------------------------- the release's batch files


def test_official_layout_is_verified_by_default(tmp_path):
    make_dataset(tmp_path, "batches")
    with pytest.raises(
        DataError,
        match=r"data_batch_1 does not match the official CIFAR-10 "
        r"release \(MD5 .*pass --no-verify \(verify=False\)\.$",
    ):
        load_cifar10(tmp_path)
    with pytest.warns(UserWarning, match="without checking MD5s"):
        load_cifar10(tmp_path, verify=False)


def test_missing_batch_file_is_named(tmp_path):
    (tiny_batches(tmp_path) / "data_batch_1").unlink()
    for verify in (True, False):
        with pytest.raises(DataError, match=r"missing CIFAR-10 file .*data_batch_1: expected"):
            load(tmp_path, verify=verify)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DataError, match=r"missing CIFAR-10 file .*test_batch: expected"):
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
    with pytest.raises(DataError, match=r"data_batch_1 does not match the official CIFAR-10"):
        load_cifar10(tmp_path)
    (folder / "data_batch_1").write_bytes((folder / "data_batch_2").read_bytes()[:100])
    with pytest.raises(DataError, match=r"data_batch_1 does not match the official"):
        load_cifar10(tmp_path)


def batch_entry(data, labels):
    return pickle.dumps({"data": data, "labels": labels}, protocol=2)


TEN = make_images(1)[0].reshape(10, -1)
SHAPES = r"expected 'data' uint8 \[N, 3072\] and 'labels' N integers in 0..9, found keys"
DAMAGED = {
    "truncated": (lambda good: good[: len(good) // 2], "is not a readable CIFAR-10 pickle"),
    "not a pickle": (lambda good: b"\x89PNG no pickle" * 10, "is not a readable CIFAR-10 pickle"),
    "not a dict": (
        lambda good: pickle.dumps([1, 2, 3], protocol=2),
        r"pickle batch \(a dict\): 'list' object has no attribute 'items'",
    ),
    "no labels": (lambda good: pickle.dumps({"data": TEN.numpy()}), SHAPES + r" \['data'\]"),
    "no data": (lambda good: pickle.dumps({"labels": [0] * 10}), SHAPES + r" \['labels'\]"),
    "wrong shape": (lambda good: batch_entry(TEN[:, :3000].numpy(), list(range(10))), SHAPES),
    "wrong dtype": (lambda good: batch_entry(TEN.float().numpy(), list(range(10))), SHAPES),
    "labels out of range": (lambda good: batch_entry(TEN.numpy(), [10] * 10), SHAPES),
    "labels too few": (lambda good: batch_entry(TEN.numpy(), [0] * 9), SHAPES),
    "labels huge": (lambda good: batch_entry(TEN.numpy(), [2**70] * 10), SHAPES),
    "labels not numbers": (lambda good: batch_entry(TEN.numpy(), ["cat"] * 10), SHAPES),
}


@pytest.mark.parametrize("damage", DAMAGED)
def test_damaged_copy_without_verify_names_the_file(tmp_path, damage):
    make, message = DAMAGED[damage]
    path = tiny_batches(tmp_path) / "data_batch_2"
    path.write_bytes(make(path.read_bytes()))
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}:? .*{message}") as info:
        load(tmp_path)
    assert "\n" not in str(info.value)


def test_batch_pickle_cannot_run_code(tmp_path):
    from numpy.testing._private.utils import runstring  # runs its argument: no numpy global is safe

    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return runstring, (f"open({str(marker)!r}, 'w').close()", {})

    path = tiny_batches(tmp_path) / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": Exploit(), "labels": [0]}, protocol=2))
    with pytest.raises(
        DataError,
        match=r"data_batch_1 is not a readable .*unexpected global numpy"
        r"\.testing",
    ):
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
    with pytest.raises(
        DataError,
        match=r"batches.meta: label_names \[b'truck', .* are not "
        r"CIFAR-10's \['airplane'",
    ):
        load(tmp_path)
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": 10}, protocol=2))
    with pytest.raises(DataError, match=r"batches.meta: label_names 10 are not CIFAR-10's"):
        load(tmp_path)


def test_batches_pickled_with_any_protocol_load(tmp_path):
    folder = tiny_batches(tmp_path)
    images, labels = make_images(2)
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        entry = {"data": images[:4].reshape(4, -1).numpy(), "labels": labels[:4].tolist()}
        (folder / "data_batch_1").write_bytes(pickle.dumps(entry, protocol=protocol))
        assert torch.equal(load(tmp_path)[0], images), protocol


def test_unreadable_file_is_a_data_error_naming_it(tmp_path, monkeypatch):
    folder = tiny_batches(tmp_path)

    def denied(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(Path, "read_bytes", denied)  # while checking MD5s
    with pytest.raises(DataError) as info:
        load_cifar10(tmp_path)
    assert str(info.value) == f"cannot read {folder / 'data_batch_1'} (Permission denied)"
    monkeypatch.undo()
    real_open = open

    def failing(path, *args, **kwargs):  # a disk that fails while reading
        if str(path).endswith("data_batch_3"):
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", failing)
    with pytest.raises(DataError, match=re.escape(f"{folder / 'data_batch_3'} (Input/output")):
        load(tmp_path)


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


# ---------------------------------------------------------------- archives


def zip_of(files: dict) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        for name, content in files.items():
            z.writestr(name, content)
    return buffer.getvalue()


def release_files(staging: Path, train, test) -> dict:
    """The release's files as ``{name: bytes}`` (written to ``staging``, then removed)."""
    write_batches(staging, train, test)
    files = {p.name: p.read_bytes() for p in staging.iterdir()}
    shutil.rmtree(staging)
    return files


def test_archive_is_verified_then_extracted_next_to_itself(tmp_path):
    make_dataset(tmp_path, "archive")
    with pytest.raises(DataError, match="cifar-10-python.tar.gz does not match"):
        load_cifar10(tmp_path)
    assert entries(tmp_path) == ["cifar-10-python.tar.gz"]
    load(tmp_path)
    assert entries(tmp_path) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    assert entries(tmp_path / "cifar-10-batches-py") == RELEASE


@pytest.mark.parametrize(
    "name",
    ["cifar-10-python.tar", "cifar-10-python (1).tar.gz", "cifar-10-python.tar.gz.crdownload"],
)
def test_archives_as_browsers_leave_them(tmp_path, name):
    """Safari un-gzips to .tar; a second download gets " (1)"; a cut download stays partial."""
    train, test = make_images(2), make_images(1, seed=1)
    archive = write_archive(tmp_path, train, test)
    if name.endswith(".tar"):
        with tarfile.open(archive) as tar, tarfile.open(tmp_path / name, "w") as out:
            for member in tar:
                out.addfile(member, tar.extractfile(member))
        archive.unlink()
    elif name.endswith(".crdownload"):
        archive.rename(tmp_path / name)
        (tmp_path / name).write_bytes((tmp_path / name).read_bytes()[:1500])
        with pytest.raises(
            DataError,
            match=f"could not extract {re.escape(str(tmp_path / name))}"
            r" \(.*\); it is truncated or damaged",
        ):
            load(tmp_path)
        assert entries(tmp_path) == [name]
        return
    else:
        archive.rename(tmp_path / name)
    assert sha(load(tmp_path)) == sha(train)
    assert entries(tmp_path) == ["cifar-10-batches-py", name]


def test_the_archive_named_as_released_comes_first(tmp_path):
    train, test = make_images(2), make_images(1, seed=1)
    write_archive(tmp_path, train, test)
    (tmp_path / "cifar-10-python (1).tar.gz").write_bytes(b"\x1f\x8b damaged")
    assert sha(load(tmp_path)) == sha(train)


@pytest.mark.parametrize("inside", ["cifar-10-batches-py/", "archive/cifar-10-batches-py/"])
def test_a_kaggle_zip_of_the_release_loads(tmp_path, inside):
    train, test = make_images(2), make_images(1, seed=1)
    files = {inside + n: b for n, b in release_files(tmp_path / "s", train, test).items()}
    (tmp_path / "archive.zip").write_bytes(zip_of({**files, "README": b"not CIFAR-10"}))
    assert sha(load(tmp_path)) == sha(train)
    assert entries(tmp_path) == ["archive.zip", "cifar-10-batches-py"]
    assert entries(tmp_path / "cifar-10-batches-py") == RELEASE


def test_zips_holding_no_release(tmp_path):
    """A zipped image tree is named with what to do; a zip of other things is not a layout."""
    root = tmp_path / "root"
    root.mkdir()
    png = io.BytesIO()
    Image.new("RGB", (32, 32)).save(png, format="PNG")
    (root / "archive.zip").write_bytes(zip_of({"cifar10/train/cat/0.png": png.getvalue()}))
    with pytest.raises(DataError) as info:
        load(root)
    assert str(info.value) == (
        f"{root / 'archive.zip'} lacks cifar-10-batches-py/data_batch_1, data_batch_2, "
        "data_batch_3, data_batch_4, data_batch_5, test_batch, batches.meta: expected the CIFAR-10"
        " python archive (an image tree: unpack it and pass its folder)"
    )
    assert entries(root) == ["archive.zip"]
    (root / "archive.zip").write_bytes(zip_of({"photos/holiday.txt": b"x"}))
    train, _ = small(root, "tree")
    assert sha(load(root)) == sha(train)
    (root / "archive.zip").write_bytes(b"PK\x03\x04 damaged")  # an unreadable zip is named
    with pytest.raises(
        DataError,
        match=f"could not extract {re.escape(str(root))}/archive.zip "
        r"\(BadZipFile",
    ):
        load(root)


def test_a_web_page_or_other_file_saved_as_the_archive_is_named(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(b"\n<!DOCTYPE html>\n<html><body>Sign in</body></html>")
    for verify in (True, False):  # named before its MD5 is checked
        with pytest.raises(DataError) as info:
            load(tmp_path, verify=verify)
        assert str(info.value) == (
            f"{archive} is a web page (HTML) (it starts with "
            f"{archive.read_bytes()[:16]!r}), not the CIFAR-10 archive"
        )
    archive.write_bytes(b'{"error": "quota"}')
    with pytest.raises(DataError, match=r"is no archive \(it starts with b'\{\"error"):
        load(tmp_path)
    assert entries(tmp_path) == ["cifar-10-python.tar.gz"]


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
    assert entries(root) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    assert entries(root / "cifar-10-batches-py") == sorted([*RELEASE, "readme.html"])


def old_extractall(self, path=".", members=None, *, numeric_owner=False):
    """TarFile.extractall of Pythons before 3.10.12 and 3.11.4: no ``filter``."""


@pytest.mark.parametrize("python", ["data-filter", "older-python"])
@pytest.mark.parametrize(
    "member",
    [
        "../escaped.txt",
        "cifar-10-batches-py/../../escaped.txt",
        "link",
        "cifar-10-batches-py/sub/../../escaped.txt",
    ],
)
def test_archive_members_escaping_the_folder_are_refused(tmp_path, monkeypatch, python, member):
    if python == "older-python":  # no filters: nothing is extracted
        monkeypatch.setattr(tarfile.TarFile, "extractall", old_extractall)
    archive = tmp_path / "root" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo(member if member != "link" else "cifar-10-batches-py/data_batch_1")
        if member == "link":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        else:
            info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(DataError, match=f"^{re.escape(str(archive))}: refusing a member") as info:
        load(archive.parent)
    assert "3.10.12" in str(info.value) or python == "data-filter"
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
            with pytest.raises(
                DataError,
                match=f"could not extract {re.escape(str(archive))} "
                r"\(.*; it is truncated or damaged$",
            ):
                load(root)
            assert entries(root) == [archive.name]

    staging = tmp_path / "staging"  # a whole archive that lacks two of the release's files
    write_batches(staging / "cifar-10-batches-py", train, test)
    with tarfile.open(archive, "w:gz") as tar:
        for p in sorted((staging / "cifar-10-batches-py").iterdir())[2:]:
            tar.add(p, arcname=f"cifar-10-batches-py/{p.name}")
    with pytest.raises(
        DataError,
        match=r"lacks cifar-10-batches-py/data_batch_1, batches.meta: "
        "expected the CIFAR-10",
    ):
        load(root)
    assert entries(root) == [archive.name]

    archive.write_bytes(good)  # Ctrl-C halfway through the extraction

    def interrupted(self, path, *args, **kwargs):
        (Path(path) / "data_batch_1").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(tarfile.TarFile, "extractall", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load(root)
    assert entries(root) == [archive.name]


def test_leftover_of_a_killed_extraction_is_ignored(tmp_path):
    train, test = make_images(2), make_images(1, seed=1)
    write_archive(tmp_path, train, test)
    leftover = tmp_path / ".cifar-10-batches-py.killed.tmp"  # as SIGKILL leaves staged_dir's
    leftover.mkdir()
    (leftover / "data_batch_1").write_bytes(b"half")
    assert sha(load(tmp_path)) == sha(train)
    assert (tmp_path / "cifar-10-batches-py" / "test_batch").is_file()


def test_a_folder_in_the_way_of_the_extraction_is_named(tmp_path):
    archive = write_archive(tmp_path, make_images(1), make_images(1, seed=1))
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "notes.txt").write_text("not a batch file")
    with pytest.raises(DataError) as info:
        load(tmp_path)
    assert str(info.value) == (
        f"cannot extract {archive}: {tmp_path / 'cifar-10-batches-py'} is in"
        " the way (a folder without batch files); move or delete it"
    )
    assert entries(tmp_path) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    (tmp_path / "cifar-10-batches-py" / "notes.txt").unlink()  # an empty folder is replaced
    load(tmp_path)


def test_a_full_disk_during_extraction_names_the_folder(tmp_path, monkeypatch):
    archive = write_archive(tmp_path, make_images(1), make_images(1, seed=1))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tarfile.TarFile, "makefile", full)
    with pytest.raises(WriteError) as info:
        load(tmp_path)
    assert str(info.value) == (
        f"cannot write {tmp_path} (No space left on device): extract the "
        f"archive elsewhere (tar -C DIR -xf {archive}) and pass that DIR "
        "(command line: --data-dir DIR)"
    )
    assert entries(tmp_path) == ["cifar-10-python.tar.gz"]


# ---------------------------------------------------------------- image trees


def test_image_tree_cache_is_used_and_refreshed(tmp_path, monkeypatch):
    train, _ = make_dataset(tmp_path, "tree")
    load(tmp_path)
    caches = list(tmp_path.glob(".labcnn-train-*.pt"))
    assert len(caches) == 1
    monkeypatch.setattr(data, "decode", lambda p: pytest.fail("decoded although cached"))
    assert torch.equal(load(tmp_path)[0], train[0])
    monkeypatch.undo()
    changed = train[0][0].clone()
    changed[:] = 7
    write_png(changed, tmp_path / "train" / "airplane" / "0000.png")
    images, _ = load(tmp_path)
    assert torch.equal(images[0], changed)
    now = list(tmp_path.glob(".labcnn-train-*.pt"))
    assert now != caches and len(now) == 1
    assert [p for p in entries(tmp_path) if not p.startswith(".labcnn-")] == ["test", "train"]
    now[0].write_bytes(b"damaged")  # decoded again, with one warning, and replaced
    with pytest.warns(UserWarning, match="ignoring unreadable cache"):
        assert torch.equal(load_cifar10(tmp_path)[0], images)
    assert torch.load(now[0])["images"].equal(images)


def test_image_tree_aliases_and_litter(tmp_path):
    train, test = make_images(2), make_images(1, seed=1)
    write_tree(tmp_path, train, test, names=["plane", "car", *CLASSES[2:]])
    (tmp_path / "train" / "cat" / ".DS_Store").write_bytes(b"x")
    (tmp_path / "train" / "__MACOSX").mkdir()
    (tmp_path / "train" / "cat" / "Thumbs.db").write_bytes(b"x")
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()  # would be an 11th class folder
    (tmp_path / "train" / "lost+found").mkdir()
    (tmp_path / "train" / "cat" / "._0000.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")
    (tmp_path / "train" / "cat" / "desktop.ini").write_text("[.ShellClassInfo]")
    (tmp_path / "train" / "dog" / ".thumbnails").mkdir()
    images, labels = load(tmp_path)
    assert torch.equal(labels, train[1]) and torch.equal(images, train[0])


def alias_beside_name(root):
    (root / "test" / "airplane").rename(root / "test" / "plane")
    (root / "test" / "airplane").mkdir()


TREE_FAULTS = {
    "missing class": (
        lambda r: shutil.rmtree(r / "test" / "frog"),
        r"test: missing class folders \['frog'\] of \['airplane'",
    ),
    "missing split": (
        lambda r: shutil.rmtree(r / "test"),
        r"cannot read .*test \(No such file or directory\)",
    ),
    "empty class": (
        lambda r: (r / "test" / "ship" / "0000.png").unlink(),
        r"test/ship holds no images",
    ),
    "alias and name": (
        alias_beside_name,
        r"test: class folders \['airplane', .*'plane', 'ship', "
        r"'truck'\] are not CIFAR-10's \[.*\], one each",
    ),
    "capitalised": (
        lambda r: (r / "test" / "cat").rename(r / "test" / "Cat"),
        r"test: class folders \['Cat', 'airplane'.*are not CIFAR-10's \['airplane'",
    ),
    "not an image": (
        lambda r: (r / "test" / "cat" / "notes.txt").write_text("x"),
        r"unexpected .*test/cat/notes.txt: class folders may hold only .png, .jpg",
    ),
    "wrong size": (
        lambda r: write_png(
            torch.zeros(3, 16, 24, dtype=torch.uint8), r / "test" / "cat" / "0000.png"
        ),
        r"test/cat/0000.png is 24x16 pixels, not 32x32$",
    ),
    "not decodable": (
        lambda r: (r / "test" / "cat" / "0000.png").write_bytes(b"GIF89a" + bytes(9)),
        r"cannot decode image .*test/cat/0000.png \(UnidentifiedImageError",
    ),
}


@pytest.mark.parametrize("fault", TREE_FAULTS)
def test_image_tree_faults_are_named(tmp_path, fault):
    make_fault, message = TREE_FAULTS[fault]
    write_tree(tmp_path, make_images(1), make_images(1, seed=1))
    make_fault(tmp_path)
    with pytest.raises(DataError, match=message):
        load(tmp_path, train=False)


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


# Each case: (Pillow image in that mode, the RGB pixels expected, uint8 [32, 32, 3]), computed
# here from the values written, not by Pillow's conversion.
GRID = np.arange(32 * 32).reshape(32, 32)


def gray(values):
    return np.repeat(np.asarray(values, dtype=np.uint8)[:, :, None], 3, axis=2)


def palette_image(transparency):
    palette = np.random.default_rng(0).integers(0, 256, (256, 3), dtype=np.uint8)
    index = ((GRID * 31) % 256).astype(np.uint8)
    image = Image.fromarray(index, mode="P")
    image.putpalette(palette.tobytes())
    image.info["transparency"] = transparency
    return image, palette[index]


def rgba():
    rgb = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    alpha = ((GRID * 13) % 256).astype(np.uint8)  # dropped, not composited onto any background
    return Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA"), rgb


SIXTEEN_BIT = np.concatenate(
    [[0, 128, 129, 385, 386, 32767, 32768, 65406, 65407, 65535], np.arange(1014) * 64]
)


def sixteen_bit(mode):
    wide = SIXTEEN_BIT.reshape(32, 32)
    expected = gray(np.floor(wide / 257 + 0.5))  # round to nearest; v / 257 is never k + 0.5
    if mode == "I":
        return Image.fromarray(wide.astype(np.int32), mode="I"), expected
    raw = wide.astype("<u2" if mode == "I;16" else ">u2").tobytes()
    return Image.frombytes(mode, (32, 32), raw), expected


LA = np.stack([(GRID % 256).astype(np.uint8), ((GRID * 37) % 256).astype(np.uint8)], axis=2)
MODES = {
    "1": lambda: (Image.fromarray((GRID * 7919) % 3 == 0), gray(((GRID * 7919) % 3 == 0) * 255)),
    "L": lambda: (Image.fromarray((GRID % 256).astype(np.uint8)), gray(GRID % 256)),
    "LA": lambda: (Image.fromarray(LA, mode="LA"), gray(GRID % 256)),
    "RGBA": rgba,
    "P with a transparent index": lambda: palette_image(3),
    "P with an alpha table": lambda: palette_image(bytes(range(0, 256, 2)) * 2),
    "I;16": lambda: sixteen_bit("I;16"),
}


@pytest.mark.parametrize("mode", MODES)
def test_every_png_mode_loads_as_rgb(tmp_path, mode):
    image, expected = MODES[mode]()
    path = tmp_path / "image.png"
    image.save(path)
    with Image.open(path) as reopened:
        assert reopened.mode == mode.split()[0]  # the PNG keeps the mode under test
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a palette's transparency gives no warning
        assert data.decode(path).permute(1, 2, 0).numpy().tolist() == expected.tolist()


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_sixteen_bit_gray_is_scaled_not_clipped(tmp_path, mode):
    image, expected = sixteen_bit(mode)
    assert image.mode == mode
    assert data.to_rgb(image).tolist() == expected.tolist()
    if mode == "I;16":  # and in a tree, through the decode cache
        train, test = make_images(1), make_images(1, seed=1)
        write_tree(tmp_path, train, test)
        image.save(tmp_path / "train" / "cat" / "0000.png")
        assert load(tmp_path)[0][3].permute(1, 2, 0).numpy().tolist() == expected.tolist()


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
@pytest.mark.parametrize("suffix", [".jpg", ".jpeg", ".png"])
def test_jpeg_of_every_mode_decodes_by_content(tmp_path, mode, suffix):
    """JPEG is lossy: the expected pixels are Pillow's ``convert("RGB")`` of the decoded file."""
    rgb = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    path = tmp_path / f"image{suffix}"
    Image.fromarray(rgb).convert(mode).save(path, format="JPEG", quality=95)
    with Image.open(path) as image:
        assert (image.format, image.mode) == ("JPEG", mode)
        expected = np.asarray(image.convert("RGB"))
        if mode == "CMYK":  # Pillow's CMYK -> RGB: each of C, M, Y scaled by (255 - K) / 255
            cmyk = np.asarray(image).astype(np.int64)
            c, k = cmyk[:, :, :3], cmyk[:, :, 3:]
            assert np.abs((255 - c) * (255 - k) / 255 - expected).max() <= 1
    assert data.decode(path).permute(1, 2, 0).numpy().tolist() == expected.tolist()


# ---------------------------------------------------------------- unwritable data folders


@contextmanager
def read_only(folder: Path, monkeypatch):
    """``chmod -R a-w folder`` (as Kaggle's /kaggle/input). Root ignores permission bits, so
    there the system calls that create entries in ``folder`` are refused as the kernel would."""
    paths = [folder, *folder.rglob("*")]
    for p in paths:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    if os.geteuid() == 0:

        def refuse(real, writes=lambda *args: True):
            def call(path, *args, **kwargs):
                if writes(*args) and Path(path).resolve().parent.is_relative_to(folder):
                    raise PermissionError(errno.EACCES, "Permission denied", str(path))
                return real(path, *args, **kwargs)

            return call

        monkeypatch.setattr(os, "mkdir", refuse(os.mkdir))
        monkeypatch.setattr(
            os,
            "open",
            refuse(os.open, lambda flags, *rest: flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)),
        )
    try:
        yield folder
    finally:
        monkeypatch.undo()
        for p in paths:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)


def test_read_only_image_tree_loads_with_one_warning(tmp_path, monkeypatch):
    root = tmp_path / "input"
    train, _ = small(root, "tree")
    with read_only(root, monkeypatch):
        with pytest.warns(UserWarning) as caught:
            assert sha(load_cifar10(root)) == sha(train)
        [warning] = [str(w.message) for w in caught]
        assert re.fullmatch(
            rf"could not write the decode cache {root}/\.labcnn-train-\w+\.pt "
            r"\(Permission denied\); the next load decodes again",
            warning,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per process: decoded again, silently
            assert sha(load_cifar10(root)) == sha(train)
        assert entries(root) == ["test", "train"]


def test_optional_cache_on_a_full_disk_or_a_file_system_without_modes(tmp_path, monkeypatch):
    train, _ = small(tmp_path, "tree")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.warns(UserWarning, match=r"decode cache .*\(No space left on device\); the next"):
        assert sha(load_cifar10(tmp_path)) == sha(train)
    assert entries(tmp_path) == ["test", "train"]  # no temporary file left

    def refused(*args, **kwargs):  # FAT, exFAT, SMB: chmod is refused
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.undo()
    monkeypatch.setattr(os, "chmod", refused)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sha(load_cifar10(tmp_path)) == sha(train)
    assert len(list(tmp_path.glob(".labcnn-train-*.pt"))) == 1  # written all the same


def test_read_only_archive_says_how_to_extract_it_elsewhere(tmp_path, monkeypatch):
    root = tmp_path / "input"
    train, _ = small(root, "archive")
    archive = root / "cifar-10-python.tar.gz"
    with read_only(root, monkeypatch):
        with pytest.raises(WriteError) as info:
            load(root)
        assert str(info.value) == (
            f"cannot write {root} (Permission denied): extract the archive elsewhere "
            f"(tar -C DIR -xf {archive}) and pass that DIR (command line: --data-dir DIR)"
        )
        assert entries(root) == ["cifar-10-python.tar.gz"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with tarfile.open(archive) as tar:  # the advice, as given
        tar.extractall(elsewhere, filter="data")
    assert sha(load(elsewhere)) == sha(train)


# ---------------------------------------------------------------- downloads


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")


PORTAL = b"<!DOCTYPE html><html><body>Log in to use the Wi-Fi</body></html>"


class Mirror(SimpleHTTPRequestHandler):
    """The files of its folder, and a mirror gone wrong: /stall sends nothing, /midway half the
    archive then nothing, /drop half then closes, /html and /html-as-binary a captive portal's
    page (status 200)."""

    def do_GET(self):
        kind, release = self.path.strip("/"), self.server.release
        if kind not in ("stall", "midway", "drop", "html", "html-as-binary"):
            return super().do_GET()
        if kind == "stall":
            return release.wait(30)
        body = PORTAL if "html" in kind else self.server.archive
        self.send_response(200)
        self.send_header("Content-Type", "text/html" if kind == "html" else "application/x-gzip")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body if "html" in kind else body[: len(body) // 2])
        self.wfile.flush()
        if kind == "midway":
            release.wait(30)

    def log_message(self, *args):
        pass


@pytest.fixture
def mirror(tmp_path_factory, monkeypatch):
    """A :class:`Mirror` of a synthetic archive on 127.0.0.1: ``.url``, ``.folder``, ``.train``.
    Downloads give up after 0.5 s without a byte instead of 30."""
    monkeypatch.setattr(data, "TIMEOUT", 0.5)
    folder = tmp_path_factory.mktemp("mirror")
    train = make_images(2)
    archive = write_archive(folder, train, make_images(1, seed=1))
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Mirror, directory=str(folder)))
    server.archive, server.release = archive.read_bytes(), threading.Event()
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield SimpleNamespace(
        url=f"http://127.0.0.1:{server.server_address[1]}", folder=folder, train=train
    )
    server.release.set()
    server.shutdown()
    server.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def download_error(root, url, verify=False) -> str:
    with pytest.raises(DataError) as info:
        load(root, download=True, url=url, verify=verify)
    assert "\n" not in str(info.value) and entries(root) == []  # nothing left behind
    return str(info.value)


def failed(url, root, why) -> str:
    return (
        re.escape(f"could not download CIFAR-10 from {url} into {root} (")
        + why
        + re.escape("); without internet, copy cifar-10-python.tar.gz or an image tree there")
    )


def test_download_from_a_mirror(tmp_path, mirror):
    (mirror.folder / "cifar-10-python.tar.gz").rename(mirror.folder / "course.tgz")
    assert sha(load(tmp_path, download=True, url=f"{mirror.url}/course.tgz")) == sha(mirror.train)
    assert entries(tmp_path) == ["cifar-10-batches-py"]
    unreachable = f"http://127.0.0.1:{closed_port()}/gone.tgz"
    assert sha(load(tmp_path, download=True, url=unreachable)) == sha(mirror.train)  # found


@pytest.mark.parametrize("where", ["stall", "midway"])
def test_a_download_that_stops_sending_times_out(tmp_path, mirror, where):
    start = time.monotonic()
    message = download_error(tmp_path, f"{mirror.url}/{where}")
    assert time.monotonic() - start < 5  # 0.5 s after the last byte, not forever
    why = "timed out: nothing received for 0.5 s"
    assert re.fullmatch(failed(f"{mirror.url}/{where}", tmp_path, why), message), message


def test_a_dropped_connection_says_so(tmp_path, mirror):
    message = download_error(tmp_path, f"{mirror.url}/drop")
    why = r"the connection dropped \((after [\d,]+ of [\d,]+ bytes|IncompleteRead\(.*\))\)"
    assert re.fullmatch(failed(f"{mirror.url}/drop", tmp_path, why), message), message


@pytest.mark.parametrize("kind", ["html", "html-as-binary"])
@pytest.mark.parametrize("verify", [True, False])
def test_a_web_page_instead_of_the_archive_is_named(tmp_path, mirror, kind, verify):
    message = download_error(tmp_path, f"{mirror.url}/{kind}", verify)
    assert message == (
        f"the file downloaded from {mirror.url}/{kind} is a web page (HTML) (it "
        f"starts with {PORTAL[:16]!r}), not the CIFAR-10 archive"
    )


def test_download_with_the_wrong_md5_is_refused_and_leaves_nothing(tmp_path, mirror):
    url = f"{mirror.url}/cifar-10-python.tar.gz"
    assert download_error(tmp_path, url, verify=True) == (
        f"the file downloaded from {url} does not match the official CIFAR-10 release (MD5 "
        f"{CIFAR10.tgz_md5}): damaged or re-packed: get it again, or pass --no-verify "
        "(verify=False)."
    )


def test_damaged_download_is_named_by_its_url_and_leaves_nothing(tmp_path, mirror):
    archive = mirror.folder / "cifar-10-python.tar.gz"
    archive.write_bytes(archive.read_bytes()[:1000])
    message = download_error(tmp_path, f"{mirror.url}/cifar-10-python.tar.gz")
    assert re.fullmatch(
        re.escape(
            f"could not extract the file downloaded from {mirror.url}/cifar-10-python.tar.gz ("
        )
        + r".*\); it is truncated or damaged",
        message,
    ), message
    (mirror.folder / "data.json").write_text('{"error": "not found"}')
    message = download_error(tmp_path, f"{mirror.url}/data.json")
    assert message == (
        f"the file downloaded from {mirror.url}/data.json is no archive (it starts "
        """with b'{"error": "not f'), not the CIFAR-10 archive"""
    )


@pytest.mark.parametrize("where", ["closed port", "missing file", "not a URL"])
def test_unreachable_download_is_one_clear_line(tmp_path, mirror, where):
    url, why = {
        "closed port": (f"http://127.0.0.1:{closed_port()}/c.tgz", "Connection refused"),
        "missing file": (f"{mirror.url}/no-such.tgz", "HTTP Error 404: File not found"),
        "not a URL": ("cifar.example/c.tgz", "unknown url type: 'cifar.example/c.tgz'"),
    }[where]
    message = download_error(tmp_path, url)
    assert re.fullmatch(failed(url, tmp_path, re.escape(why)), message), message


def test_download_defaults_to_torchvisions_url(tmp_path, monkeypatch):
    asked = []

    def offline(url, *args, **kwargs):
        asked.append(url)
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    message = download_error(tmp_path, None)
    assert re.fullmatch(failed(CIFAR10.url, tmp_path, "Network is unreachable"), message)
    assert asked == [CIFAR10.url]


@pytest.mark.parametrize("existing", [True, False], ids=["root exists", "root to create"])
def test_download_into_an_unwritable_folder_says_cannot_write(
    tmp_path, monkeypatch, mirror, existing
):
    root = tmp_path if existing else tmp_path / "data"
    with read_only(tmp_path, monkeypatch), pytest.raises(WriteError) as info:
        load(root, download=True, url=f"{mirror.url}/cifar-10-python.tar.gz")
    assert str(info.value) == (
        f"cannot write {root} (Permission denied): download into a writable"
        " folder instead: pass it as root (command line: --data-dir DIR)"
    )
    assert entries(tmp_path) == []


real_write = data.atomic_write


@pytest.mark.parametrize("task", ["extract the archive", "write the decode cache", "download"])
def test_two_loads_preparing_one_folder_at_once_both_succeed(tmp_path, monkeypatch, mirror, task):
    """Both are inside their staging at once (a barrier); the first copy is kept, whole."""
    layout = {"extract the archive": "archive", "write the decode cache": "tree"}.get(task)
    train = small(tmp_path, layout)[0] if layout else mirror.train
    together = threading.Barrier(2, timeout=20)
    if layout == "tree":
        monkeypatch.setattr(data, "atomic_write", lambda *a: (together.wait(), real_write(*a)))
    else:
        real_unpack = data.unpack
        monkeypatch.setattr(data, "unpack", lambda *a: (real_unpack(*a), together.wait()))
    url, results = None if layout else f"{mirror.url}/cifar-10-python.tar.gz", []
    threads = [
        threading.Thread(
            target=lambda: results.append(sha(load(tmp_path, download=bool(url), url=url)))
        )
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [sha(train)] * 2
    expected = {
        "extract the archive": ["cifar-10-batches-py", "cifar-10-python.tar.gz"],
        "write the decode cache": [".labcnn-train-", "test", "train"],
        "download": ["cifar-10-batches-py"],
    }[task]
    assert [re.sub(r"(\.labcnn-train-).*", r"\1", n) for n in entries(tmp_path)] == expected
    assert sha(load(tmp_path)) == sha(train)  # what they left loads


# ---------------------------------------------------------------- the real data, when at hand


def test_the_real_copy_loads_whole_then_from_its_cache(real_copy, monkeypatch):
    root = real_copy / "cifar10-jpeg"
    images, labels = load_cifar10(real_copy, train=False)  # found in a subfolder
    assert images.shape == (10_000, 3, 32, 32) and labels.bincount().tolist() == [1000] * 10
    mean = images.double().mean((0, 2, 3)) / 255  # the README's test-set figures, roughly
    assert torch.allclose(mean, torch.tensor([0.49, 0.48, 0.45], dtype=torch.float64), atol=0.02)
    monkeypatch.setattr(data, "decode", lambda p: pytest.fail("decoded although cached"))
    assert sha(load_cifar10(root, train=False)) == sha((images, labels))  # from the cache
    assert len(list(root.glob(".labcnn-test-*.pt"))) == 1


def test_one_short_epoch_beats_chance_on_the_full_real_test_set(real_copy, one_thread):
    """Here, after the test above: the test split comes from its cache."""
    train, test = load_cifar10(real_copy), load_cifar10(real_copy, train=False)
    assert len(train[1]) == 3000 and len(test[1]) == 10_000  # conftest: 300 per class
    config = make_config(epochs=1, batch_size=50, lr=0.001)  # 60 steps: a stable start
    history = harness.train(config, train, test, device="cpu", log=lambda line: None).history
    assert history[0]["test_acc"] > 0.2  # chance is 0.1; 0.42 measured on the AVX2 CPU


# ---------------------------------------------------------------- links and paths of the wrong kind


def test_linked_data_loads_as_files_do_and_a_broken_link_is_named(tmp_path, layout):
    """Shared course folders, DVC, git-annex and DataLad (datalad/datalad#6973) link files."""
    store, root = tmp_path / "store", tmp_path / "data"
    train, _ = small(store, layout)
    shutil.copytree(store, root, symlinks=True)
    files = [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")]
    for p in files:  # every file a link into the store, as git-annex leaves a checkout
        p.unlink()
        p.symlink_to(store / p.relative_to(root))
    assert sha(load(root)) == sha(train)
    if layout == "archive":  # extracted beside the link: the archive is not read again
        return
    target = store / files[0].relative_to(root)
    target.unlink()
    for p in store.rglob(".labcnn-*.pt"):  # the decode cache would hide the missing image
        p.unlink()
    for p in root.rglob(".labcnn-*.pt"):
        p.unlink()
    split = "test" in files[0].parts
    with pytest.raises(DataError, match=f"^{re.escape(str(files[0]))} is a broken link to "):
        load(root, train=not split)


@pytest.mark.parametrize("kind", ["archive", "batch file", "split of a tree", "broken link"])
def test_a_path_of_the_wrong_kind_says_what_it_is_and_what_to_pass(tmp_path, kind):
    """ONN4MST#3, ISosnovik/top#3: the archive or a batch file passed as the data folder."""
    if kind == "archive":
        path = write_archive(tmp_path, make_images(1), make_images(1, seed=1))
        expected = f"{path} is an archive, not a folder: pass the folder that holds it"
    elif kind == "batch file":
        path = write_batches(tmp_path / "b", make_images(1), make_images(1, seed=1)) / "test_batch"
        expected = f"{path} is a CIFAR-10 batch file, not a folder: pass the folder that holds it"
    elif kind == "split of a tree":
        small(tmp_path, "tree")
        path = tmp_path / "train"
        expected = f"{path} is a folder of class folders, one split of an image tree: pass"
    else:
        path = tmp_path / "data"
        path.symlink_to(tmp_path / "unmounted")
        expected = f"{path} is a broken link to {tmp_path / 'unmounted'}"
    with pytest.raises(DataError) as info:
        load(path)
    assert str(info.value).startswith(expected) and "\n" not in str(info.value)


def test_a_stale_scratch_folder_of_a_killed_extraction_is_removed(tmp_path):
    """SIGKILL in the middle of an extraction leaves a hidden scratch folder (30 MB)."""
    write_archive(tmp_path, make_images(2), make_images(1, seed=1))
    stale = tmp_path / ".cifar-10-batches-py.killed.tmp"
    stale.mkdir()
    (stale / "data_batch_1").write_bytes(b"half")
    os.utime(stale, (0, 0))  # older than any extraction takes
    load(tmp_path)
    assert not stale.exists()
