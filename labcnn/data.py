"""Loading CIFAR-10 into memory as uint8 tensors, from any of its common layouts.

:func:`load_cifar10` finds the data under a root folder, in one of these layouts:

1. the official python release ``cifar-10-batches-py/`` (``data_batch_1`` .. ``data_batch_5``,
   ``test_batch``, ``batches.meta``), checked against torchvision's published MD5s;
2. the official archive ``cifar-10-python.tar.gz``, checked, then extracted next to itself;
3. an image-folder tree ``train/<class>/*.png|jpg`` and ``test/<class>/*.png|jpg`` named with
   the ten CIFAR-10 classes (the layout of ``../shared/data/cifar10-jpeg.tar.gz``); decoded
   once, then cached next to the data as one tensor file;
4. none of these and ``download=True``: torchvision's download of the official archive.

Source of the data set: Krizhevsky, 2009, "Learning Multiple Layers of Features from Tiny
Images", https://www.cs.toronto.edu/~kriz/cifar.html.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import check_integrity, download_url

from labcnn.errors import ConfigError, DataError

# Label order of the official release (batches.meta, label_names): index = label.
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# The lab's normalization, as widely copied from kuangliu/pytorch-cifar (main.py). The mean is
# the data's; the "std" is the mean of per-image stds, not the pixel std of the training set,
# which is (0.2470, 0.2435, 0.2616) for the official files (kuangliu/pytorch-cifar issue #135).
# Use :func:`channel_stats` for the true values of a copy.
LAB_MEAN = (0.4914, 0.4822, 0.4465)
LAB_STD = (0.2023, 0.1994, 0.2010)

BATCHES_DIR = CIFAR10.base_folder  # "cifar-10-batches-py"
ARCHIVE = CIFAR10.filename  # "cifar-10-python.tar.gz"
ALIASES = {"plane": "airplane", "car": "automobile"}  # folder names some mirrors use
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
LITTER = {"Thumbs.db", "desktop.ini", "__MACOSX", "$RECYCLE.BIN", "lost+found"}
CACHE_VERSION = "1"


def load_cifar10(root, train: bool = True, download: bool = False, verify: bool = True):
    """Load one CIFAR-10 split into memory.

    Args:
        root: folder holding the data (or the data folder itself, or its parent one level up);
            ``~`` and relative paths are expanded.
        train: the 50,000-image training split if true, else the 10,000-image test split.
        download: when nothing is found, download the official archive into ``root`` with
            torchvision (needs internet).
        verify: check the official files against torchvision's MD5s. A re-packed copy in the
            official layout loads only with ``verify=False``, with a warning.

    Returns:
        ``(images, labels)``: ``images`` uint8 ``[N, 3, 32, 32]`` (RGB), ``labels`` int64 ``[N]``
        with values in ``0..9`` indexing :data:`CLASSES`.

    Raises:
        DataError: no data found (the message lists the folders searched), a file is missing,
            damaged, unreadable or of the wrong shape, or the download failed.
    """
    root = Path(root).expanduser().resolve()
    try:
        kind, path = find_source(root)
        if kind is None:
            if not download:
                raise DataError(not_found_message(root))
            kind, path = "archive", download_archive(root)
        if kind == "archive":
            kind, path = "batches", extract(path, verify)
        if kind == "batches":
            return read_batches(path, train, verify)
        return read_image_tree(path / ("train" if train else "test"))
    except OSError as e:  # permissions, I/O errors: name the file instead of a traceback
        raise DataError(f"cannot read {e.filename or root} ({e.strerror or e}): expected a readable file or folder") from None


def search_folders(root: Path) -> list[Path]:
    """``root`` and its visible subfolders: where :func:`find_source` looks, in that order."""
    if not root.is_dir():
        return [root]
    children = sorted(p for p in root.iterdir() if p.is_dir() and not is_ignored(p))
    return [root, *children]


def find_source(root: Path) -> tuple[str | None, Path | None]:
    """The first layout found in ``root`` or one level below it.

    Returns ``("batches", folder)``, ``("archive", file)``, ``("images", folder)`` or
    ``(None, None)``. The official layouts take precedence over an image tree.
    """
    folders = search_folders(root)
    for folder in folders:
        if folder.name == BATCHES_DIR or any((folder / name).exists() for name, _ in batch_files()):
            return "batches", folder
        if (folder / BATCHES_DIR).is_dir():
            return "batches", folder / BATCHES_DIR
    for folder in folders:
        if (folder / ARCHIVE).is_file():
            return "archive", folder / ARCHIVE
    for folder in folders:
        if (folder / "train").is_dir() or (folder / "test").is_dir():
            return "images", folder
    return None, None


def not_found_message(root: Path) -> str:
    searched = ", ".join(str(p) for p in search_folders(root))
    return (
        f"no CIFAR-10 data found in {root} (searched: {searched}). Put there the folder "
        f"{BATCHES_DIR}/, the archive {ARCHIVE}, or an image tree train/<class>/ and "
        f"test/<class>/; or pass --download to fetch the official archive (needs internet)."
    )


def batch_files(train: bool | None = None) -> list[tuple[str, str]]:
    """``(file name, MD5)`` pairs of the official release, from torchvision's ``CIFAR10``."""
    if train is None:
        return CIFAR10.train_list + CIFAR10.test_list + [[CIFAR10.meta["filename"], CIFAR10.meta["md5"]]]
    return CIFAR10.train_list if train else CIFAR10.test_list


def check_file(path: Path, md5: str, verify: bool) -> None:
    """Raise :class:`DataError` if ``path`` is missing or, with ``verify``, its MD5 differs."""
    if not path.is_file():
        raise DataError(f"missing CIFAR-10 file {path}: expected the official release's {path.name}")
    if verify and not check_integrity(str(path), md5):
        raise DataError(
            f"{path} does not match the official CIFAR-10 release (MD5 {md5} expected, per "
            "torchvision.datasets.CIFAR10): it is truncated, damaged or re-packed. Download it "
            "again, or pass verify=False (--no-verify) to load a re-packed copy."
        )


def read_batches(folder: Path, train: bool, verify: bool):
    """Read one split of the official python layout; see :func:`load_cifar10` for the result."""
    if not verify:
        warnings.warn(f"loading {folder} without checking MD5s (verify=False)", stacklevel=3)
    meta_name, meta_md5 = CIFAR10.meta["filename"], CIFAR10.meta["md5"]
    for name, md5 in [*batch_files(train), [meta_name, meta_md5]]:
        check_file(folder / name, md5, verify)
    names = read_pickle(folder / meta_name).get("label_names")
    if names is not None and text_list(names) != list(CLASSES):
        raise DataError(f"{folder / meta_name}: label_names {text_list(names)} are not CIFAR-10's {list(CLASSES)}")
    parts = [read_batch(folder / name) for name, _ in batch_files(train)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def text_list(values) -> list[str]:
    """``values`` (bytes or text, e.g. ``label_names``) as a list of text; ``[]`` if not a list."""
    if not isinstance(values, (list, tuple)):
        return []
    return [v.decode("latin1") if isinstance(v, bytes) else str(v) for v in values]


# The only globals a CIFAR-10 batch needs: numpy's array rebuilding (numpy 1 and 2 names; pickle
# protocols 2 to 5, protocol 5 rebuilding arrays with _frombuffer).
PICKLE_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles CIFAR-10 batches, refusing every global outside :data:`PICKLE_GLOBALS`.

    Any other numpy function is refused too: some run code (``numpy.testing``'s ``runstring``).
    """

    def find_class(self, module, name):
        if (module, name) in PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unexpected global {module}.{name}")


def read_pickle(path: Path) -> dict:
    """A batch file's dictionary with text keys (files written with bytes keys load too)."""
    try:
        with open(path, "rb") as f:
            entry = NumpyOnlyUnpickler(f, encoding="latin1").load()
    except Exception as e:  # pickle raises many types on damaged input
        raise DataError(f"{path} is not a readable CIFAR-10 pickle batch ({type(e).__name__}: {e})") from None
    if not isinstance(entry, dict):
        raise DataError(f"{path}: expected a pickled dict, found {type(entry).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


def read_batch(path: Path):
    """One batch file as ``(uint8 [N, 3, 32, 32], int64 [N])``; checks keys, shapes and labels."""
    entry = read_pickle(path)
    labels = entry.get("labels", entry.get("fine_labels"))
    data = entry.get("data")
    if not isinstance(data, np.ndarray) or labels is None:
        raise DataError(f"{path}: expected keys 'data' (numpy array) and 'labels', found {sorted(map(str, entry))}")
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' is {data.dtype} {list(data.shape)}, expected uint8 [N, 3072]")
    try:
        labels = torch.as_tensor(np.asarray(labels, dtype=np.int64))
    except (TypeError, ValueError, OverflowError) as e:
        raise DataError(f"{path}: 'labels' are not integers in 0..9 ({e})") from None
    if labels.shape != (len(data),) or (len(labels) and not (0 <= labels.min() and labels.max() < 10)):
        raise DataError(f"{path}: expected {len(data)} labels in 0..9, found shape {list(labels.shape)}")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), labels


def extract(archive: Path, verify: bool) -> Path:
    """Extract the official archive next to itself and return its ``cifar-10-batches-py``.

    The archive is unpacked (tarfile's ``"data"`` filter: no paths outside the folder) into a
    hidden temporary folder, which searches skip, and renamed into place only when every file of
    the release is there, so a failed or killed extraction leaves nothing a later run would accept.

    Raises:
        DataError: the archive fails its MD5 (with ``verify``), is truncated or damaged, or lacks
            a file of the release.
    """
    if verify:
        check_file(archive, CIFAR10.tgz_md5, verify)
    target = archive.parent / BATCHES_DIR
    scratch = Path(tempfile.mkdtemp(prefix=".labcnn-extract-", dir=archive.parent))
    try:
        extract_tar(archive, scratch)
        missing = [name for name, _ in batch_files() if not (scratch / BATCHES_DIR / name).is_file()]
        if missing:
            raise DataError(f"{archive} lacks {BATCHES_DIR}/{', '.join(missing)}: expected the CIFAR-10 python archive")
        os.replace(scratch / BATCHES_DIR, target)
    except DataError:
        raise
    except Exception as e:  # tarfile, gzip and zlib raise several types on truncated input
        raise DataError(f"could not extract {archive} ({type(e).__name__}: {e}); it is truncated or damaged") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def extract_tar(archive: Path, folder: Path) -> None:
    """Unpack ``archive`` into ``folder``, refusing members that would land outside it.

    Uses tarfile's ``"data"`` filter (Python 3.12, 3.11.4, 3.10.12 and later); older Pythons
    lack it, so there only plain files and folders with relative, ``..``-free names are accepted.

    Raises:
        DataError: a member is a link, device or absolute/escaping path (older Pythons); other
            tarfile errors propagate.
    """
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            try:
                tar.extractall(folder, filter="data")
            except tarfile.FilterError as e:
                raise DataError(f"{archive}: refusing a member ({e}); expected plain files inside the archive's folder") from None
            return
        for member in tar.getmembers():
            name = Path(member.name)
            if not (member.isfile() or member.isdir()) or name.is_absolute() or ".." in name.parts:
                raise DataError(f"{archive}: refusing a member ({member.name!r}); expected plain files inside the archive's folder")
        tar.extractall(folder)


def download_archive(root: Path) -> Path:
    """Download the official archive into ``root`` with torchvision, checking its MD5."""
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".labcnn-download-", dir=root))
    try:
        download_url(CIFAR10.url, str(scratch), ARCHIVE, CIFAR10.tgz_md5)
        os.replace(scratch / ARCHIVE, root / ARCHIVE)
    except Exception as e:
        raise DataError(
            f"could not download CIFAR-10 from {CIFAR10.url} into {root} ({type(e).__name__}: {e}). "
            f"Without internet, copy {ARCHIVE}, {BATCHES_DIR}/ or an image tree train/<class>/, "
            f"test/<class>/ into {root}."
        ) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return root / ARCHIVE


def is_ignored(path: Path) -> bool:
    """Hidden files and folders, and operating-system litter (``Thumbs.db``, ``__MACOSX``...)."""
    return path.name.startswith(".") or path.name in LITTER


def class_folders(split: Path) -> list[Path]:
    """The ten class folders of an image-tree split, in CIFAR-10 label order.

    Folder names must be CIFAR-10's class names, or the aliases in :data:`ALIASES`.
    """
    if not split.is_dir():
        raise DataError(f"missing folder {split}: expected train/<class>/ and test/<class>/ image folders")
    found = {}
    for folder in sorted(p for p in split.iterdir() if p.is_dir() and not is_ignored(p)):
        name = ALIASES.get(folder.name, folder.name)
        if name not in CLASSES:
            names = sorted(p.name for p in split.iterdir() if p.is_dir() and not is_ignored(p))
            raise DataError(f"{split}: class folders {names} are not CIFAR-10's {list(CLASSES)}")
        if name in found:
            raise DataError(f"{split}: both {found[name].name}/ and {folder.name}/ name the class {name}")
        found[name] = folder
    missing = [c for c in CLASSES if c not in found]
    if missing:
        raise DataError(f"{split}: missing class folders {missing}; expected all of {list(CLASSES)}")
    return [found[c] for c in CLASSES]


def image_files(split: Path) -> list[tuple[Path, int]]:
    """Every ``(image path, label)`` of an image-tree split, sorted by label then file name."""
    files = []
    for label, folder in enumerate(class_folders(split)):
        paths = sorted(p for p in folder.iterdir() if not is_ignored(p))
        for p in paths:
            if not p.is_file() or p.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(f"unexpected {p}: class folders may hold only .png, .jpg or .jpeg images")
        if not paths:
            raise DataError(f"{folder} holds no images")
        files += [(p, label) for p in paths]
    return files


def read_image_tree(split: Path):
    """One image-tree split, decoded once and then served from a cache file next to ``split``.

    The cache ``.labcnn-<split>-<key>.pt`` is keyed by every file's path, size and mtime, so a
    changed source is decoded again; an unwritable folder only costs the cache.
    """
    files = image_files(split)
    key = hashlib.sha1(CACHE_VERSION.encode())
    for p, label in files:
        st = p.stat()
        key.update(f"{p.relative_to(split)}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    cache = split.parent / f".labcnn-{split.name}-{key.hexdigest()[:16]}.pt"
    if cache.is_file():
        try:
            saved = torch.load(cache, weights_only=True)
            return saved["images"], saved["labels"]
        except Exception:
            warnings.warn(f"ignoring unreadable cache {cache}", stacklevel=3)
    images = torch.stack([decode(p) for p, _ in files])
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    write_cache(cache, {"images": images, "labels": labels})
    return images, labels


def decode(path: Path) -> torch.Tensor:
    """One image file as uint8 ``[3, 32, 32]`` RGB, decoded with Pillow (as torchvision's
    ``ImageFolder`` does); raises :class:`DataError` naming the file if it is not a 32x32 PNG or
    JPEG. The size is checked before decoding, so a damaged header costs no memory."""
    try:
        with Image.open(path, formats=("PNG", "JPEG")) as image:
            if image.size != (32, 32):
                raise DataError(f"{path} is {image.size[0]}x{image.size[1]} pixels; CIFAR-10 images are 32x32")
            pixels = np.array(image.convert("RGB"))
    except DataError:
        raise
    except Exception as e:  # Pillow raises several types on damaged files
        raise DataError(f"cannot decode image {path} ({type(e).__name__}: {e})") from None
    return torch.from_numpy(pixels).permute(2, 0, 1)


def write_cache(cache: Path, tensors: dict) -> None:
    """Write ``tensors`` to ``cache`` atomically, replacing older caches of the same split."""
    prefix = cache.name.rsplit("-", 1)[0] + "-"
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")  # per process: concurrent loads don't mix
    try:
        torch.save(tensors, tmp)
        os.replace(tmp, cache)
        for old in cache.parent.glob(prefix + "*.pt"):
            if old != cache:
                old.unlink(missing_ok=True)
    except OSError as e:
        warnings.warn(f"could not write the decode cache {cache} ({e}); the next load decodes again", stacklevel=3)
    finally:
        tmp.unlink(missing_ok=True)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel pixel mean and standard deviation, as fractions of 255.

    Args:
        images: uint8 ``[N, 3, H, W]``.

    Returns:
        ``(mean, std)``, three floats each, over every pixel of every image (population std).
    """
    mean, std = [], []
    for c in range(images.shape[1]):
        channel = images[:, c].to(torch.float64).div_(255)
        var, m = torch.var_mean(channel, correction=0)
        mean.append(m.item())
        std.append(var.sqrt().item())
    return tuple(mean), tuple(std)


def normalization_tensors(mean, std, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``mean`` and ``std`` (three fractions each) as float32 ``[3]`` tensors on ``device``."""
    return tuple(torch.as_tensor(v, dtype=torch.float32, device=device) for v in (mean, std))


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 ``[N, 3, H, W]`` -> float32 ``(x / 255 - mean) / std``.

    ``mean`` and ``std``: three fractions each, as sequences or float32 ``[3]`` tensors (pass
    tensors already on ``images``' device in hot loops, to avoid a copy per call).
    """
    mean, std = normalization_tensors(mean, std, images.device)
    x = images.to(torch.float32).div_(255)
    return x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))


def subset(images: torch.Tensor, labels: torch.Tensor, n: int, seed: int = 0):
    """``n`` examples drawn without replacement by a seeded permutation (all of them if ``n`` is None).

    Raises:
        ConfigError: ``n`` is not between 1 and ``len(labels)``.
    """
    if n is None:
        return images, labels
    if not 1 <= n <= len(labels):
        raise ConfigError(f"subset size {n} must be between 1 and {len(labels)}")
    index = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:n]
    return images[index], labels[index]
