"""CIFAR-10 as an image-folder tree: ``train/<class>/*.png|jpg|jpeg`` and ``test/<class>/...``.

The class folders carry CIFAR-10's class names (or the aliases in :data:`ALIASES`); hidden files
and folders and operating-system litter (:data:`LITTER`) are ignored. Images are decoded with
Pillow, as torchvision's ``ImageFolder`` does, once: the decoded split is cached beside
``train/`` and ``test/`` as ``.labcnn-<split>-<key>.pt`` (written through
:func:`labcnn.fileio.atomic_write`; in a read-only folder the cache is skipped with a warning).
"""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from labcnn.cifar_files import CLASSES
from labcnn.errors import DataError, WriteError
from labcnn.fileio import atomic_write

ALIASES = {"plane": "airplane", "car": "automobile"}  # folder names some mirrors use
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
LITTER = {"Thumbs.db", "desktop.ini", "__MACOSX", "$RECYCLE.BIN", "lost+found"}
CACHE_VERSION = "2"  # 2: 16-bit images scaled to 8 bits (version 1 clipped them to white)
# Pillow modes holding more than 8 bits per pixel: 16-bit grayscale PNGs open as "I;16"
# (older Pillows: "I"). Their convert("RGB") clips every value above 255 to white.
WIDE_GRAY_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def is_ignored(path: Path) -> bool:
    """Hidden files and folders, and operating-system litter (``Thumbs.db``, ``__MACOSX``...)."""
    return path.name.startswith(".") or path.name in LITTER


def class_folders(split: Path) -> list[Path]:
    """The ten class folders of an image-tree split, in CIFAR-10 label order.

    Folder names must be CIFAR-10's class names, or the aliases in :data:`ALIASES`.

    Raises:
        DataError: ``split`` is missing, or its class folders are not exactly the ten classes.
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
    """Every ``(image path, label)`` of an image-tree split, sorted by label then file name.

    Raises:
        DataError: see :func:`class_folders`; or a class folder holds something other than
            images, or nothing.
    """
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
    """One image-tree split as ``(uint8 [N, 3, 32, 32] RGB, int64 [N] in 0..9)``, in the order of
    :func:`image_files`; decoded once, then served from a cache file next to ``split``.

    The cache ``.labcnn-<split>-<key>.pt`` is keyed by every file's path, size and mtime, so a
    changed source is decoded again; an unwritable folder only costs the cache (a warning).

    Raises:
        DataError: see :func:`image_files` and :func:`decode`.
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
    """One image file as uint8 ``[3, 32, 32]`` RGB (see :func:`to_rgb` for each Pillow mode).

    The format is recognised by the file's content (a JPEG named ``.png`` decodes as JPEG), and
    the size is checked before the pixels are decoded, so a damaged header costs no memory.

    Raises:
        DataError: naming the file, if it is not a 32x32 PNG or JPEG.
    """
    try:
        with Image.open(path, formats=("PNG", "JPEG")) as image:
            if image.size != (32, 32):
                raise DataError(f"{path} is {image.size[0]}x{image.size[1]} pixels; CIFAR-10 images are 32x32")
            pixels = to_rgb(image)
    except DataError:
        raise
    except Exception as e:  # Pillow raises several types on damaged files
        raise DataError(f"cannot decode image {path} ({type(e).__name__}: {e})") from None
    return torch.from_numpy(pixels).permute(2, 0, 1)


def to_rgb(image: Image.Image) -> np.ndarray:
    """The pixels of a Pillow image as uint8 ``[H, W, 3]`` RGB.

    8-bit modes (``1``, ``L``, ``LA``, ``P``, ``PA``, ``RGB``, ``RGBA``, ``CMYK``, ``YCbCr``...)
    give exactly Pillow's ``convert("RGB")``: gray is replicated, palettes are looked up, alpha
    (and a palette's transparency) is dropped, not composited. Wider grayscale
    (:data:`WIDE_GRAY_MODES`) is scaled from 0..65535 to 0..255 by dividing by 257, rounded to
    nearest (values outside 0..65535, possible only in mode ``I``, are clipped first).
    """
    if image.mode in WIDE_GRAY_MODES:
        wide = np.asarray(image).astype(np.int64).clip(0, 65535)
        gray = ((wide + 128) // 257).astype(np.uint8)  # = round(v / 257): v / 257 is never k + 0.5
        return np.repeat(gray[:, :, None], 3, axis=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Palette images with Transparency...": dropped on purpose
        return np.array(image.convert("RGB"))  # a writable copy, as torch.from_numpy wants


def write_cache(cache: Path, tensors: dict) -> None:
    """Write ``tensors`` to ``cache`` through :func:`labcnn.fileio.atomic_write` (concurrent loads
    each write their own temporary file; the last rename wins), then remove older caches of the
    same split. A folder that cannot be written gives a warning, not an error."""
    try:
        atomic_write(cache, lambda f: torch.save(tensors, f))
    except WriteError as e:
        warnings.warn(f"could not write the decode cache {cache} ({e.reason}); the next load decodes again", stacklevel=3)
        return
    prefix = cache.name.rsplit("-", 1)[0] + "-"
    for old in cache.parent.glob(prefix + "*.pt"):
        if old != cache:
            try:
                old.unlink(missing_ok=True)
            except OSError:  # another owner's file in a shared folder: it only costs disk space
                pass
