"""Whitening initialisation of the first convolution, from airbench (Keller Jordan, 2024,
"94% on CIFAR-10 in 3.29 seconds on a single GPU", ``airbench94.py``: ``init_whitening_conv``).

The first convolution's filters start as the eigenvectors of the covariance of the 2x2 input
patches, each divided by the square root of its eigenvalue (plus ``eps``), once with each sign,
so its outputs start decorrelated and of equal variance. LabCNN's conv1 has 32 filters for the
3 * 2 * 2 = 12 patch dimensions: the first 24 are whitened, the other 8 keep PyTorch's default
initialization. The layer is not frozen (airbench freezes it): the network stays as the lab has it.
"""
from __future__ import annotations

import torch
from torch import nn

WHITENING_IMAGES = 5000  # airbench whitens on the first 5,000 training images
WHITENING_EPS = 5e-4  # airbench's eps, added to each eigenvalue


def patches(images: torch.Tensor, kernel_size: tuple[int, int]) -> torch.Tensor:
    """Every ``kernel_size`` patch (stride 1, no padding) of float ``[N, C, H, W]`` images, as
    ``[N * (H - kh + 1) * (W - kw + 1), C * kh * kw]`` of the images' dtype, in ``Conv2d.weight``'s order."""
    kh, kw = kernel_size
    c = images.shape[1]
    windows = images.unfold(2, kh, 1).unfold(3, kw, 1)  # [N, C, H', W', kh, kw]
    return windows.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * kh * kw)


@torch.no_grad()
def whiten_conv(conv: nn.Conv2d, images: torch.Tensor, eps: float = WHITENING_EPS) -> None:
    """Set the first ``2 * C * kh * kw`` filters of ``conv`` to the whitening filters of ``images``.

    Args:
        conv: a ``Conv2d`` with weight ``[C_out, C, kh, kw]``, ``C_out >= 2 * C * kh * kw``.
        images: normalized float ``[N, C, H, W]`` training images (airbench: the first 5,000).
        eps: added to each eigenvalue before the square root.

    Raises:
        ValueError: ``conv`` has fewer than ``2 * C * kh * kw`` filters, or ``images`` does not
            have ``C`` channels.
    """
    out_channels, c, kh, kw = conv.weight.shape
    dims = c * kh * kw
    if out_channels < 2 * dims or images.dim() != 4 or images.shape[1] != c:
        raise ValueError(f"whitening needs a conv with >= {2 * dims} filters and [N, {c}, H, W] images, "
                         f"got {out_channels} filters and images of shape {tuple(images.shape)}")
    flat = patches(images.double(), (kh, kw))
    covariance = flat.T @ flat / len(flat)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending; columns are vectors
    filters = (eigenvectors / (eigenvalues + eps).sqrt()).T.flip(0).reshape(dims, c, kh, kw)
    conv.weight[: 2 * dims] = torch.cat((filters, -filters)).to(conv.weight)
