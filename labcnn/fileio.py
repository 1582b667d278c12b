"""Every file and folder labcnn writes goes through here: one atomic writer (a hidden temporary
file, ``fsync``, ``os.replace``: a crash or full disk leaves the previous file whole), one staged
folder, one run-folder lock, and one warning per optional write that fails."""
import errno
import functools
import json
import os
import shutil
import tempfile
import warnings
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

from labcnn import RunFolderBusy, WriteError

try:  # POSIX: the kernel releases a flock when its process dies, so no lock is left stuck
    import fcntl
except ImportError:  # Windows: no lock
    fcntl = None

NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EBADF, errno.EOPNOTSUPP, errno.EINVAL}
_MASK = os.umask(0)  # read once, at import: umask() sets it for every thread of the process
os.umask(_MASK)
FILE_MODE = 0o666 & ~_MASK  # what open() gives; mkstemp alone gives 0o600

@functools.cache  # remembers the messages already shown
def warn_once(message: str) -> None:
    """``warnings.warn(message)`` the first time this process meets ``message``; then silence."""
    warnings.warn(message, UserWarning, stacklevel=2)

def reason(error: BaseException) -> str:  # an OSError's strerror, else the first line
    text = (getattr(error, "strerror", None) or str(error)).strip()
    return text.splitlines()[0] if text else type(error).__name__

def atomic_write(path, write, advice: str | None = None) -> None:
    """Create ``path`` atomically by calling ``write(f)`` on a binary file; WriteError naming it
    (and ``advice``) on OSError or RuntimeError (torch.save's full disk). A refused chmod (FAT,
    SMB) is ignored."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise WriteError(path, reason(e), advice) from None
    try:
        with suppress(OSError):  # the mode is a courtesy; never a reason to lose the file
            os.chmod(tmp, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)):
            raise WriteError(path, reason(e), advice) from None
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
    """Yield an empty hidden folder beside ``target``, renamed to it if the block succeeds, else
    removed; a ``target`` another process put in place first is kept. Raises WriteError."""
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
    """Hold ``flock`` on ``folder/.lock`` for the block; RunFolderBusy when another process holds
    it. Without locks (NFS without lockd, Lustre/GPFS without flock, some FUSE mounts) or a lock
    file, the run goes on after one warning; another flock failure is a WriteError."""
    lock, tip = Path(folder) / ".lock", "make sure no other run trains into it"
    with ExitStack() as stack:
        try:
            handle = stack.enter_context(open(lock, "a")) if fcntl is not None else None
        except OSError as e:
            handle = None
            warn_once(f"cannot lock {folder} ({reason(e)}): {tip}")
        try:
            if handle is not None:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderBusy(f"{folder} is in use by another training process: wait for it "
                                "to end, or choose another --out folder") from None
        except OSError as e:
            if e.errno not in NO_LOCKS:
                raise WriteError(lock, reason(e)) from None
            warn_once(f"cannot lock {folder} ({reason(e)}; this file system has no locks): {tip}")
        yield
