"""The official CIFAR-10 python release: its batch files and its archive (downloads:
:mod:`labcnn.cifar_download`).

* ``cifar-10-batches-py/``: ``data_batch_1`` .. ``data_batch_5`` (10,000 images each),
  ``test_batch`` (10,000) and ``batches.meta`` (the class names), each a pickled dict with
  ``data`` (uint8 ``[N, 3072]``: 1024 red, then 1024 green, then 1024 blue values, row-major)
  and ``labels`` (N integers in 0..9). Read without running code (:class:`NumpyOnlyUnpickler`).
* ``cifar-10-python.tar.gz``: the archive holding that folder. File names, download URL and
  MD5s are torchvision's (``torchvision.datasets.CIFAR10``).

Folders are written only through :func:`labcnn.fileio.staged_dir`: a batches folder appears
complete or not at all; of two processes preparing one folder at once, the first copy is kept.

Source of the data set: Krizhevsky, 2009, "Learning Multiple Layers of Features from Tiny
Images", https://www.cs.toronto.edu/~kriz/cifar.html.
"""
from __future__ import annotations

import errno
import pickle
import tarfile
import warnings
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import check_integrity

from labcnn.errors import DataError, WriteError
from labcnn.fileio import reason, staged_dir

# Label order of the official release (batches.meta, label_names): index = label.
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

BATCHES_DIR = CIFAR10.base_folder  # "cifar-10-batches-py"
ARCHIVE = CIFAR10.filename  # "cifar-10-python.tar.gz"
ARCHIVE_MD5 = CIFAR10.tgz_md5
# errno values that mean "this folder cannot take the files", as opposed to a damaged archive.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def batch_files(train: bool | None = None) -> list[tuple[str, str]]:
    """``(file name, MD5)`` pairs of the official release, from torchvision's ``CIFAR10``:
    the training batches (``train=True``), the test batch (``False``) or all seven files (``None``)."""
    if train is None:
        return CIFAR10.train_list + CIFAR10.test_list + [[CIFAR10.meta["filename"], CIFAR10.meta["md5"]]]
    return CIFAR10.train_list if train else CIFAR10.test_list


def holds_batches(folder: Path) -> bool:
    """Whether ``folder`` directly holds at least one file of the release (whatever its own name)."""
    return any((folder / name).is_file() for name, _ in batch_files())


def check_file(path: Path, md5: str, verify: bool) -> None:
    """Raise :class:`DataError` if ``path`` is missing or, with ``verify``, its MD5 differs."""
    if not path.is_file():
        raise DataError(f"missing CIFAR-10 file {path}: expected the official release's {path.name}")
    if verify and not check_integrity(str(path), md5):
        raise DataError(
            f"{path} does not match the official CIFAR-10 release (MD5 {md5} expected, per "
            "torchvision.datasets.CIFAR10): it is truncated, damaged or re-packed. Download it "
            "again, or pass verify=False (command line: --no-verify) to load a re-packed copy."
        )


def read_batches(folder: Path, train: bool, verify: bool):
    """One split of a batches folder: ``(uint8 [N, 3, 32, 32] RGB, int64 [N] in 0..9)``, N = 50,000
    (``train``) or 10,000 for the release. Warns when ``verify`` is false.

    Raises:
        DataError: a file is missing, fails its MD5 (with ``verify``), is damaged or has the wrong
            keys, shapes, labels or class names.
    """
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
    """Extract the official archive next to itself; returns the new ``cifar-10-batches-py`` folder.

    Unpacked in a :func:`~labcnn.fileio.staged_dir` (a hidden folder, which searches skip),
    renamed into place only once every file of the release is there.

    Raises:
        WriteError: the archive's folder cannot be written (read-only input, full disk); the
            message says how to extract it elsewhere.
        DataError: the archive fails its MD5 (with ``verify``), is truncated or damaged, holds
            links or paths outside its folder, or lacks a file of the release; or a folder
            ``cifar-10-batches-py`` without batch files is in the way.
    """
    advice = (f"extract the archive elsewhere (tar -xzf {archive} -C DIR) and pass that DIR "
              f"(command line: --data-dir DIR), or point --data-dir at a writable copy of {archive.parent}")
    target = archive.parent / BATCHES_DIR
    with write_errors(archive.parent, advice), staged_dir(target) as scratch:
        if verify:
            check_file(archive, ARCHIVE_MD5, verify)
        unpack(archive, scratch)
    return placed(target, archive)


def placed(target: Path, source) -> Path:
    """``target`` if it holds batch files; else :func:`~labcnn.fileio.staged_dir` kept a folder that
    was already there and is not another process's copy: a :class:`DataError` naming ``source``."""
    if not holds_batches(target):
        raise DataError(f"cannot extract {source}: {target} is in the way (a folder without batch files); move or delete it")
    return target


@contextmanager
def write_errors(folder: Path, advice: str):
    """Within the block, a :class:`WriteError` becomes ``WriteError(folder, reason, advice)``."""
    try:
        yield
    except WriteError as e:
        raise WriteError(folder, e.reason, advice) from None


def refused_write(error: BaseException, folder: Path) -> bool:
    """Whether ``error`` means that ``folder`` cannot take files (full disk, read-only, no
    permission to write in it) rather than that a source file is unreadable or damaged."""
    if not isinstance(error, OSError) or error.errno not in WRITE_ERRNOS:
        return False
    if error.errno in (errno.EACCES, errno.EPERM):  # also raised when reading: only under folder
        return error.filename is not None and Path(error.filename).is_relative_to(folder)
    return True


def unpack(archive: Path, folder: Path, shown=None) -> None:
    """Unpack the release's ``cifar-10-batches-py/`` members of ``archive`` directly into ``folder``;
    messages name the archive as ``shown`` (default: its path).

    Raises:
        DataError: the archive is truncated or damaged, a member is refused (see
            :func:`extract_tar`), or a file of the release is missing.
        WriteError: ``folder`` cannot take the files (full disk, permissions; see :func:`refused_write`).
        PermissionError: the archive cannot be read.
    """
    try:
        extract_tar(archive, folder, shown)
    except DataError:
        raise
    except Exception as e:  # tarfile, gzip and zlib raise several types on truncated input
        if refused_write(e, folder):
            raise WriteError(folder, reason(e)) from None
        if isinstance(e, PermissionError):  # reading the archive: load_cifar10 says "cannot read"
            raise
        raise DataError(f"could not extract {shown or archive} ({type(e).__name__}: {e}); it is truncated or damaged") from None
    missing = [name for name, _ in batch_files() if not (folder / name).is_file()]
    if missing:
        raise DataError(f"{shown or archive} lacks {BATCHES_DIR}/{', '.join(missing)}: expected the CIFAR-10 python archive")


def inside_batches_dir(name: str) -> str | None:
    """``cifar-10-batches-py/x`` -> ``x``; ``None`` for members outside that folder, or the folder itself."""
    parts = PurePosixPath(name).parts
    return "/".join(parts[1:]) if len(parts) > 1 and parts[0] == BATCHES_DIR else None


def extract_tar(archive: Path, folder: Path, shown=None) -> None:
    """Unpack the files under ``cifar-10-batches-py/`` in ``archive`` directly into ``folder``
    (other members are skipped), refusing any member that would land outside ``folder``.

    Uses tarfile's ``"data"`` filter (Python 3.12, 3.11.4, 3.10.12 and later) on every member;
    on older Pythons only plain files and folders with relative, ``..``-free names are accepted.

    Raises:
        DataError: a member is a link, device or absolute/escaping path (other tarfile errors propagate).
    """
    def refuse(what):
        return DataError(f"{shown or archive}: refusing a member ({what}); expected plain files inside the archive's folder")

    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            def keep(member, dest):
                member = tarfile.data_filter(member, dest)
                name = inside_batches_dir(member.name)
                return member.replace(name=name, deep=False) if name else None

            try:
                tar.extractall(folder, filter=keep)
            except tarfile.FilterError as e:
                raise refuse(e) from None
            return
        members = tar.getmembers()
        for member in members:
            name = Path(member.name)
            if not (member.isfile() or member.isdir()) or name.is_absolute() or ".." in name.parts:
                raise refuse(repr(member.name))
            member.name = inside_batches_dir(member.name)
        tar.extractall(folder, members=[m for m in members if m.name])
