"""Loading CIFAR-10 into memory as uint8 tensors, from any of its common layouts.

:func:`load_cifar10` reads one of three layouts:

1. ``batches``: the official python release, a folder holding ``data_batch_1`` ..
   ``data_batch_5``, ``test_batch`` and ``batches.meta``, checked against torchvision's MD5s
   (:mod:`labcnn.cifar_files`);
2. ``archive``: the official ``cifar-10-python.tar.gz``, checked, then extracted next to itself
   into ``cifar-10-batches-py/``;
3. ``images``: an image-folder tree ``train/<class>/*.png|jpg`` and ``test/<class>/...``, named
   with the ten classes, decoded once and cached beside the tree (:mod:`labcnn.image_tree`);

or, when none is found and ``download=True``, downloads the archive (torchvision's official URL,
or a mirror's; :mod:`labcnn.cifar_download`).

The search rule, the same for every layout: the searched folders are ``root`` itself and its
visible subfolders, one level below (sorted by name; hidden folders and litter such as
``__MACOSX`` skipped). In a searched folder ``F``:

* ``batches`` is ``F`` itself when ``F`` holds batch files, else ``F/cifar-10-batches-py/`` when
  that holds batch files (where the archive of ``F`` extracts to). A folder counts as a batches
  folder only because it holds batch files, never because of its name;
* ``archive`` is ``F/cifar-10-python.tar.gz``;
* ``images`` is ``F`` when it holds ``train/`` or ``test/``.

``batches`` in any searched folder wins over ``archive``, which wins over ``images``; among
searched folders, ``root`` comes first. When nothing is found but one of the visible subfolders
of the searched folders (two levels below ``root``) holds a layout by the same rule, the error
names it (``found CIFAR-10 at X, one level deeper than searched``) instead of downloading.

Source of the data set: Krizhevsky, 2009, "Learning Multiple Layers of Features from Tiny
Images", https://www.cs.toronto.edu/~kriz/cifar.html.
"""
from __future__ import annotations

from pathlib import Path

from labcnn import cifar_download
from labcnn.cifar_download import URL
from labcnn.cifar_files import ARCHIVE, BATCHES_DIR, CLASSES, extract, holds_batches, read_batches
from labcnn.errors import DataError
from labcnn.image_tree import is_ignored, read_image_tree

__all__ = ["CLASSES", "load_cifar10", "find_source", "search_folders"]

KINDS = ("batches", "archive", "images")  # precedence of the layouts


def load_cifar10(root, train: bool = True, download: bool = False, verify: bool = True, url: str | None = None):
    """Load one CIFAR-10 split into memory.

    Args:
        root: folder holding the data, found by the module's search rule; ``~`` and relative
            paths are expanded.
        train: the 50,000-image training split if true, else the 10,000-image test split.
        download: when nothing is found, download the archive from ``url`` into
            ``root/cifar-10-batches-py`` (needs internet). Data found locally is always used first.
        verify: check the official files (and a download) against torchvision's MD5s. A
            re-packed copy in the official layout loads only with ``verify=False``, with a warning.
        url: where to download from (a course mirror); default torchvision's
            ``CIFAR10.url``, https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz.

    Returns:
        ``(images, labels)``: ``images`` uint8 ``[N, 3, 32, 32]`` (RGB, 0..255), ``labels`` int64
        ``[N]`` with values in ``0..9`` indexing :data:`CLASSES`.

    Raises:
        DataError: no data found (the message lists the folders searched, or names the data
            found one level deeper), a file is missing, damaged, unreadable or of the wrong shape,
            or the download failed.
        WriteError: the archive must be extracted, or the download saved, in a folder that
            cannot be written (read-only input, full disk); the message says what to do.
    """
    root = Path(root).expanduser().resolve()
    url = url or URL
    try:
        kind, path = find_source(root)
        if kind is None:
            deeper = find_deeper(root)
            if deeper is not None:
                raise DataError(f"found CIFAR-10 at {deeper}, one level deeper than searched: pass --data-dir {deeper}")
            if not download:
                raise DataError(not_found_message(root, url))
            kind, path = "batches", cifar_download.download(root, url, verify)
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


def layouts_in(folder: Path) -> dict[str, Path]:
    """The layouts the search rule finds in ``folder`` (see the module): ``{kind: path}``."""
    found = {}
    for batches in (folder, folder / BATCHES_DIR):
        if holds_batches(batches):
            found["batches"] = batches
            break
    if (folder / ARCHIVE).is_file():
        found["archive"] = folder / ARCHIVE
    if (folder / "train").is_dir() or (folder / "test").is_dir():
        found["images"] = folder
    return found


def find_source(root: Path) -> tuple[str | None, Path | None]:
    """The layout the search rule picks under ``root``: ``("batches", folder)``,
    ``("archive", file)``, ``("images", folder)`` or ``(None, None)``."""
    found = [layouts_in(folder) for folder in search_folders(root)]
    for kind in KINDS:
        for layouts in found:
            if kind in layouts:
                return kind, layouts[kind]
    return None, None


def find_deeper(root: Path) -> Path | None:
    """The first folder two levels below ``root`` (a visible subfolder of a visible subfolder)
    holding a layout by the search rule, or ``None``: passed as ``root``, it would load."""
    for child in search_folders(root)[1:]:
        for grandchild in search_folders(child)[1:]:
            if layouts_in(grandchild):
                return grandchild
    return None


def not_found_message(root: Path, url: str) -> str:
    """The :class:`DataError` text when no layout is found under ``root``."""
    searched = ", ".join(str(p) for p in search_folders(root))
    return (
        f"no CIFAR-10 data found in {root} (searched: {searched}). Put there the folder "
        f"{BATCHES_DIR}/, the archive {ARCHIVE}, or an image tree train/<class>/ and "
        f"test/<class>/; or pass download=True (command line: --download) to fetch the archive "
        f"from {url} (needs internet)."
    )
