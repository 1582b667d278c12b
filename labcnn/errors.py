"""The project's error types: each one is a user-facing problem with a one-line message."""
from __future__ import annotations


class LabcnnError(Exception):
    """Base class: the command line prints ``error: <message>`` and exits with status 2."""


class DataError(LabcnnError):
    """CIFAR-10 files are missing, damaged, or not in a layout :func:`labcnn.data.load_cifar10` reads."""


class CheckpointError(LabcnnError):
    """A checkpoint is unreadable, from another model or a different configuration, or cannot be
    written (disk full); the last complete checkpoint stays on disk."""


class TrainingDiverged(LabcnnError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


class ConfigError(LabcnnError, ValueError):
    """A training setting is out of range or unknown."""


class WriteError(LabcnnError):
    """A file or folder could not be written (no permission, read-only or full disk).

    Attributes: ``path`` (the file or folder), ``reason`` (a few words, e.g. ``Permission denied``).
    """

    def __init__(self, path, reason: str, advice: str | None = None):
        self.path, self.reason = path, reason
        advice = advice or "make its folder writable and free disk space, or choose another folder"
        super().__init__(f"cannot write {path} ({reason}): {advice}")


class RunFolderBusy(LabcnnError):
    """Another process is training into the same run folder."""


class DeviceError(LabcnnError, ValueError):
    """A device name is unknown, or names a device this machine does not have."""
