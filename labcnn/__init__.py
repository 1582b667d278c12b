"""labcnn: the "Simple CNN for CIFAR-10" lab as a small, tested package.

Modules, one concern each: :mod:`labcnn.data` (finding and loading CIFAR-10, with
:mod:`~labcnn.cifar_files`, :mod:`~labcnn.cifar_download` and :mod:`~labcnn.image_tree`),
:mod:`labcnn.transforms` (normalization, subset, validation split, augmentation),
:mod:`labcnn.model` (the lab's CNN), :mod:`labcnn.config` (settings and recipes),
:mod:`labcnn.train` (the training loop), :mod:`labcnn.evaluate` (evaluation),
:mod:`labcnn.checkpoint` (run folders and the one model loader), :mod:`labcnn.device` (devices,
threads, mixed precision, progress), :mod:`labcnn.fileio` (atomic writes and locks),
:mod:`labcnn.plots` (figures), :mod:`labcnn.animations` (GIFs), :mod:`labcnn.arithmetic`
(layer arithmetic), :mod:`labcnn.analysis` and :mod:`labcnn.report` (the notebook's figures and
settings), :mod:`labcnn.bench` (throughput), :mod:`labcnn.time_to_accuracy` (seconds to a test accuracy)
and :mod:`labcnn.cli` (command line).
"""
from importlib.metadata import PackageNotFoundError, version

try:  # one home for the version: pyproject.toml
    __version__ = version("labcnn")
except PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0+checkout"
