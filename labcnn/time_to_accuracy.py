"""Time to accuracy: how soon a recipe trains LabCNN to a test accuracy, ``python -m labcnn bench
--time-to-accuracy``.

The recipe (``fast`` by default) is trained with :func:`labcnn.train.fit` on the real training
split and evaluated on the whole test set after every epoch, model in eval mode. The time is the
training time alone (``elapsed_train_seconds``: evaluation excluded), in seconds. The arithmetic is
counted by ``torch.utils.flop_counter.FlopCounterMode`` on one training step (forward, loss and
backward of one batch), not by hand; it counts convolutions and matrix products, the operations
that dominate, and not BatchNorm, ReLU, pooling or the optimizer's update.
"""
from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from labcnn.analysis import ORIGINAL_ACCURACY, first_reaching
from labcnn.config import TrainConfig
from labcnn.device import select_device
from labcnn.model import LabCNN
from labcnn.train import fit, prepare


def training_flops_per_image(config: TrainConfig, device) -> float:
    """Floating-point operations of one training step per image (forward, cross-entropy and
    backward of a ``config.batch_size`` batch of float32 ``[B, 3, 32, 32]`` images, divided by
    ``B``), as ``FlopCounterMode.get_total_flops()`` counts them (a multiply-add is 2 FLOPs)."""
    model = LabCNN().to(device, memory_format=torch.channels_last)
    x = torch.zeros(config.batch_size, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.zeros(config.batch_size, dtype=torch.int64, device=device)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() / config.batch_size


def time_to_accuracy(config: TrainConfig, train_data, test_data, target: float = ORIGINAL_ACCURACY,
                     device=None, log=print) -> dict:
    """Train with ``config`` (``make_config("fast")`` from the command line) and time it to
    ``target`` top-1 test accuracy (a fraction; default the original report's 69.26%).

    Args:
        config: the recipe's settings (:func:`labcnn.config.make_config`).
        train_data, test_data: ``(images, labels)``, uint8 ``[N, 3, 32, 32]`` and int64 ``[N]``,
            from :func:`labcnn.data.load_cifar10`; the test set is evaluated whole each epoch.
        device: a name for :func:`labcnn.device.select_device` (``None``: the best available).

    Returns:
        dict with ``recipe``, ``seed``, ``target``, ``epochs``, ``seconds_to_target`` and
        ``epoch_reached`` (training seconds and epoch at the first epoch end at or above
        ``target``; ``None`` if never), ``final_test_acc`` (fraction), ``train_seconds``,
        ``img_s`` (training images per training second), ``gflop_per_image`` and ``gflop_s``
        (achieved GFLOP per training second, from :func:`training_flops_per_image`).

    Raises:
        DeviceError, ConfigError: a bad device, subset or validation size (before any training).
    """
    device = select_device(device)
    per_image = training_flops_per_image(config, device)
    history = fit(config, train_data, test_data, device=device, log=log).history
    reached = first_reaching(history, target)
    images = len(prepare(config, train_data)[0][1]) * config.epochs  # the images fit trained on
    seconds = history[-1]["elapsed_train_seconds"]
    return {
        "recipe": config.recipe,
        "seed": config.seed,
        "target": target,
        "epochs": config.epochs,
        "seconds_to_target": reached["elapsed_train_seconds"] if reached else None,
        "epoch_reached": reached["epoch"] if reached else None,
        "final_test_acc": history[-1]["test_acc"],
        "train_seconds": seconds,
        "img_s": images / seconds,
        "gflop_per_image": per_image / 1e9,
        "gflop_s": per_image * images / seconds / 1e9,
    }


def report(result: dict, log=print) -> None:
    """Log the figures in words, then the result as one JSON line."""
    if result["seconds_to_target"] is None:
        log(f"{result['recipe']} recipe, seed {result['seed']}: {result['target']:.2%} not reached in {result['epochs']} epochs")
    else:
        log(f"{result['recipe']} recipe, seed {result['seed']}: {result['target']:.2%} reached at epoch {result['epoch_reached']} "
            f"after {result['seconds_to_target']:.1f} s of training")
    log(f"final test accuracy {result['final_test_acc']:.2%}; {result['img_s']:.0f} images/s; "
        f"{result['gflop_per_image'] * 1e3:.2f} MFLOP per training image; {result['gflop_s']:.2f} GFLOP/s")
    log(json.dumps(result))
