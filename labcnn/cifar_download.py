"""Downloading the official CIFAR-10 archive (or a mirror's copy) with torchvision.

The default source is torchvision's ``CIFAR10.url`` (the release's home,
https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz) and its MD5 ``CIFAR10.tgz_md5``.
The download is written only through :func:`labcnn.fileio.staged_dir` and :func:`~labcnn.fileio.make_dir`.
"""
from __future__ import annotations

from pathlib import Path

from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import check_integrity, download_url

from labcnn.cifar_files import ARCHIVE, ARCHIVE_MD5, BATCHES_DIR, placed, refused_write, unpack, write_errors
from labcnn.errors import DataError, WriteError
from labcnn.fileio import make_dir, reason, staged_dir

URL = CIFAR10.url


def download(root: Path, url: str, verify: bool) -> Path:
    """Download the archive from ``url`` with torchvision's ``download_url`` and extract it into
    ``root/cifar-10-batches-py``; returns that folder. The archive is not kept.

    Both steps happen in one :func:`~labcnn.fileio.staged_dir` inside ``root``: a failed,
    interrupted or refused download leaves nothing behind, and of two processes downloading into
    one ``root`` at once, the first to finish is kept. With ``verify``, the archive must have the
    official MD5 (``torchvision.datasets.CIFAR10.tgz_md5``).

    Raises:
        WriteError: ``root`` cannot be created or written.
        DataError: the download failed (no network, unreachable ``url``), the file's MD5 differs
            (with ``verify``), or the archive is damaged.
    """
    advice = "download into a writable folder instead: pass it as root (command line: --data-dir DIR)"
    with write_errors(root, advice):
        make_dir(root)
        with staged_dir(root / BATCHES_DIR) as scratch:
            fetch(url, scratch, root)
            if verify and not check_integrity(str(scratch / ARCHIVE), ARCHIVE_MD5):
                raise DataError(
                    f"the file downloaded from {url} does not match the official CIFAR-10 archive (MD5 "
                    f"{ARCHIVE_MD5} expected, per torchvision.datasets.CIFAR10); nothing was kept. Download "
                    "again, or, for a mirror's re-packed archive, pass verify=False (command line: --no-verify)."
                )
            unpack(scratch / ARCHIVE, scratch, shown=f"the archive downloaded from {url}")
            (scratch / ARCHIVE).unlink()
    return placed(root / BATCHES_DIR, url)


def fetch(url: str, folder: Path, root: Path) -> None:
    """``download_url(url, folder, ARCHIVE)``, its failures (other than a full disk) as one
    :class:`DataError` line naming ``url`` and ``root``."""
    try:
        download_url(url, str(folder), ARCHIVE)
    except Exception as e:  # urllib, http.client and socket raise many types
        if refused_write(e, folder):
            raise WriteError(folder, reason(e)) from None
        what = (str(e).strip().splitlines() or [""])[0]
        raise DataError(
            f"could not download CIFAR-10 from {url} into {root} ({type(e).__name__}: {what}). "
            f"Without internet, copy {ARCHIVE}, {BATCHES_DIR}/ or an image tree train/<class>/, "
            f"test/<class>/ into {root}."
        ) from None
