"""The project's error types: each one is a user-facing problem with a one-line message."""


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
