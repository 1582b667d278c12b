"""labcnn: the "Simple CNN for CIFAR-10" lab as a small, tested package.

Modules: :mod:`labcnn.data` (loading CIFAR-10), :mod:`labcnn.model` (the lab's CNN),
:mod:`labcnn.train` (training, evaluation, checkpoints), :mod:`labcnn.plots` (figures),
:mod:`labcnn.animations` (convolution and max-pooling GIFs), :mod:`labcnn.cli` (command line).
"""

__version__ = "0.1.0"
