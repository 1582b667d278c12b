"""labcnn: the "Simple CNN for CIFAR-10" lab as a small, tested package.

Read ``model`` (the network), then ``lab`` (batches, one epoch, evaluation, ``fit``). Above them,
each module importing only those below it: ``settings`` (TrainConfig and the one range table),
``device``, ``fileio``, ``data``, ``checkpoint``, ``plots``, ``harness`` (the run folder around
``fit``), ``animations``, and at the top ``notebook`` and ``cli``.

Every error labcnn raises is a :class:`LabcnnError` with a one-line message.
"""

from importlib.metadata import PackageNotFoundError, version

try:  # one home for the version: pyproject.toml
    __version__ = version("labcnn")
except PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0+checkout"


class LabcnnError(Exception):
    """Base class: the command line prints ``error: <message>`` and exits with status 2."""


class DataError(LabcnnError):
    """CIFAR-10 files are missing, damaged, or in no layout ``labcnn.data.load_cifar10`` reads."""


class CheckpointError(LabcnnError):
    """A checkpoint is unreadable, of another model, version, run or data set."""


class ConfigError(LabcnnError, ValueError):
    """A setting is out of range or unknown; the message names it and the accepted values."""


class DeviceError(ConfigError):
    """A device name is unknown, or names a device this machine does not have."""


class TrainingDiverged(LabcnnError):
    """The training loss became NaN or infinite; the last finite checkpoint is kept."""


class RunFolderBusy(LabcnnError):
    """Another process is training into the same run folder."""


class WriteError(LabcnnError):
    """A file or folder could not be written: ``.path`` and ``.reason`` (``Permission denied``)."""

    def __init__(self, path, reason: str, advice: str | None = None):
        self.path, self.reason = path, reason
        advice = advice or "make its folder writable and free disk space, or choose another folder"
        super().__init__(f"cannot write {path} ({reason}): {advice}")
