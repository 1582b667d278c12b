"""Training :class:`labcnn.model.LabCNN`: optimizer, schedule, one epoch, and :func:`fit`.

One function per phase, after torchvision's ``references/classification/train.py``:
:func:`train_one_epoch` and :func:`labcnn.evaluate.evaluate`, wired by :func:`fit`, which
resumes a run folder and saves it after every epoch (:mod:`labcnn.checkpoint`). The loop knows
neither how batches are made (:func:`labcnn.transforms.training_batches`) nor how files are written.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from labcnn.analysis import format_minutes
from labcnn.checkpoint import CHECKPOINT, Trained, checkpoint_state, open_run, resume, save_run
from labcnn.config import TrainConfig
from labcnn.device import amp_dtype, describe_device, grad_scaler, select_device, show_progress
from labcnn.errors import TrainingDiverged
from labcnn.evaluate import evaluate
from labcnn.model import LabCNN
from labcnn.transforms import Normalization, epoch_generator, split_validation, subset, training_batches
from labcnn.whitening import WHITENING_IMAGES, whiten_conv

TIME_FIELDS = ("seconds", "elapsed_train_seconds")  # the only history fields that vary between runs


def make_optimizer(config: TrainConfig, model) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD with Nesterov momentum, as ``config.optimizer`` names."""
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, nesterov=True, weight_decay=config.weight_decay
    )


def make_scheduler(config: TrainConfig, optimizer, steps_per_epoch: int):
    """``None`` for a constant rate, else OneCycleLR stepped once per batch."""
    if config.schedule == "constant":
        return None
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, epochs=config.epochs, steps_per_epoch=steps_per_epoch
    )


def train_one_epoch(model, optimizer, scheduler, scaler, batches, steps: int, label_smoothing: float = 0.0,
                    dtype: torch.dtype | None = None, desc: str = "", ema=None) -> tuple[float, float]:
    """One pass over ``batches``, ``steps`` pairs of normalized float32 ``[B, 3, 32, 32]`` images
    and int64 ``[B]`` labels on the model's device.

    ``dtype``: autocast dtype (``None``: float32); ``scaler``: a ``torch.amp.GradScaler``
    (enabled for float16 only); ``ema``: a ``torch.optim.swa_utils.AveragedModel`` updated after
    every step (:func:`make_ema`). Metrics accumulate on the device with no per-step synchronisation.

    Returns:
        ``(loss, accuracy)``: mean cross-entropy per image in nats (label-smoothed if the
        recipe smooths), and top-1 accuracy as a fraction, over every image seen this epoch
        with the model in train mode (a running figure, not an evaluation).

    Raises:
        TrainingDiverged: the loss was NaN or infinite; the message names the step.
    """
    model.train()
    device = next(model.parameters()).device
    losses = torch.zeros(steps, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    for step, (x, y) in enumerate(tqdm(batches, total=steps, desc=desc, leave=False, disable=not show_progress())):
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        if ema is not None:
            ema.update_parameters(model)
        losses[step] = loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
    losses = losses.cpu()
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        step = bad[0].item()
        raise TrainingDiverged(f"the training loss became {losses[step].item()} at step {step + 1}")
    return losses.double().sum().item() / seen, correct.item() / seen


def make_ema(config: TrainConfig, model):
    """``None``, or the exponential moving average of ``model``'s weights and BatchNorm buffers
    with decay ``config.ema`` per step (``AveragedModel(use_buffers=True)`` as in torchvision's
    ``references/classification``). Its ``.module`` is a :class:`LabCNN` like ``model``."""
    if not config.ema:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.ema), use_buffers=True)


def prepare(config: TrainConfig, train_data):
    """The run's training images, validation split and normalization (measured if the config
    says ``None``). Raises :class:`labcnn.errors.ConfigError` for a bad subset or validation size."""
    images, labels = subset(*train_data, config.subset, config.seed)
    (images, labels), val = split_validation(images, labels, config.val_size, config.seed)
    if config.mean is None:
        normalization = Normalization.measure(images)
    else:
        normalization = Normalization(config.mean, config.std)
    return (images, labels), val, normalization


def fit(config: TrainConfig, train_data, test_data, run_dir=None, device=None, log=print) -> Trained:
    """Train :class:`LabCNN` with ``config``; resume from ``run_dir``'s checkpoint if there is one.

    Args:
        config: the settings (the lab's recipe by default).
        train_data, test_data: ``(images, labels)``, uint8 ``[N, 3, 32, 32]`` and int64 ``[N]``
            as returned by :func:`labcnn.data.load_cifar10`. The test set is used whole.
        run_dir: folder for ``checkpoint.pt``, ``history.json``, ``loss.png`` and
            ``accuracy.png``, all written after every epoch, before its line is logged;
            ``None`` keeps nothing on disk. Nothing is created before the settings are checked.
        device: a name for :func:`labcnn.device.select_device` (``None``: the best available).
        log: receives the device line, then one line per epoch with the estimated time left.

    Returns:
        :class:`labcnn.checkpoint.Trained`: the model (the moving average of the weights when
        ``config.ema`` is set: the model evaluated and saved), its normalization, the config and
        the history: one dict per epoch with ``epoch``, ``train_loss``, ``train_acc``,
        ``test_loss``, ``test_acc`` (losses in nats per image, accuracies as fractions), ``lr``,
        ``seconds`` (the epoch's wall time, evaluation included) and ``elapsed_train_seconds``
        (training time since the start), plus ``val_loss`` and ``val_acc`` with a validation split.

    Raises:
        DeviceError, ConfigError: a bad device, subset or validation size (nothing is written).
        CheckpointError: ``run_dir`` holds a checkpoint of other settings or a damaged one.
        WriteError: a checkpoint cannot be written (disk full); the last one stays on disk.
        RunFolderBusy: another process is training into ``run_dir``.
        TrainingDiverged: a training, validation or test figure became NaN or infinite; the
            checkpoint kept is the last one whose figures were all finite.
    """
    device = select_device(device)
    torch.manual_seed(config.seed)
    (images, labels), val, normalization = prepare(config, train_data)
    dtype = amp_dtype(device, config.amp)
    with open_run(run_dir) as folder:
        log(f"device: {describe_device(device)}{amp_note(config.amp, dtype)}")
        model = LabCNN().to(device, memory_format=torch.channels_last)
        if config.whiten:
            whiten_conv(model.conv1[0], normalization(images[:WHITENING_IMAGES]))
        optimizer = make_optimizer(config, model)
        scheduler = make_scheduler(config, optimizer, math.ceil(len(labels) / config.batch_size))
        scaler = grad_scaler(device, dtype)
        ema = make_ema(config, model)
        history = resume(folder, config, model, optimizer, scheduler, scaler, ema)
        trained = Trained(ema.module if ema else model, normalization, config, history)
        for record in trained.history:
            log(format_epoch(record, config.epochs))
        if trained.history:
            done = "run complete" if trained.epoch >= config.epochs else "resuming"
            log(f"{done}: {trained.epoch} of {config.epochs} epochs restored from {folder / CHECKPOINT}")
        step_model = torch.compile(model) if config.compile else model
        images, labels = images.to(device), labels.to(device)
        session = []
        for epoch in range(trained.epoch + 1, config.epochs + 1):
            record = run_epoch(trained, (step_model, optimizer, scheduler, scaler, ema), (images, labels), (val, test_data), epoch, dtype, folder)
            trained.history.append(record)
            if folder is not None:
                save_run(folder, checkpoint_state(model, optimizer, scheduler, scaler, trained.history, config, normalization, ema))
            session.append(record["seconds"])
            log(format_epoch(record, config.epochs, eta=sum(session) / len(session) * (config.epochs - epoch)))
    return trained


def run_epoch(trained: Trained, stepping: tuple, train, splits, epoch: int, dtype, folder) -> dict:
    """Train one epoch, evaluate the validation (if any) and test splits, and return the record.

    ``stepping``: ``(step_model, optimizer, scheduler, scaler, ema)``; ``trained.model`` (the
    moving average when ``ema`` is set) is the model evaluated.

    Raises:
        TrainingDiverged: a figure is not finite; names the epoch and the checkpoint kept.
    """
    config = trained.config
    step_model, optimizer, scheduler, scaler, ema = stepping
    start = time.perf_counter()
    lr = optimizer.param_groups[0]["lr"]
    generator = epoch_generator(config.seed, epoch)
    batches = training_batches(*train, config.batch_size, generator, trained.normalization, config.augment, config.cutout)
    steps = math.ceil(len(train[1]) / config.batch_size)
    try:
        train_loss, train_acc = train_one_epoch(step_model, optimizer, scheduler, scaler, batches, steps,
                                                config.label_smoothing, dtype, desc=f"epoch {epoch}", ema=ema)
    except TrainingDiverged as e:
        raise TrainingDiverged(f"{e} of epoch {epoch}; {kept_checkpoint(folder, epoch - 1)}") from None
    train_seconds = time.perf_counter() - start
    record = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc}
    for name, split in zip(("val", "test"), splits):
        if split is not None:
            result = evaluate(trained, *split, batch_size=config.eval_batch_size)
            record.update({f"{name}_loss": result["loss"], f"{name}_acc": result["accuracy"]})
    bad = [name for name, value in record.items() if not math.isfinite(value)]
    if bad:
        raise TrainingDiverged(f"the {bad[0].replace('_', ' ')} became {record[bad[0]]} at epoch {epoch}; {kept_checkpoint(folder, epoch - 1)}")
    elapsed = (trained.history[-1]["elapsed_train_seconds"] if trained.history else 0.0) + train_seconds
    record.update(lr=lr, seconds=time.perf_counter() - start, elapsed_train_seconds=elapsed)
    return record


def amp_note(amp: str, dtype) -> str:
    """The device line's word on mixed precision: nothing when it is off as asked."""
    if dtype is not None:
        return f", mixed precision {str(dtype).replace('torch.', '')}"
    if amp == "native":
        return ", float32 (the recipe's bfloat16 needs a device that computes it natively)"
    return "" if amp == "off" else f", mixed precision off (--amp {amp}: this device has no native bfloat16; float32 is used)"


def kept_checkpoint(folder, epochs_done: int) -> str:
    """What a diverged run leaves, for its message."""
    if folder is None or epochs_done == 0:
        kept = "no checkpoint was written"
    else:
        kept = f"{folder / CHECKPOINT} (epoch {epochs_done}, all its figures finite) is kept"
    return f"{kept}. Lower the learning rate and train into a new run folder"


def format_epoch(record: dict, epochs: int, eta: float | None = None) -> str:
    """``epoch 7/50  train loss 0.912 acc 68.1%  test loss 0.955 acc 66.8%  57 s  about 41 min left``."""
    val = f"  val loss {record['val_loss']:.3f} acc {record['val_acc']:.1%}" if "val_loss" in record else ""
    left = "" if eta is None or record["epoch"] >= epochs else f"  about {format_duration(eta)} left"
    return (
        f"epoch {record['epoch']}/{epochs}  train loss {record['train_loss']:.3f} acc {record['train_acc']:.1%}"
        f"{val}  test loss {record['test_loss']:.3f} acc {record['test_acc']:.1%}  {record['seconds']:.0f} s{left}"
    )


def format_duration(seconds: float) -> str:
    """``"2 h 05 min"``, ``"41 min 12 s"`` or ``"37 s"``."""
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return format_minutes(seconds) if seconds >= 60 else f"{seconds} s"
