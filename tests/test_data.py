import pickle
import warnings

import pytest
import torch
import torchvision
from synthetic import make_dataset, make_images, write_batches, write_png, write_tree

from labcnn import data
from labcnn.data import CLASSES, LAB_MEAN, LAB_STD, channel_stats, load_cifar10, normalize
from labcnn.errors import DataError


def load(root, train=True):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_cifar10(root, train=train, verify=False)


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


def test_official_layout_is_verified_by_default(tmp_path):
    make_dataset(tmp_path, "batches")
    with pytest.raises(DataError, match="does not match the official CIFAR-10 release"):
        load_cifar10(tmp_path)
    with pytest.warns(UserWarning, match="without checking MD5s"):
        load_cifar10(tmp_path, verify=False)


def test_archive_is_verified_then_extracted_next_to_itself(tmp_path):
    make_dataset(tmp_path, "archive")
    with pytest.raises(DataError, match="does not match"):
        load_cifar10(tmp_path)
    assert not (tmp_path / "cifar-10-batches-py").exists()
    load(tmp_path)
    assert (tmp_path / "cifar-10-batches-py" / "data_batch_5").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".labcnn")] == []


@pytest.mark.parametrize("where", ["parent", "itself", "grandparent"])
def test_root_may_be_the_folder_its_parent_or_one_level_up(tmp_path, where):
    train, _ = make_dataset(tmp_path / "cifar", "batches")
    root = {"parent": tmp_path / "cifar", "itself": tmp_path / "cifar" / "cifar-10-batches-py", "grandparent": tmp_path}[where]
    assert torch.equal(load(root)[0], train[0])


def test_tilde_and_relative_paths_expand(tmp_path, monkeypatch):
    train, _ = make_dataset(tmp_path / "d", "tree")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert torch.equal(load("~/d")[0], train[0])
    assert torch.equal(load("d")[0], train[0])


def test_nothing_found_names_the_folders_searched(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"no CIFAR-10 data found in {tmp_path}.*searched: {tmp_path}, {tmp_path / 'empty'}"):
        load_cifar10(tmp_path)


def test_download_without_network_is_a_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(data, "download_url", offline)
    with pytest.raises(DataError, match=f"could not download CIFAR-10 .* into {tmp_path}.*Without internet"):
        load_cifar10(tmp_path, download=True)
    assert list(tmp_path.iterdir()) == []


def test_bytes_keys_load(tmp_path):
    train, test = make_images(2), make_images(1, seed=1)
    write_batches(tmp_path / "cifar-10-batches-py", train, test, bytes_keys=True)
    assert torch.equal(load(tmp_path)[0], train[0])


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
    assert list(tmp_path.glob(".labcnn-train-*.pt")) != caches and len(list(tmp_path.glob(".labcnn-train-*.pt"))) == 1


def test_image_tree_aliases_and_litter(tmp_path):
    names = ["plane", "car", *CLASSES[2:]]
    train, test = make_images(2), make_images(1, seed=1)
    write_tree(tmp_path, train, test, names=names)
    (tmp_path / "train" / "cat" / ".DS_Store").write_bytes(b"x")
    (tmp_path / "train" / "__MACOSX").mkdir()
    (tmp_path / "train" / "cat" / "Thumbs.db").write_bytes(b"x")
    images, labels = load(tmp_path)
    assert torch.equal(labels, train[1]) and torch.equal(images, train[0])


def test_image_tree_wrong_class_names_are_listed(tmp_path):
    write_tree(tmp_path, make_images(1), make_images(1), names=[f"class{i}" for i in range(10)])
    with pytest.raises(DataError, match=r"class folders \['class0'.*are not CIFAR-10's \['airplane'"):
        load(tmp_path)


def test_channel_stats_and_normalize():
    images = torch.stack([torch.full((3, 2, 2), 0, dtype=torch.uint8), torch.full((3, 2, 2), 255, dtype=torch.uint8)])
    mean, std = channel_stats(images)
    assert mean == pytest.approx((0.5,) * 3) and std == pytest.approx((0.5,) * 3)
    x = normalize(images, torch.tensor(LAB_MEAN), torch.tensor(LAB_STD))
    assert x.dtype == torch.float32
    assert x[1, 0, 0, 0].item() == pytest.approx((1 - LAB_MEAN[0]) / LAB_STD[0])


def test_subset_is_seeded_and_checked():
    images, labels = make_images(3)
    a = data.subset(images, labels, 10, seed=1)
    b = data.subset(images, labels, 10, seed=1)
    assert torch.equal(a[1], b[1]) and len(a[1]) == 10
    with pytest.raises(ValueError, match="between 1 and 30"):
        data.subset(images, labels, 31)


@pytest.mark.parametrize("with_filter", [True, False], ids=["data-filter", "older-python"])
def test_archive_members_escaping_the_folder_are_refused(tmp_path, monkeypatch, with_filter):
    import io
    import tarfile

    if not with_filter:  # Pythons before 3.10.12 / 3.11.4 have no extraction filters
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        member = tarfile.TarInfo("../escaped.txt")
        member.size = 2
        tar.addfile(member, io.BytesIO(b"hi"))
    with pytest.raises(DataError, match="cifar-10-python.tar.gz: refusing"):
        load(tmp_path)
    assert not (tmp_path.parent / "escaped.txt").exists()
