"""Small synthetic CIFAR-10 look-alikes, written in every layout labcnn reads.

The images are learnable: each class has its own coarse colour template, plus noise, so a
network beats chance within an epoch or two. Nothing here comes from the real data.
"""

from __future__ import annotations

import pickle
import random
import tarfile
import warnings
from pathlib import Path

import torch
from PIL import Image

from labcnn.data import CLASSES, load_cifar10


def make_images(per_class: int, seed: int = 0, noise: float = 40.0):
    """``(uint8 [10 * per_class, 3, 32, 32], int64 [10 * per_class])``, classes in order."""
    gen = torch.Generator().manual_seed(seed)
    templates = torch.rand(10, 3, 4, 4, generator=torch.Generator().manual_seed(1234)) * 200 + 28
    templates = templates.repeat_interleave(8, 2).repeat_interleave(8, 3)
    labels = torch.arange(10).repeat_interleave(per_class)
    images = templates[labels] + noise * torch.randn(len(labels), 3, 32, 32, generator=gen)
    return images.clamp(0, 255).round().to(torch.uint8), labels


def pickle_batch(path: Path, images, labels, bytes_keys: bool = False) -> None:
    entry = {
        "batch_label": path.name,
        "labels": labels.tolist(),
        "data": images.reshape(len(images), -1).numpy(),
        "filenames": [f"{i:05d}.png" for i in range(len(images))],
    }
    if bytes_keys:
        entry = {k.encode(): v for k, v in entry.items()}
    path.write_bytes(pickle.dumps(entry, protocol=2))


def write_batches(folder: Path, train, test, bytes_keys: bool = False) -> Path:
    """The official python layout: ``data_batch_1``..``5``, ``test_batch``, ``batches.meta``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, index in enumerate(torch.arange(len(train[1])).chunk(5), start=1):
        pickle_batch(folder / f"data_batch_{i}", train[0][index], train[1][index], bytes_keys)
    pickle_batch(folder / "test_batch", *test, bytes_keys)
    meta = {
        "label_names": list(CLASSES),
        "num_cases_per_batch": len(train[1]) // 5,
        "num_vis": 3072,
    }
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


def write_archive(root: Path, train, test) -> Path:
    """The official archive ``cifar-10-python.tar.gz`` holding ``cifar-10-batches-py/``."""
    staging = root / "staging"
    write_batches(staging / "cifar-10-batches-py", train, test)
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    for f in (staging / "cifar-10-batches-py").iterdir():
        f.unlink()
    (staging / "cifar-10-batches-py").rmdir()
    staging.rmdir()
    return archive


def write_tree(root: Path, train, test, names=CLASSES) -> Path:
    """An image-folder tree ``train/<class>/NNNN.png`` and ``test/<class>/NNNN.png`` (lossless)."""
    for split, (images, labels) in (("train", train), ("test", test)):
        for c, name in enumerate(names):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, index in enumerate((labels == c).nonzero().flatten().tolist()):
                write_png(images[index], folder / f"{i:04d}.png")
    return root


def write_png(image, path: Path) -> None:
    """Save uint8 ``[3, H, W]`` as a lossless PNG."""
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)


def make_dataset(
    root: Path, layout: str, train_per_class: int = 20, test_per_class: int = 5, seed: int = 0
):
    """Write a synthetic data set in ``layout`` (batches, archive or tree) in ``root``.

    Returns ``(train, test)``, each ``(images, labels)`` as written, in label order.
    """
    train = make_images(train_per_class, seed)
    test = make_images(test_per_class, seed + 1)
    root.mkdir(parents=True, exist_ok=True)
    if layout == "batches":
        write_batches(root / "cifar-10-batches-py", train, test)
    elif layout == "archive":
        write_archive(root, train, test)
    else:
        write_tree(root, train, test)
    return train, test


def tiny_batches(root: Path) -> Path:
    """The official layout with 2 training and 1 test image per class; returns its folder."""
    return write_batches(root / "cifar-10-batches-py", make_images(2), make_images(1, seed=1))


def load(root, train: bool = True, verify: bool = False, **kwargs):
    """:func:`labcnn.data.load_cifar10`, by default without MD5s (synthetic files are not the
    release's) and without the warning that gives."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_cifar10(root, train=train, verify=verify, **kwargs)


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
    assert len(labels) and labels.min() >= 0 and labels.max() < 10
