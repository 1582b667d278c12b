"""Every file and folder labcnn writes goes through here: one atomic writer (a hidden temporary
file, ``fsync``, ``os.replace``: a crash or full disk leaves the previous file whole), one staged
folder, one run-folder lock, and one warning per optional write that fails.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

from labcnn import RunFolderBusy, WriteError

try:  # POSIX: the kernel releases a flock when its process dies, so no lock is left stuck
    import fcntl
except ImportError:  # Windows: no lock (one warning)
    fcntl = None

LOCK = ".lock"
# flock on NFS without lockd, Lustre/GPFS without flock, some FUSE mounts: no locks there.
NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EBADF, errno.EOPNOTSUPP, errno.EINVAL}
_warned: set[str] = set()

def warn_once(message: str) -> None:
    """``warnings.warn(message)`` the first time this process meets ``message``; then silence."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, UserWarning, stacklevel=2)

def reason(error: BaseException) -> str:
    """``error`` in a few words: an OSError's ``strerror``, else its message's first line."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

_MASK = os.umask(0)  # read once, at import: umask() sets it for every thread of the process
os.umask(_MASK)
FILE_MODE = 0o666 & ~_MASK  # what open() gives; mkstemp alone gives 0o600

def atomic_write(path, write) -> None:
    """Create ``path`` by calling ``write(f)`` on a binary file, atomically. Raises WriteError
    naming ``path`` when the folder is unwritable, the disk full, or ``write`` raised OSError or
    RuntimeError (``torch.save``'s full disk); a refused ``chmod`` (FAT, SMB) is no error."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise WriteError(path, reason(e)) from None
    try:
        try:
            os.chmod(tmp, FILE_MODE)
        except OSError:
            pass  # the mode is a courtesy; never a reason to lose the file
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
    """``value`` as strict JSON (NaN and infinities raise ValueError), written atomically."""
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
    """Yield an empty hidden folder beside ``target``, renamed to ``target`` when the block
    succeeds and removed otherwise: a folder appears whole or not at all. When another process
    put ``target`` in place first, its copy is kept. Raises :class:`WriteError`."""
    target = Path(target)
    try:
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp",
                                        dir=target.parent))
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
    """Hold ``folder``'s lock (``flock`` on ``folder/.lock``) for the block; RunFolderBusy when
    another process holds it. Without locks (NFS without lockd, Lustre or GPFS without flock) or
    a lock file, the run goes on after one warning; another flock failure is a WriteError."""
    lock = Path(folder) / LOCK
    try:
        handle = open(lock, "a") if fcntl is not None else None
    except OSError as e:
        handle = None
        warn_once(f"cannot lock {folder} ({reason(e)}): make sure no other run trains into it")
    if handle is None:
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderBusy(f"{folder} is in use by another training process: wait for it "
                                "to end, or choose another --out folder") from None
        except OSError as e:
            if e.errno not in NO_LOCKS:
                raise WriteError(lock, reason(e)) from None
            warn_once(f"cannot lock {folder} ({reason(e)}; this file system has no locks): "
                      "make sure no other run trains into it")
        yield
