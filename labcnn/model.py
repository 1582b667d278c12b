"""The lab's CNN for CIFAR-10 (600,746 parameters), the normalization a trained one must be used
with, and the arithmetic of its layers."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from labcnn import ConfigError

NUM_CLASSES = 10
INPUT_SIZE = (1, 3, 32, 32)  # one CIFAR-10 image, [N, C, H, W]
KERNEL_SIZE, STRIDE, PADDING = 2, 1, 1  # every Conv2d (also drawn by labcnn.animations)
POOL_SIZE = 2  # MaxPool2d(2): a 2x2 window, stride 2 (the stride defaults to the window)
CHANNELS = (32, 64, 128)  # out_channels of conv1, conv2, conv3


class LabCNN(nn.Module):
    """The lab's network, with the lab's submodule names.

    Input: float32 ``[N, 3, 32, 32]``, normalized images. Output: float32 logits ``[N, 10]``.
    Each block maps a side ``H`` to ``H + 1`` (the 2x2 convolution with padding 1), then halves
    it, rounding down (the pooling): 32 -> 33 -> 16 -> 17 -> 8 -> 9 -> 4, so 128 x 4 x 4 = 2048
    features reach ``fc1``.
    """

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.conv1 = self.block(3, CHANNELS[0])
        self.conv2 = self.block(CHANNELS[0], CHANNELS[1])
        self.conv3 = self.block(CHANNELS[1], CHANNELS[2])
        self.fc1 = nn.Linear(CHANNELS[2] * 4 * 4, 256)
        self.fc2 = nn.Linear(256, 128)
        self.fc3 = nn.Linear(128, num_classes)
        self.relu = nn.ReLU(inplace=True)

    @staticmethod
    def block(in_channels: int, out_channels: int) -> nn.Sequential:
        """One block: convolution, BatchNorm, ReLU, then 2x2 max pooling."""
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, KERNEL_SIZE, stride=STRIDE, padding=PADDING),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(POOL_SIZE),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, 10]`` of normalized images ``[N, 3, 32, 32]``."""
        x = self.conv3(self.conv2(self.conv1(x)))
        x = torch.flatten(x, 1)
        x = self.relu(self.fc1(x))
        x = self.relu(self.fc2(x))
        return self.fc3(x)


# The lab's constants: the mean is CIFAR-10's; the "std" is the mean of per-image stds, not the
# pixel std, which is (0.2470, 0.2435, 0.2616) (kuangliu/pytorch-cifar issue #135).
LAB_MEAN = (0.4914, 0.4822, 0.4465)
LAB_STD = (0.2023, 0.1994, 0.2010)


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``mean`` and ``std`` as fractions of 255; ConfigError unless three finite
    numbers each, std above 0."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self):
        try:
            mean, std = tuple(map(float, self.mean)), tuple(map(float, self.std))
            ok = len(mean) == len(std) == 3 and all(map(math.isfinite, mean + std))
            ok = ok and min(std) > 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ConfigError(
                f"invalid normalization mean={self.mean!r}, std={self.std!r}: "
                "expected three finite numbers each, std > 0"
            )
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @classmethod
    def measure(cls, images: torch.Tensor) -> Normalization:
        """The pixel mean and population std per channel of uint8 ``[N, 3, H, W]`` images."""
        pixels = images.transpose(0, 1).flatten(1).double().div_(255)
        var, mean = torch.var_mean(pixels, dim=1, correction=0)
        return cls(tuple(mean.tolist()), tuple(var.sqrt().tolist()))

    def tensors(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` as float32 ``[1, 3, 1, 1]`` on ``device``."""
        return tuple(torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (self.mean, self.std))

    def __call__(self, images: torch.Tensor, tensors=None) -> torch.Tensor:
        """uint8 ``[N, 3, H, W]`` -> float32 ``(x / 255 - mean) / std`` on ``images``' device."""
        mean, std = tensors if tensors is not None else self.tensors(images.device)
        return images.to(torch.float32).div_(255).sub_(mean).div_(std)


LAB_NORMALIZATION = Normalization(LAB_MEAN, LAB_STD)


@dataclass
class Trained:
    """A trained :class:`LabCNN` with the normalization it must be used with; ``config`` and
    ``history`` (one dict per epoch) when known, ``note`` where the normalization came from."""

    model: LabCNN
    normalization: Normalization
    config: object = None
    history: list = field(default_factory=list)
    note: str = ""

    @property
    def epoch(self) -> int:
        """Completed epochs (0 when unknown)."""
        return len(self.history)


def summary(model: nn.Module, depth: int = 2):
    """torchinfo's per-layer table for one ``[1, 3, 32, 32]`` input (``str`` it to print), made
    on a CPU copy: torchinfo would move the model to CUDA and switch it to eval mode."""
    import torchinfo

    stats = torchinfo.summary(
        copy.deepcopy(model).cpu(),
        input_size=INPUT_SIZE,
        device="cpu",
        depth=depth,
        col_names=("output_size", "num_params"),
        row_settings=("var_names",),
        verbose=0,
    )
    stats.formatting.macs_units = torchinfo.Units.NONE  # the exact count of multiply-adds
    return stats


def output_size(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """``floor((size + 2 * padding - kernel) / stride) + 1`` pixels (``nn.Conv2d``'s docs)."""
    return (size + 2 * padding - kernel) // stride + 1


def size_chain(size: int = INPUT_SIZE[-1]) -> list[tuple[str, int, int]]:
    """``(layer, channels, side)`` after each convolution and pooling, by :func:`output_size`."""
    rows = [("input", INPUT_SIZE[1], size)]
    for i, channels in enumerate(CHANNELS, start=1):
        size = output_size(size, KERNEL_SIZE, STRIDE, PADDING)
        rows.append((f"conv{i}", channels, size))
        size = output_size(size, POOL_SIZE, POOL_SIZE)
        rows.append((f"pool{i}", channels, size))
    return rows


# A filter whose weights' L2 norm is below this outputs (almost) a constant: it has collapsed.
COLLAPSE_NORM = 1e-2


def filter_norms(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each filter of a ``[C_out, C_in, k, k]`` weight: float32 ``[C_out]`` on the CPU.
    Raises ConfigError unless ``weight`` is 4-D."""
    if weight.dim() != 4:
        raise ConfigError(
            f"expected a convolution weight [C_out, C_in, k, k], got {tuple(weight.shape)}"
        )
    return weight.detach().float().cpu().flatten(1).norm(dim=1)


def collapsed_filters(model: LabCNN, threshold: float = COLLAPSE_NORM) -> dict:
    """``{conv: (filters with an L2 norm below threshold, filters)}`` for conv1 to conv3."""
    weights = {name: getattr(model, name)[0].weight for name in ("conv1", "conv2", "conv3")}
    return {name: (int((filter_norms(w) < threshold).sum()), len(w)) for name, w in weights.items()}
