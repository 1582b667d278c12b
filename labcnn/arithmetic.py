"""The arithmetic behind the lab's layers, worked by hand and checked against PyTorch in the notebook:
output sizes through the network, parameter counts, and a convolution over several channels.

Output size of a convolution or pooling layer (PyTorch's ``nn.Conv2d`` and ``nn.MaxPool2d``
docs): ``floor((size + 2 * padding - kernel) / stride) + 1``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from labcnn.model import CHANNELS, INPUT_SIZE, KERNEL_SIZE, PADDING, POOL_SIZE, STRIDE

# A 3-channel 3x3 input, one filter of three 2x2 kernels (one per input channel) and its bias:
# small integers, so every output value can be checked by hand.
MULTI_INPUT = torch.tensor([[[1, 0, 2], [2, 1, 0], [0, 1, 1]],
                            [[0, 2, 1], [1, 0, 1], [2, 1, 0]],
                            [[1, 1, 0], [0, 1, 2], [1, 0, 1]]], dtype=torch.float32)  # [C=3, H=3, W=3]
MULTI_KERNEL = torch.tensor([[[1, 0], [0, -1]], [[0, 1], [1, 0]], [[2, 0], [0, 1]]], dtype=torch.float32)  # [3, 2, 2]
MULTI_BIAS = 1.0


def output_size(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """``floor((size + 2 * padding - kernel) / stride) + 1``, in pixels."""
    return (size + 2 * padding - kernel) // stride + 1


def size_chain(size: int = INPUT_SIZE[-1]) -> list[tuple[str, int, int]]:
    """``(layer, channels, side in pixels)`` after each convolution and pooling of the lab's network,
    by the formula: 32 -> 33 -> 16 -> 17 -> 8 -> 9 -> 4 for a 32x32 image."""
    rows = [("input", INPUT_SIZE[1], size)]
    for i, channels in enumerate(CHANNELS, start=1):
        size = output_size(size, KERNEL_SIZE, STRIDE, PADDING)
        rows.append((f"conv{i}", channels, size))
        size = output_size(size, POOL_SIZE, POOL_SIZE)
        rows.append((f"pool{i}", channels, size))
    return rows


def measured_shapes(model: nn.Module) -> list[tuple[str, int, int]]:
    """The same rows as :func:`size_chain`, read from ``model``'s actual outputs (forward hooks on
    each block's convolution and pooling, one zero image, eval mode)."""
    rows, hooks = [("input", INPUT_SIZE[1], INPUT_SIZE[-1])], []
    for i in range(1, len(CHANNELS) + 1):
        block = getattr(model, f"conv{i}")
        for layer, name in ((block[0], f"conv{i}"), (block[3], f"pool{i}")):
            hooks.append(layer.register_forward_hook(lambda m, x, y, name=name: rows.append((name, y.shape[1], y.shape[-1]))))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(INPUT_SIZE, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return rows


def parameter_counts(model: nn.Module) -> list[tuple[str, str, int, int]]:
    """``(layer, formula, count by the formula, count in the model)`` for every layer with weights.

    Convolution: ``out x (in x k x k + 1)`` (one k x k kernel per input channel, plus one bias,
    per filter). BatchNorm: ``2 x channels`` (scale and shift). Linear: ``out x (in + 1)``.
    """
    rows = []
    for name, layer in model.named_modules():
        actual = sum(p.numel() for p in layer.parameters(recurse=False))
        if isinstance(layer, nn.Conv2d):
            k = layer.kernel_size[0]
            rows.append((name, f"{layer.out_channels} x ({layer.in_channels} x {k} x {k} + 1)",
                         layer.out_channels * (layer.in_channels * k * k + 1), actual))
        elif isinstance(layer, nn.BatchNorm2d):
            rows.append((name, f"2 x {layer.num_features}", 2 * layer.num_features, actual))
        elif isinstance(layer, nn.Linear):
            rows.append((name, f"{layer.out_features} x ({layer.in_features} + 1)",
                         layer.out_features * (layer.in_features + 1), actual))
    return rows


def multichannel_by_hand(x: torch.Tensor = MULTI_INPUT, kernel: torch.Tensor = MULTI_KERNEL, bias: float = MULTI_BIAS,
                         padding: int = PADDING) -> torch.Tensor:
    """One filter over a ``[C, H, W]`` input, by hand: at each position, the sum over every
    channel of (window x that channel's kernel), plus the bias. float32 ``[H', W']``; equals
    ``F.conv2d(x[None], kernel[None], bias, padding=padding)[0, 0]``."""
    padded = F.pad(x, (padding,) * 4)
    k = kernel.shape[-1]
    rows, cols = padded.shape[1] - k + 1, padded.shape[2] - k + 1
    return torch.tensor([[float((padded[:, r : r + k, c : c + k] * kernel).sum()) + bias for c in range(cols)] for r in range(rows)])
