"""Evaluation of a trained model over a whole split, and its first block's feature maps.

Like torchvision's ``references/classification`` ``evaluate``: eval mode (BatchNorm's running
statistics), ``torch.inference_mode()``, every batch weighted by its size, one return value.
A model is always evaluated with its own normalization: pass a :class:`labcnn.checkpoint.Trained`.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from labcnn.model import NUM_CLASSES


@contextmanager
def eval_mode(model: nn.Module):
    """Run the block with ``model`` in eval mode under ``torch.inference_mode()``, then restore
    the mode it was in (train or eval), even on error."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield model
    finally:
        model.train(was_training)


def evaluate(trained, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000, flip_tta: bool = False) -> dict:
    """Cross-entropy, top-1 accuracy, per-class accuracy and confusion matrix of a trained model.

    Losses are summed per image (in float64, or float32 on Apple MPS, which has no float64), so
    the results do not depend on ``batch_size`` beyond float rounding.

    Args:
        trained: a :class:`labcnn.checkpoint.Trained` (the model and its normalization), as
            returned by :func:`labcnn.train.fit` or :func:`labcnn.checkpoint.load_trained`.
        images: uint8 ``[N, 3, 32, 32]`` on any device; moved to the model's device per batch.
        labels: int64 ``[N]`` in ``0..9``.
        flip_tta: average the logits of each image and its mirror image (test-time augmentation).

    Returns:
        dict with ``loss`` (float, nats per image), ``accuracy`` (float, top-1 as a fraction),
        ``per_class_accuracy`` (list of 10 fractions), ``confusion`` (int64 ``[10, 10]``, rows
        true class, columns predicted), ``predictions`` (int64 ``[N]``) and ``confidence``
        (float32 ``[N]``, softmax probability of the predicted class), on the CPU.
    """
    model = trained.model
    device = next(model.parameters()).device
    norm = trained.normalization.tensors(device)
    loss_sum = torch.zeros((), dtype=torch.float32 if device.type == "mps" else torch.float64, device=device)
    predictions, confidence = [], []
    with eval_mode(model):
        for start in range(0, len(labels), batch_size):
            x = trained.normalization(images[start : start + batch_size].to(device), norm)
            x = x.contiguous(memory_format=torch.channels_last)
            y = labels[start : start + batch_size].to(device)
            logits = model(x).float()
            if flip_tta:
                logits = (logits + model(x.flip(3)).float()) / 2
            loss_sum += F.cross_entropy(logits, y, reduction="sum").to(loss_sum.dtype)
            predicted = logits.argmax(1)
            predictions.append(predicted)
            confidence.append(logits.softmax(1).gather(1, predicted[:, None])[:, 0])
    predictions = torch.cat(predictions).cpu()
    labels = labels.cpu()
    confusion = torch.bincount(labels * NUM_CLASSES + predictions, minlength=NUM_CLASSES**2).reshape(NUM_CLASSES, NUM_CLASSES)
    return {
        "loss": loss_sum.item() / len(labels),
        "accuracy": (predictions == labels).double().mean().item(),
        "per_class_accuracy": (confusion.diag() / confusion.sum(1).clamp(min=1)).tolist(),
        "confusion": confusion,
        "predictions": predictions,
        "confidence": torch.cat(confidence).cpu(),
    }


def first_block_maps(trained, image: torch.Tensor) -> torch.Tensor:
    """Feature maps of ``conv1`` after its convolution, BatchNorm and ReLU, before pooling.

    ``trained``: a :class:`labcnn.checkpoint.Trained`; ``image``: uint8 ``[3, 32, 32]``.
    Returns float32 ``[32, 33, 33]`` on the CPU, computed in eval mode (running BatchNorm
    statistics); the model's mode is left as it was.
    """
    model = trained.model
    with eval_mode(model):
        image = image[None].to(next(model.parameters()).device)
        return model.conv1[:3](trained.normalization(image))[0].cpu()
