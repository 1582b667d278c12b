"""The lab, read top to bottom: batches of CIFAR-10 images, one training epoch, evaluation on a
whole split, and :func:`fit`, which wires them as torchvision's
``references/classification/train.py`` does.

Nothing here reads the environment, the terminal or a file. The harness (:mod:`labcnn.harness`)
adds the run folder, resume, checkpoints and progress bars through ``fit``'s arguments.
Batches come from uint8 tensors in memory and are shuffled and augmented a whole batch at a
time, as airbench does, instead of image by image through a DataLoader.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from labcnn import ConfigError, TrainingDiverged
from labcnn.model import LabCNN, Normalization, Trained
from labcnn.settings import TrainConfig


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The random source of one epoch's order and augmentation, seeded by ``(seed, epoch)``, so
    that a resumed run draws what an uninterrupted one would have drawn."""
    return torch.Generator().manual_seed((seed * 100_003 + epoch) % 2**64)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """torchvision's ``RandomCrop(32, padding=4)`` then ``RandomHorizontalFlip()``, applied to a
    whole uint8 ``[N, C, H, W]`` batch at once; returns a new ``[N, C, H, W]`` tensor."""
    n, _, h, w = images.shape
    # Per image: the crop's top-left corner in the padded image (0 to 8 pixels down and right of
    # it), then whether to flip. Drawn in this order, so one generator state gives one batch.
    shifts = torch.randint(0, 9, (2, n), generator=generator).to(images.device)
    flips = (torch.rand(n, generator=generator) < 0.5).to(images.device)
    # rows[i, r, 0] and cols[i, 0, c]: the padded pixel that lands at (r, c) of image i's crop.
    steps = torch.arange(h, device=images.device)
    rows = (shifts[0, :, None] + steps)[:, :, None]
    cols = (shifts[1, :, None] + steps[:w])[:, None, :]
    cols = torch.where(flips[:, None, None], cols.flip(2), cols)  # a flip reads right to left
    padded = F.pad(images, (4, 4, 4, 4))  # 4 zero pixels on every side: [N, C, H + 8, W + 8]
    # One gather for the batch: the image, row and column indices broadcast to [N, H, W], and
    # indexing around the channel slice puts the channels last, so they are moved back.
    image = torch.arange(n, device=images.device)[:, None, None]
    return padded[image, :, rows, cols].permute(0, 3, 1, 2)


def batches(images, labels, batch_size: int, generator, normalization, augment_images=False):
    """One epoch of uint8 ``[N, 3, 32, 32]`` images and int64 ``[N]`` labels, as ``(x, y)``
    batches in an order drawn from ``generator``: ``x`` float32 ``[B, 3, 32, 32]``, normalized,
    in ``channels_last`` memory order (faster convolutions on CPUs and recent GPUs)."""
    order = torch.randperm(len(labels), generator=generator).to(images.device)
    stats = normalization.tensors(images.device)
    for index in order.split(batch_size):
        x = augment(images[index], generator) if augment_images else images[index]
        yield normalization(x, stats).contiguous(memory_format=torch.channels_last), labels[index]


def train_one_epoch(model, criterion, optimizer, batches, scheduler=None, scaler=None, dtype=None):
    """One pass over ``batches`` in train mode; ``dtype``: autocast's (None: float32). Returns the
    mean loss (nats per image) and top-1 accuracy; TrainingDiverged names a non-finite step."""
    model.train()  # BatchNorm normalizes each batch with that batch's own statistics
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype, enabled=dtype is not None)
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)  # float16 only
    losses, correct, seen = [], 0, 0
    for x, y in batches:
        with autocast:
            logits = model(x)
        loss = criterion(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # float16: the scaled loss keeps gradients from underflow
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.detach() * len(y))  # kept on the device: no wait for it per step
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
    losses = torch.stack(losses).cpu()
    if not losses.isfinite().all():
        raise TrainingDiverged(f"the training loss became {nonfinite(losses)}")
    return losses.double().sum().item() / seen, int(correct) / seen


@torch.inference_mode()
def evaluate(trained: Trained, images, labels, batch_size: int = 1000) -> dict:
    """Evaluate on a whole split (uint8 ``[N, 3, 32, 32]``, int64 ``[N]``) in eval mode, every
    image weighted alike; the model's mode is restored afterwards.

    Returns, on the CPU: ``loss`` (nats per image), ``accuracy`` (top-1, a fraction),
    ``per_class_accuracy`` (10 fractions), ``confusion`` (int64 ``[10, 10]``, rows: true class),
    ``predictions`` (int64 ``[N]``) and ``confidence`` (float32 ``[N]``, the top softmax value).
    """
    model, was_training = trained.model, trained.model.training
    device = next(model.parameters()).device
    stats = trained.normalization.tensors(device)
    loss, logits = 0.0, []
    model.eval()  # BatchNorm uses the running statistics gathered in training
    try:
        for start in range(0, len(labels), batch_size):
            x = trained.normalization(images[start : start + batch_size].to(device), stats)
            out = model(x.contiguous(memory_format=torch.channels_last)).float().cpu()
            y = labels[start : start + batch_size].cpu()
            loss += F.cross_entropy(out, y, reduction="sum").item()
            logits.append(out)
    finally:
        model.train(was_training)
    confidence, predictions = torch.cat(logits).softmax(1).max(1)
    labels = labels.cpu()
    confusion = torch.bincount(labels * 10 + predictions, minlength=100).reshape(10, 10)
    return {
        "loss": loss / len(labels),
        "accuracy": (predictions == labels).double().mean().item(),
        "per_class_accuracy": (confusion.diag() / confusion.sum(1).clamp(min=1)).tolist(),
        "confusion": confusion,
        "predictions": predictions,
        "confidence": confidence,
    }


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum, Adam (weight decay added to the gradient: L2, the lab's), or
    AdamW (weight decay applied to the weights apart from the gradient)."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            nesterov=True,
            weight_decay=config.weight_decay,
        )
    adam = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def make_scheduler(config: TrainConfig, optimizer, steps: int):
    """OneCycleLR stepped per batch (``steps`` per epoch) for the one-cycle schedule, else None."""
    if config.schedule != "onecycle":
        return None
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, config.lr, epochs=config.epochs, steps_per_epoch=steps
    )


def check_sizes(config: TrainConfig, n: int) -> None:
    """ConfigError unless ``n`` training images hold ``config``'s subset and validation split."""
    if not 1 <= (config.subset or n) <= n:
        raise ConfigError(f"subset size {config.subset} must be between 1 and {n}")
    if config.val_size >= (config.subset or n):
        raise ConfigError(
            f"val_size {config.val_size} must be smaller than the "
            f"{config.subset or n} training images"
        )


def training_split(config: TrainConfig, images, labels):
    """``(train, val)``: the seeded ``subset`` of the training images, then ``val_size`` of them
    held out (``val`` is None without). Raises ConfigError when the data is too small."""
    n = len(labels)
    check_sizes(config, n)
    if config.subset:
        keep = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed))
        images, labels = images[keep[: config.subset]], labels[keep[: config.subset]]
    if not config.val_size:
        return (images, labels), None
    seed = (config.seed + 1) % 2**64  # another order than the subset's
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    held, kept = order[: config.val_size], order[config.val_size :]
    return (images[kept], labels[kept]), (images[held], labels[held])


def fit(config, train_data, test_data, device="cpu", dtype=None, model=None, **hooks) -> Trained:
    """Train ``model`` (default a new LabCNN) with ``config``; return it as a Trained whose history
    holds per epoch ``train_loss``, ``train_acc``, ``val_*``, ``test_*`` (nats per image,
    fractions), ``lr``, ``seconds``, ``elapsed_train_seconds``. ``train_data``, ``test_data``:
    ``(uint8 [N, 3, 32, 32], int64 [N])``; ``dtype``: autocast's. The harness's ``hooks``:
    ``restore(trained, state)`` returns a saved run's history; ``progress(batches, epoch)`` wraps
    an epoch's batches; ``on_epoch(trained, state)`` follows each epoch."""
    (images, labels), val = training_split(config, *train_data)
    trained, state = setup(config, images, labels, device, dtype, model)
    trained.history = hooks["restore"](trained, state) if "restore" in hooks else []
    model, optimizer = state["model"], state["optimizer"]
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    images, labels = images.to(device), labels.to(device)
    for epoch in range(trained.epoch + 1, config.epochs + 1):
        start, lr = time.perf_counter(), optimizer.param_groups[0]["lr"]
        order = epoch_generator(config.seed, epoch)
        data = batches(
            images, labels, config.batch_size, order, trained.normalization, config.augment
        )
        data = hooks["progress"](data, epoch) if "progress" in hooks else data
        loss, accuracy = train_one_epoch(
            model, criterion, optimizer, data, state["scheduler"], state["scaler"], dtype
        )
        record = {"epoch": epoch, "train_loss": loss, "train_acc": accuracy}
        train_seconds = time.perf_counter() - start
        for name, split in (("val", val), ("test", test_data)):
            if split is not None:
                result = evaluate(trained, *split, batch_size=config.eval_batch_size)
                record[f"{name}_loss"], record[f"{name}_acc"] = result["loss"], result["accuracy"]
        elapsed = trained.history[-1]["elapsed_train_seconds"] if trained.history else 0.0
        record.update(lr=lr, seconds=time.perf_counter() - start)
        record["elapsed_train_seconds"] = elapsed + train_seconds
        trained.history.append(record)
        if "on_epoch" in hooks:
            hooks["on_epoch"](trained, state)
    return trained


def setup(config: TrainConfig, images, labels, device, dtype, model=None):
    """``(trained, state)`` before the first epoch: the model, seeded by ``config.seed``, its
    normalization (``config``'s, or measured on ``images``), and in ``state`` the model,
    optimizer, scheduler and GradScaler (enabled for float16 only) that a checkpoint saves."""
    norm = Normalization(config.mean, config.std) if config.mean else Normalization.measure(images)
    torch.manual_seed(config.seed)  # the initial weights
    model = (model or LabCNN()).to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(config, model)
    scheduler = make_scheduler(config, optimizer, steps=math.ceil(len(labels) / config.batch_size))
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=dtype == torch.float16)
    state = dict(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    return Trained(model, norm, config), state


def nonfinite(losses: torch.Tensor) -> str:
    """``"nan at step 3"``: the first NaN or infinite value of per-step ``losses``, from step 1."""
    step = int((~losses.isfinite()).nonzero()[0])
    return f"{losses[step].item()} at step {step + 1}"
