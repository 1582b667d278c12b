"""Training and evaluating :class:`~labcnn.model.LabCNN`, read top to bottom: the batches, one
training epoch, evaluation over a whole split, and :func:`fit`, which wires them (one function
per phase, as torchvision's ``references/classification/train.py``). Batches come from uint8
tensors in memory, shuffled and augmented a whole batch at a time, as airbench does.
"""
from __future__ import annotations

import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from labcnn import ConfigError, TrainingDiverged, checkpoint
from labcnn.config import TrainConfig, amp_dtype, describe_device, select_device
from labcnn.model import LabCNN, Normalization, Trained

TIME_FIELDS = ("seconds", "elapsed_train_seconds", "device")  # all that differs between runs

def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """One epoch's order and augmentation, seeded by ``(seed, epoch)``: a resume draws the same."""
    return torch.Generator().manual_seed((seed * 100_003 + epoch) % 2**64)

def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """torchvision's ``RandomCrop(32, padding=4)`` and ``RandomHorizontalFlip()``, applied to a
    whole uint8 ``[N, C, 32, 32]`` batch at once."""
    n, _, h, w = images.shape
    shifts = torch.randint(0, 9, (2, n), generator=generator).to(images.device)
    flips = (torch.rand(n, generator=generator) < 0.5).to(images.device)
    arange = torch.arange(h, device=images.device)
    rows = (shifts[0, :, None] + arange)[:, :, None]
    cols = (shifts[1, :, None] + arange[:w])[:, None, :]
    cols = torch.where(flips[:, None, None], cols.flip(2), cols)
    padded = F.pad(images, (4, 4, 4, 4))
    index = torch.arange(n, device=images.device)[:, None, None]
    return padded[index, :, rows, cols].permute(0, 3, 1, 2)

def batches(images, labels, batch_size: int, generator, normalization: Normalization,
            augment_images: bool = False):
    """One epoch of uint8 ``[N, 3, 32, 32]`` images as ``(x, y)`` batches in a seeded order:
    float32 ``[B, 3, 32, 32]`` normalized, ``channels_last``; int64 ``[B]`` labels."""
    order = torch.randperm(len(labels), generator=generator).to(images.device)
    stats = normalization.tensors(images.device)
    for index in order.split(batch_size):
        x = augment(images[index], generator) if augment_images else images[index]
        yield normalization(x, stats).contiguous(memory_format=torch.channels_last), labels[index]

def train_one_epoch(model, optimizer, batches, steps: int, scheduler=None, scaler=None, dtype=None,
                    label_smoothing: float = 0.0, desc: str = "") -> tuple[float, float]:
    """One pass over ``batches`` (``steps`` of them) in train mode: BatchNorm uses each batch's
    statistics. ``dtype``: autocast dtype (``None``: float32); ``scaler``: a GradScaler (float16).

    Returns ``(loss, accuracy)``: mean cross-entropy per image (nats) and top-1 accuracy (a
    fraction) over the images seen, as the weights moved. Raises TrainingDiverged (NaN or inf).
    """
    model.train()
    device = next(model.parameters()).device
    losses, correct, seen = torch.zeros(steps, device=device), 0, 0
    quiet = not sys.stderr.isatty() or bool(os.environ.get("CI"))  # a progress bar in terminals
    for step, (x, y) in enumerate(tqdm(batches, steps, desc, leave=False, disable=quiet)):
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:  # float16: scale the loss so small gradients do not underflow
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses[step] = loss.detach() * len(y)  # summed on the device: no sync per step
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
    losses = losses.cpu()
    if not losses.isfinite().all():
        step = int((~losses.isfinite()).nonzero()[0])
        raise TrainingDiverged(f"the training loss became {losses[step].item()} at step {step + 1}")
    return losses.double().sum().item() / seen, int(correct) / seen

@torch.inference_mode()
def evaluate(trained: Trained, images, labels, batch_size: int = 1000) -> dict:
    """Evaluate on a whole split (uint8 ``[N, 3, 32, 32]``, int64 ``[N]``) in eval mode, every
    image weighted alike; the model's mode is restored. Returns, on the CPU: ``loss`` (nats per
    image), ``accuracy`` (top-1 fraction), ``per_class_accuracy`` (10 fractions), ``confusion``
    (int64 ``[10, 10]``, rows true), ``predictions`` and ``confidence`` (``[N]``, softmax)."""
    model, was_training = trained.model, trained.model.training
    device = next(model.parameters()).device
    stats = trained.normalization.tensors(device)
    loss, logits = 0.0, []
    model.eval()
    try:
        for start in range(0, len(labels), batch_size):
            x = trained.normalization(images[start:start + batch_size].to(device), stats)
            out = model(x.contiguous(memory_format=torch.channels_last)).float().cpu()
            y = labels[start:start + batch_size].cpu()
            loss += F.cross_entropy(out, y, reduction="sum").item()
            logits.append(out)
    finally:
        model.train(was_training)
    confidence, predictions = torch.cat(logits).softmax(1).max(1)
    labels = labels.cpu()
    confusion = torch.bincount(labels * 10 + predictions, minlength=100).reshape(10, 10)
    return {"loss": loss / len(labels),
            "accuracy": (predictions == labels).double().mean().item(),
            "per_class_accuracy": (confusion.diag() / confusion.sum(1).clamp(min=1)).tolist(),
            "confusion": confusion, "predictions": predictions, "confidence": confidence}

def make_optimizer(config: TrainConfig, model) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":  # else Adam (L2 weight decay in the gradient) or AdamW
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               nesterov=True, weight_decay=config.weight_decay)
    adam = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

def training_split(config: TrainConfig, images, labels):
    """``(train, val)``: the seeded ``subset``, then ``val_size`` images held out (``val`` is
    ``None`` without). Raises ConfigError when the data is too small for either."""
    n = len(labels)
    if not 1 <= (config.subset or n) <= n:
        raise ConfigError(f"subset size {config.subset} must be between 1 and {n}")
    if config.val_size >= (config.subset or n):
        raise ConfigError(f"val_size {config.val_size} must be smaller than the "
                          f"{config.subset or n} training images")
    if config.subset:
        keep = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed))
        images, labels = images[keep[:config.subset]], labels[keep[:config.subset]]
    if not config.val_size:
        return (images, labels), None
    seed = (config.seed + 1) % 2**64  # not the subset's order
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    held, kept = order[:config.val_size], order[config.val_size:]
    return (images[kept], labels[kept]), (images[held], labels[held])

def fit(config: TrainConfig, train_data, test_data, run_dir=None, device=None, log=print,
        model=None) -> Trained:
    """Train a :class:`LabCNN` with ``config``, resuming ``run_dir``'s checkpoint if it has one.

    ``train_data``, ``test_data``: ``(uint8 [N, 3, 32, 32], int64 [N])``. After every epoch the
    checkpoint, ``history.json`` and curves are written to ``run_dir`` (``None``: nothing on
    disk), then its line is logged. ``model``: another module to try (default a new LabCNN).
    The history holds per epoch ``epoch``, ``train_loss``, ``train_acc``, ``test_loss``,
    ``test_acc`` (nats per image, fractions), ``lr``, ``seconds`` (with evaluation),
    ``elapsed_train_seconds`` (training alone, cumulative), ``device``, and ``val_*`` if any.
    Raises ConfigError or DeviceError before writing anything; CheckpointError, WriteError,
    RunFolderBusy; TrainingDiverged (NaN or inf; the last finite checkpoint is kept)."""
    device = device if isinstance(device, torch.device) else select_device(device)  # checked once
    (images, labels), val = training_split(config, *train_data)
    data = {"train": checkpoint.fingerprint(*train_data),
            "test": checkpoint.fingerprint(*test_data)}
    normalization = (Normalization.measure(images) if config.mean is None
                     else Normalization(config.mean, config.std))
    dtype = amp_dtype(device, config.amp)
    torch.manual_seed(config.seed)
    model = (LabCNN() if model is None else model).to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(config, model)
    steps = math.ceil(len(labels) / config.batch_size)
    scheduler = None
    if config.schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, epochs=config.epochs,
                                                        steps_per_epoch=steps)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    trained = Trained(model, normalization, config)
    with checkpoint.run_folder(run_dir) as folder:
        precision = "float32" if dtype is None else str(dtype).replace("torch.", "mixed precision ")
        device_line = f"{describe_device(device)}, {precision}"
        log(f"device: {device_line}")
        run = dict(model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
        trained.history = checkpoint.resume(folder, config, data, **run)
        for record in trained.history:
            log(format_epoch(record, config.epochs))
        if trained.history:
            done = "run complete" if trained.epoch >= config.epochs else "resuming"
            log(f"{done}: {trained.epoch} of {config.epochs} epochs restored from {folder}")
        images, labels = images.to(device), labels.to(device)
        session_seconds = []
        for epoch in range(trained.epoch + 1, config.epochs + 1):
            start = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            generator = epoch_generator(config.seed, epoch)
            epoch_batches = batches(images, labels, config.batch_size, generator, normalization,
                                    config.augment)
            try:
                train_loss, train_acc = train_one_epoch(
                    model, optimizer, epoch_batches, steps, scheduler, scaler, dtype,
                    config.label_smoothing, f"epoch {epoch}")
            except TrainingDiverged as e:
                raise TrainingDiverged(f"{e} of epoch {epoch}; {kept(folder, epoch - 1)}") from None
            train_seconds = time.perf_counter() - start
            record = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc}
            for name, split in (("val", val), ("test", test_data)):
                if split is not None:
                    result = evaluate(trained, *split, batch_size=config.eval_batch_size)
                    record[f"{name}_loss"] = result["loss"]
                    record[f"{name}_acc"] = result["accuracy"]
            bad = next((k for k, v in record.items() if not math.isfinite(v)), None)
            if bad:
                raise TrainingDiverged(f"the {bad.replace('_', ' ')} became {record[bad]} at epoch "
                                       f"{epoch}; {kept(folder, epoch - 1)}")
            elapsed = trained.history[-1]["elapsed_train_seconds"] if trained.history else 0.0
            record.update(lr=lr, seconds=time.perf_counter() - start,
                          elapsed_train_seconds=elapsed + train_seconds, device=device_line)
            trained.history.append(record)
            if folder is not None:
                checkpoint.save(folder, trained, data, **run)
            session_seconds.append(record["seconds"])
            left = sum(session_seconds) / len(session_seconds) * (config.epochs - epoch)
            log(format_epoch(record, config.epochs, left))
    return trained

def kept(folder, epochs_done: int) -> str:
    what = (f"{folder / checkpoint.CHECKPOINT} (epoch {epochs_done}, all figures finite) is kept"
            if folder is not None and epochs_done else "no checkpoint was written")
    return f"{what}. Lower the learning rate and train into a new run folder"

def format_epoch(record: dict, epochs: int, seconds_left: float | None = None) -> str:
    """``epoch 7/50  train loss 0.912 acc 68.1%  test loss 0.955 acc 66.8%  19 s`` + time left."""
    val = left = ""
    if "val_loss" in record:
        val = f"  val loss {record['val_loss']:.3f} acc {record['val_acc']:.1%}"
    if seconds_left is not None and record["epoch"] < epochs:
        left = f"  about {format_duration(seconds_left)} left"
    return (f"epoch {record['epoch']}/{epochs}  train loss {record['train_loss']:.3f} "
            f"acc {record['train_acc']:.1%}{val}  test loss {record['test_loss']:.3f} "
            f"acc {record['test_acc']:.1%}  {record['seconds']:.0f} s{left}")

def format_duration(seconds: float) -> str:
    """``"2 h 05 min"``, ``"41 min 12 s"`` or ``"37 s"``: the one duration format."""
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"
