"""labcnn.data: every layout loads the same tensors, found by one search rule (see its docstring)."""
import re
import shutil
import warnings

import pytest
import torch
import torchvision
from synthetic import load, make_dataset, make_images, tiny_batches, write_archive, write_batches, write_tree

from labcnn.cli import main
from labcnn.data import CLASSES, load_cifar10
from labcnn.errors import DataError


def put_layout(folder, layout):
    """Write a small synthetic data set so that ``folder`` directly holds ``layout`` (for the
    batches layout, the batch files; its name is not cifar-10-batches-py). Returns ``train``."""
    train, test = make_images(2), make_images(1, seed=1)
    if layout == "batches":
        write_batches(folder, train, test)
    else:
        make_dataset(folder, layout, train_per_class=2, test_per_class=1)
    return train


def small(base, layout):
    return make_dataset(base, layout, train_per_class=2, test_per_class=1)


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


# ---------------------------------------------------------------- the search rule


@pytest.mark.parametrize("where", ["data folder", "its parent"])
def test_root_may_be_the_data_folder_or_its_parent(tmp_path, layout, where):
    folder = tmp_path / "outer" / "data"
    train = put_layout(folder, layout)
    assert torch.equal(load(folder if where == "data folder" else folder.parent)[0], train[0])


def test_a_folder_named_like_the_release_is_searched_like_any_other(tmp_path, layout):
    """``d/cifar-10-batches-py`` holding its data one level down (for the batches layout, a
    complete ``cifar-10-batches-py/`` inside it) is not taken for a batches folder by its name."""
    root = tmp_path / "d" / "cifar-10-batches-py"
    train, _ = small(root, layout)
    assert torch.equal(load(root)[0], train[0])
    inner = tmp_path / "e" / "cifar-10-batches-py"
    train = put_layout(inner / "copy", layout)
    assert torch.equal(load(inner)[0], train[0])


def test_the_release_folder_is_found_where_its_archive_extracts(tmp_path):
    """In a searched folder F, F/cifar-10-batches-py/ is found (two levels below root): that
    is where the archive in F extracts, so an extracted archive is not extracted again."""
    train, _ = small(tmp_path / "a" / "b", "batches")
    assert torch.equal(load(tmp_path / "a")[0], train[0])
    train, _ = small(tmp_path / "c" / "d", "archive")
    load(tmp_path / "c")
    (tmp_path / "c" / "d" / "cifar-10-python.tar.gz").unlink()
    assert torch.equal(load(tmp_path / "c")[0], train[0])


def test_data_one_level_deeper_than_searched_is_named(tmp_path, layout):
    deeper = tmp_path / "x" / "y"
    put_layout(deeper, layout)
    for download in (False, True):  # found locally: never downloaded
        with pytest.raises(DataError) as info:
            load(tmp_path, download=download, url="http://127.0.0.1:9/none")
        assert str(info.value) == f"found CIFAR-10 at {deeper}, one level deeper than searched: pass --data-dir {deeper}"
    load(deeper)  # the advice works


def test_data_two_levels_deeper_is_not_found(tmp_path, layout):
    put_layout(tmp_path / "a" / "b" / "c", layout)
    with pytest.raises(DataError, match=f"^no CIFAR-10 data found in {tmp_path} "):
        load(tmp_path)


def test_nothing_found_names_the_folders_searched_and_the_download(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "cifar-10-batches-py").mkdir()  # named like the release, holding nothing
    with pytest.raises(DataError) as info:
        load_cifar10(tmp_path)
    searched = f"{tmp_path}, {tmp_path / 'cifar-10-batches-py'}, {tmp_path / 'empty'}"
    assert str(info.value).startswith(f"no CIFAR-10 data found in {tmp_path} (searched: {searched}). ")
    assert str(info.value).endswith(
        "or pass download=True (command line: --download) to fetch the archive from "
        f"{torchvision.datasets.CIFAR10.url} (needs internet).")
    with pytest.raises(DataError, match=re.escape("from http://mirror.example/c.tgz (needs internet)")):
        load_cifar10(tmp_path, url="http://mirror.example/c.tgz")


def test_official_layouts_take_precedence_over_an_image_tree(tmp_path):
    """Layout before folder order: the batches in the last folder win, then the archive."""
    tree_train, _ = small(tmp_path / "a_tree", "tree")
    archive_train, _ = make_dataset(tmp_path / "b_archive", "archive", train_per_class=3, test_per_class=1, seed=5)
    batches_train, _ = make_dataset(tmp_path / "c_batches", "batches", train_per_class=1, test_per_class=1, seed=7)
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


# ---------------------------------------------------------------- the command line on bad data


def cli_bad_batches(root):
    (tiny_batches(root) / "test_batch").write_bytes(b"")


def cli_bad_archive(root):
    archive = write_archive(root, make_images(1), make_images(1, seed=1))
    archive.write_bytes(archive.read_bytes()[:2000])


def cli_bad_tree(root):
    write_tree(root, make_images(1), make_images(1, seed=1))
    shutil.rmtree(root / "train" / "horse")


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


# ---------------------------------------------------------------- after loading (labcnn.transforms)
