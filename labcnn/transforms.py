"""What happens to images between loading and the model: normalization, the training subset, the
held-out validation split and batched augmentation. uint8 tensors in, tensors out.

The augmentation follows airbench's ``batch_crop`` and ``batch_flip_lr``: whole batches with
tensor ops instead of torchvision's per-sample PIL transforms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from labcnn.errors import ConfigError

# The lab's normalization, as widely copied from kuangliu/pytorch-cifar (main.py). The mean is
# the data's; the "std" is the mean of per-image stds, not the pixel std of the training set,
# which is (0.2470, 0.2435, 0.2616) for the official files (kuangliu/pytorch-cifar issue #135).
# Use :meth:`Normalization.measure` for the true values of a copy.
LAB_MEAN = (0.4914, 0.4822, 0.4465)
LAB_STD = (0.2023, 0.1994, 0.2010)


@dataclass(frozen=True)
class Normalization:
    """Per-channel ``mean`` and ``std``, three floats each, as fractions of 255.

    A trained model is used with the normalization it was trained with: it travels with the
    model (:class:`labcnn.checkpoint.Trained`) and is stored in every checkpoint.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self):
        try:
            mean, std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
        except (TypeError, ValueError):
            mean = std = ()
        if not (len(mean) == len(std) == 3 and all(map(math.isfinite, mean + std)) and min(std) > 0):
            raise ConfigError(f"invalid normalization mean={self.mean!r}, std={self.std!r}: expected three finite numbers each, std > 0")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)

    @classmethod
    def measure(cls, images: torch.Tensor) -> "Normalization":
        """The pixel mean and population std of uint8 ``[N, 3, H, W]`` images, per channel."""
        return cls(*channel_stats(images))

    def tensors(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, std)`` as float32 ``[1, 3, 1, 1]`` tensors on ``device``."""
        return tuple(torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1) for v in (self.mean, self.std))

    def __call__(self, images: torch.Tensor, tensors=None) -> torch.Tensor:
        """uint8 ``[N, 3, H, W]`` -> float32 ``(x / 255 - mean) / std``, on ``images``' device.

        ``tensors``: :meth:`tensors` already on that device, to save a copy per call in hot loops.
        """
        mean, std = tensors if tensors is not None else self.tensors(images.device)
        return images.to(torch.float32).div_(255).sub_(mean).div_(std)


LAB_NORMALIZATION = Normalization(LAB_MEAN, LAB_STD)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel pixel mean and standard deviation, as fractions of 255.

    Args:
        images: uint8 ``[N, 3, H, W]``.

    Returns:
        ``(mean, std)``, three floats each, over every pixel of every image (population std).
    """
    mean, std = [], []
    for c in range(images.shape[1]):
        channel = images[:, c].to(torch.float64).div_(255)
        var, m = torch.var_mean(channel, correction=0)
        mean.append(m.item())
        std.append(var.sqrt().item())
    return tuple(mean), tuple(std)


def subset(images: torch.Tensor, labels: torch.Tensor, n: int | None, seed: int = 0):
    """``n`` examples drawn without replacement by a seeded permutation (all of them if ``n`` is None).

    Raises:
        ConfigError: ``n`` is not between 1 and ``len(labels)``.
    """
    if n is None:
        return images, labels
    if not 1 <= n <= len(labels):
        raise ConfigError(f"subset size {n} must be between 1 and {len(labels)}")
    index = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:n]
    return images[index], labels[index]


def split_validation(images, labels, size: int, seed: int):
    """``((train_images, train_labels), (val_images, val_labels) or None)`` by a seeded permutation.

    Raises:
        ConfigError: ``size`` is not smaller than the number of images.
    """
    if size == 0:
        return (images, labels), None
    if size >= len(labels):
        raise ConfigError(f"val_size {size} must be smaller than the {len(labels)} training images")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed((seed + 1) % 2**64))
    val, train = order[:size], order[size:]
    return (images[train], labels[train]), (images[val], labels[val])


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 32x32 crop of the 4-pixel zero-padded batch, and a horizontal flip with p=0.5.

    The batched equivalent of torchvision's ``RandomCrop(32, padding=4)`` and
    ``RandomHorizontalFlip()``. ``images``: uint8 ``[N, C, 32, 32]``; returns the same shape.
    """
    n, _, h, w = images.shape
    shifts = torch.randint(0, 9, (2, n), generator=generator).to(images.device)
    flips = (torch.rand(n, generator=generator) < 0.5).to(images.device)
    padded = F.pad(images, (4, 4, 4, 4))
    rows = (shifts[0, :, None] + torch.arange(h, device=images.device))[:, :, None]
    cols = (shifts[1, :, None] + torch.arange(w, device=images.device))[:, None, :]
    cols = torch.where(flips[:, None, None], cols.flip(2), cols)
    crops = padded[torch.arange(n, device=images.device)[:, None, None], :, rows, cols]  # [N, H, W, C]
    return crops.permute(0, 3, 1, 2)


def cutout(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Zero one ``size`` x ``size`` square per image at a random centre, clipped at the border.

    Cutout (DeVries and Taylor, 2017, "Improved Regularization of Convolutional Neural Networks
    with Cutout"), batched: applied after normalization, so the square reads as the mean colour.
    ``x``: float ``[N, C, H, W]``; returns a new tensor of the same shape, dtype and memory format.
    """
    n, _, h, w = x.shape
    centres = torch.stack([torch.randint(0, h, (n,), generator=generator), torch.randint(0, w, (n,), generator=generator)]).to(x.device)
    low = centres - size // 2
    rows = torch.arange(h, device=x.device) - low[0, :, None]  # [N, H]: row offset into each square
    cols = torch.arange(w, device=x.device) - low[1, :, None]
    inside = ((rows >= 0) & (rows < size))[:, :, None] & ((cols >= 0) & (cols < size))[:, None, :]
    return x * ~inside[:, None]


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of one epoch's order and augmentation, seeded by ``(seed, epoch)``, so a
    resumed run draws the same batches."""
    return torch.Generator().manual_seed((seed * 100_003 + epoch) % 2**64)


def training_batches(images, labels, batch_size: int, generator: torch.Generator, normalization: Normalization,
                     augment_images: bool = False, cutout_size: int = 0):
    """One epoch of training batches: ``(x, y)``, float32 ``[B, 3, 32, 32]`` (normalized,
    ``channels_last``) and int64 ``[B]``, on ``images``' device.

    ``images``: uint8 ``[N, 3, 32, 32]``; ``labels``: int64 ``[N]``. The order is a permutation
    drawn from ``generator``, which then draws each batch's augmentation (:func:`augment`, then
    :func:`cutout` when ``cutout_size`` is above 0). The
    last batch may be smaller than ``batch_size``.
    """
    device = images.device
    order = torch.randperm(len(labels), generator=generator).to(device)
    tensors = normalization.tensors(device)
    for start in range(0, len(labels), batch_size):
        index = order[start : start + batch_size]
        x = images[index]
        if augment_images:
            x = augment(x, generator)
        x = normalization(x, tensors)
        if cutout_size:
            x = cutout(x, cutout_size, generator)
        yield x.contiguous(memory_format=torch.channels_last), labels[index]
