"""Every file and folder labcnn writes goes through here: one atomic writer, one staged folder, one
run-folder lock. Callers decide only how to report a failure (an error, or a warning and go on).

The writer's policy: write a uniquely named hidden temporary file in the target's folder, flush
and ``fsync`` it, then ``os.replace`` it onto the target. A crash, kill, Ctrl-C or full disk at
any point leaves the previous file in place (a kill may leave a ``.NAME.*.tmp`` file, which is
never read). Two processes writing the same file never share a temporary file; the last rename wins.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from labcnn.errors import RunFolderBusy, WriteError

try:  # POSIX (Linux, macOS): the kernel releases the lock when the process dies
    import fcntl
except ImportError:  # Windows: a lock file, best effort (a crash leaves it; see run_lock)
    fcntl = None

LOCK = ".lock"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give; mkstemp alone gives 0o600


def reason(error: BaseException) -> str:
    """``error`` in a few words: an OSError's ``strerror`` (``No space left on device``), else
    the first line of its message (``torch.save`` raises RuntimeError with a long text)."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def atomic_write(path, write) -> None:
    """Create ``path`` by calling ``write(f)`` on a binary file object, atomically (see the module).

    Raises:
        WriteError: the folder is missing or unwritable, the disk is full, or ``write`` raised
            OSError or RuntimeError (``torch.save`` reports a full disk as RuntimeError). The
            error names ``path`` and says whether a previous version of it is kept.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise WriteError(path, reason(e)) from None
    try:
        if hasattr(os, "fchmod"):  # not on Windows, where the mode does not apply
            os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)):
            raise WriteError(path, reason(e)) from None
        raise


def write_json(path, value) -> None:
    """Write ``value`` as strict JSON (``NaN`` and infinities refused with ValueError) through
    :func:`atomic_write`."""
    text = json.dumps(value, indent=1, allow_nan=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def make_dir(folder) -> Path:
    """``mkdir -p folder``; raises :class:`WriteError` naming it if that fails."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(folder, reason(e)) from None
    return folder


@contextmanager
def staged_dir(target):
    """Yield an empty hidden folder beside ``target``; when the block succeeds, rename it to
    ``target``. On error the folder is removed, so nothing partial is ever at ``target``.

    When another process put ``target`` in place first (two notebooks preparing one data folder),
    its copy is kept and this one dropped. Raises :class:`WriteError` when the scratch folder
    cannot be made.
    """
    target = Path(target)
    try:
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except OSError as e:
        raise WriteError(target.parent, reason(e)) from None
    try:
        yield scratch
        try:
            os.replace(scratch, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextmanager
def run_lock(folder):
    """Hold ``folder``'s lock for the block; a second process asking for it is refused at once.

    ``fcntl.flock`` on Linux and macOS: the kernel drops the lock when its process ends, crash
    or kill included, so no lock is ever left stuck. Elsewhere an exclusively created lock file,
    removed at the end of the block (a crash leaves it: the message says to delete it).

    Raises:
        RunFolderBusy: another process holds the lock.
        WriteError: the lock file cannot be created.
    """
    lock = Path(folder) / LOCK
    if fcntl is None:
        yield from _lock_file(lock)
        return
    try:
        handle = open(lock, "a")
    except OSError as e:
        raise WriteError(lock.parent, reason(e)) from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderBusy(f"{folder} is in use by another training process: wait for it to end, or choose another --out folder") from None
        yield


def _lock_file(lock: Path):
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        raise RunFolderBusy(
            f"{lock.parent} is in use by another training process (if none is running, a crashed run left {lock}: delete it)"
        ) from None
    except OSError as e:
        raise WriteError(lock.parent, reason(e)) from None
    os.close(fd)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
