"""Every file and folder labcnn writes goes through here: one atomic writer (a hidden temporary
file, ``fsync``, ``os.replace``: a crash or a full disk leaves the previous file whole), one
staged folder, one run-folder lock, one warning per optional step a file system refuses.
Text is UTF-8 whatever the locale (a GBK or cp1252 default would misread a notebook)."""

import errno
import functools
import json
import os
import shutil
import tempfile
import time
import warnings
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

from labcnn import LabcnnError, RunFolderBusy, WriteError

try:  # POSIX: the kernel releases a flock when its process dies, so no lock is left stuck
    import fcntl
except ImportError:  # Windows: no lock
    fcntl = None

# What a file system without the operation answers (NFS without lockd, CIFS, vboxsf, FUSE).
UNSUPPORTED = {errno.ENOLCK, errno.ENOSYS, errno.EBADF, errno.EOPNOTSUPP, errno.EINVAL}
# A scratch folder left this long by a killed process is stale; an extraction takes seconds.
STALE_SECONDS = 3600
_MASK = os.umask(0)  # read once, at import: umask() sets it for every thread of the process
os.umask(_MASK)
FILE_MODE = 0o666 & ~_MASK  # what open() gives; mkstemp alone gives 0o600


@functools.cache  # remembers the messages already shown
def warn_once(message: str) -> None:
    """``warnings.warn(message)`` the first time this process meets ``message``; then silence."""
    warnings.warn(message, UserWarning, stacklevel=2)


def reason(error: BaseException) -> str:
    """An OSError's ``strerror`` (``"Permission denied"``), else the error's first line."""
    text = (getattr(error, "strerror", None) or str(error)).strip()
    return text.splitlines()[0] if text else type(error).__name__


def broken_link(path) -> str | None:
    """``"a broken link to TARGET"`` if ``path`` is a link whose target is missing, else None."""
    if Path(path).is_symlink() and not Path(path).exists():
        return f"a broken link to {os.readlink(path)}"
    return None


def atomic_write(path, write, advice: str | None = None) -> None:
    """Create ``path`` atomically by calling ``write(f)`` on a binary file; WriteError naming it
    (and ``advice``) on OSError or RuntimeError (torch.save's full disk). A refused chmod (FAT,
    SMB) or fsync (CIFS, vboxsf) is skipped, with one warning for the fsync."""
    path = Path(path)
    try:  # a short temporary name: any name the file system accepts can be written
        fd, tmp = tempfile.mkstemp(prefix=".labcnn-", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise WriteError(path, reason(e), advice) from None
    try:
        with suppress(OSError):  # the mode is a courtesy; never a reason to lose the file
            os.chmod(tmp, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            sync(f.fileno(), path)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, (OSError, RuntimeError)):
            raise WriteError(path, reason(e), advice) from None
        raise


def sync(fd: int, path: Path) -> None:
    """``os.fsync(fd)``; where the file system has no fsync, one warning and the write goes on."""
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in UNSUPPORTED:
            raise
        warn_once(f"cannot fsync in {path.parent} ({reason(e)}): a power cut may lose a file")


def write_json(path, value) -> None:
    """``value`` as strict JSON in UTF-8 (NaN and infinities raise ValueError), atomically."""
    text = json.dumps(value, indent=1, allow_nan=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def read_json(path, expected: str):
    """The JSON in ``path`` (UTF-8); LabcnnError naming it and the ``expected`` content."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise LabcnnError(f"{path} is not {expected} ({type(e).__name__}: {e})") from None


def read_notebook(path) -> dict:
    """The Jupyter notebook ``path`` as a dict whose ``cells`` are dicts with a ``source``;
    LabcnnError if it is not one."""
    notebook = read_json(path, "a Jupyter notebook")
    cells = notebook.get("cells") if isinstance(notebook, dict) else None
    if not isinstance(cells, list) or not all(isinstance(c, dict) and "source" in c for c in cells):
        raise LabcnnError(f"{path} is not a Jupyter notebook (it has no list of cells)")
    return notebook


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
    removed; a ``target`` another process put in place first is kept. Scratch folders that a
    killed process left (older than STALE_SECONDS) are removed first. Raises WriteError."""
    target = Path(target)
    prefix = f".{target.name}."
    for old in target.parent.glob(f"{prefix}*.tmp"):
        with suppress(OSError):
            if old.is_dir() and time.time() - old.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(old)
    try:
        scratch = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=target.parent))
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
    it (Windows: no lock). Without locks (NFS without lockd, Lustre/GPFS without flock, some FUSE
    mounts) or a lock file, the run goes on after one warning; another flock failure: WriteError."""
    lock, tip = Path(folder) / ".lock", "make sure no other run trains into it"
    with ExitStack() as held:  # closes the lock file, which releases the lock, after the block
        try:
            handle = held.enter_context(open(lock, "ab"))
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderBusy(
                f"{folder} is in use by another training process: wait for it to end, "
                "or choose another --out folder"
            ) from None
        except OSError as e:
            if e.filename is None and e.errno not in UNSUPPORTED:  # flock's own failure
                raise WriteError(lock, reason(e)) from None
            why = reason(e) if e.filename else f"{reason(e)}; this file system has no locks"
            warn_once(f"cannot lock {folder} ({why}): {tip}")
        yield
