"""The lab's CNN for CIFAR-10, exactly as the lab specifies it.

Three blocks of ``Conv2d(kernel_size=2, stride=1, padding=1)`` + ``BatchNorm2d`` + ``ReLU`` +
``MaxPool2d(2)`` with 32, 64 and 128 channels, then ``Linear`` 2048 -> 256 -> 128 -> 10 with
ReLU in between: 600,746 trainable parameters.
"""
from __future__ import annotations

import torch
from torch import nn

NUM_CLASSES = 10
INPUT_SIZE = (1, 3, 32, 32)  # one CIFAR-10 image, [N, C, H, W]
# The lab's layer settings, used by the model and by the GIFs that explain it (labcnn.animations).
KERNEL_SIZE, STRIDE, PADDING = 2, 1, 1  # every Conv2d
POOL_SIZE = 2  # MaxPool2d(2): a 2x2 window, stride 2 (the stride defaults to the window size)
CHANNELS = (32, 64, 128)  # out_channels of conv1, conv2, conv3


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """One lab block: a 2x2 convolution (stride 1, padding 1), BatchNorm, ReLU, 2x2 max pooling.

    Spatially ``H -> H + 1`` (``floor((H + 2*1 - 2) / 1) + 1``) then ``-> floor((H + 1) / 2)``,
    so 32 -> 33 -> 16, 16 -> 17 -> 8 and 8 -> 9 -> 4.
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=KERNEL_SIZE, stride=STRIDE, padding=PADDING),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(POOL_SIZE),
    )


class LabCNN(nn.Module):
    """The lab's network, with the lab's submodule names.

    Input: float32 ``[N, 3, 32, 32]``, normalized images. Output: float32 logits ``[N, 10]``.
    Intermediate shapes for ``N = 1``: ``conv1`` -> ``[1, 32, 16, 16]``, ``conv2`` ->
    ``[1, 64, 8, 8]``, ``conv3`` -> ``[1, 128, 4, 4]``, flattened to 2048 features.
    """

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.conv1 = conv_block(3, CHANNELS[0])
        self.conv2 = conv_block(CHANNELS[0], CHANNELS[1])
        self.conv3 = conv_block(CHANNELS[1], CHANNELS[2])
        self.fc1 = nn.Linear(CHANNELS[2] * 4 * 4, 256)
        self.fc2 = nn.Linear(256, 128)
        self.fc3 = nn.Linear(128, num_classes)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3(self.conv2(self.conv1(x)))
        x = torch.flatten(x, 1)
        x = self.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        return self.fc3(x)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (600,746 for :class:`LabCNN`)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def summary(model: nn.Module, depth: int = 2):
    """The per-layer table of ``model`` for one ``[1, 3, 32, 32]`` input, built on torchinfo.

    Returns torchinfo's ``ModelStatistics`` (its ``str`` is the table, ending with the parameter
    count, the exact number of multiply-adds and the memory in MB of 1e6 bytes). The model stays on its
    device and in its train/eval mode: torchinfo is run on a CPU copy, since
    ``torchinfo.summary`` moves the model to CUDA when one is available and switches it to eval.
    """
    import copy

    import torchinfo

    copy_on_cpu = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format)
    stats = torchinfo.summary(
        copy_on_cpu,
        input_size=INPUT_SIZE,
        device="cpu",
        depth=depth,
        col_names=("output_size", "num_params"),
        row_settings=("var_names",),
        verbose=0,
    )
    # torchinfo 1.8.0 on Python 3.11+ labels scaled mult-adds "(Units.MEGABYTES)"; print the exact count.
    stats.formatting.macs_units = torchinfo.Units.NONE
    return stats


# A filter whose weights' L2 norm is below this is counted as collapsed: it outputs (almost) a
# constant, so it detects nothing. The filter figure (labcnn.plots.plot_filters) marks the same ones.
COLLAPSE_NORM = 1e-2


def filter_norms(weight: torch.Tensor) -> torch.Tensor:
    """The L2 norm of each filter of a convolution weight ``[C_out, C_in, k, k]``: float32 ``[C_out]``
    on the CPU. Raises ValueError unless ``weight`` is 4-D."""
    if weight.dim() != 4:
        raise ValueError(f"expected a convolution weight [C_out, C_in, k, k], got shape {tuple(weight.shape)}")
    return weight.detach().float().cpu().flatten(1).norm(dim=1)


def collapsed_filters(model: LabCNN, threshold: float = COLLAPSE_NORM) -> dict[str, tuple[int, int]]:
    """Per convolution, ``(filters whose L2 norm is below threshold, filters)``, by :func:`filter_norms`."""
    return {
        name: (int((filter_norms(conv[0].weight) < threshold).sum()), conv[0].weight.shape[0])
        for name, conv in (("conv1", model.conv1), ("conv2", model.conv2), ("conv3", model.conv3))
    }
