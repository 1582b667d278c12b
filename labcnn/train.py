"""Training and evaluation of :class:`labcnn.model.LabCNN`, with checkpoints that resume exactly.

One function per phase, after torchvision's ``references/classification/train.py``:
:func:`train_one_epoch`, :func:`evaluate`, and :func:`fit`, which wires them and writes a
checkpoint after every epoch. The data stay in memory as uint8 tensors on the training device;
batches are drawn by a seeded permutation, augmented and normalized as whole tensors.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from labcnn.data import LAB_MEAN, LAB_STD, channel_stats, normalization_tensors, normalize, subset
from labcnn.errors import CheckpointError, ConfigError, TrainingDiverged
from labcnn.model import LabCNN

CHECKPOINT_FORMAT = "labcnn-checkpoint-1"
CHECKPOINT = "checkpoint.pt"
HISTORY = "history.json"
TIME_FIELDS = ("seconds", "elapsed_train_seconds")  # the only history fields that vary between runs
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "epoch", "history", "config", "normalization")


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run. The defaults are the lab's recipe.

    Attributes:
        recipe: name of the recipe the settings came from (see :data:`RECIPES`).
        epochs: passes over the training set.
        batch_size: training images per step; the last batch of an epoch may be smaller,
            down to one image. That trains without error: every BatchNorm is a BatchNorm2d,
            which averages each channel over its 33x33, 17x17 or 9x9 map, never over one value.
        optimizer: ``"adam"`` (torch.optim.Adam, L2 ``weight_decay`` added to the gradient),
            ``"adamw"`` (torch.optim.AdamW, decoupled weight decay; Loshchilov and Hutter, 2019)
            or ``"sgd"`` (torch.optim.SGD with Nesterov momentum).
        lr: learning rate; the peak rate for the ``"onecycle"`` schedule.
        weight_decay: L2 penalty coefficient.
        momentum: SGD momentum (unused by Adam).
        schedule: ``"constant"`` or ``"onecycle"`` (torch.optim.lr_scheduler.OneCycleLR, stepped
            per batch; Smith and Topin, 2017, "Super-Convergence").
        label_smoothing: CrossEntropyLoss label smoothing (Szegedy et al., 2016), 0 for none.
        augment: random crop with 4-pixel zero padding and horizontal flip, per batch.
        mean, std: per-channel normalization as fractions of 255; ``None`` measures them on the
            training images (:func:`labcnn.data.channel_stats`).
        seed: seeds the initialization, the subset, the validation split and every shuffle.
        subset: train on this many training images (``None``: all).
        val_size: hold this many training images out as a validation set (0: none).
        eval_batch_size: images per evaluation batch; results do not depend on it.
        amp: bfloat16 autocast on CUDA (ignored elsewhere).
        compile: run the training steps through ``torch.compile`` (see ``python -m labcnn bench``).
    """

    recipe: str = "lab"
    epochs: int = 50
    batch_size: int = 100
    optimizer: str = "adam"
    lr: float = 0.01
    weight_decay: float = 0.001
    momentum: float = 0.9
    schedule: str = "constant"
    label_smoothing: float = 0.0
    augment: bool = False
    mean: tuple | None = LAB_MEAN
    std: tuple | None = LAB_STD
    seed: int = 0
    subset: int | None = None
    val_size: int = 0
    eval_batch_size: int = 1000
    amp: bool = False
    compile: bool = False

    def __post_init__(self):
        checks = {
            "epochs": self.epochs >= 1, "batch_size": self.batch_size >= 1, "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0, "optimizer": self.optimizer in ("adam", "adamw", "sgd"),
            "schedule": self.schedule in ("constant", "onecycle"), "val_size": self.val_size >= 0,
            "label_smoothing": 0 <= self.label_smoothing < 1, "eval_batch_size": self.eval_batch_size >= 1,
            "subset": self.subset is None or self.subset >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(f"invalid TrainConfig {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)}")


# Named recipes: overrides of the TrainConfig defaults.
RECIPES = {
    "lab": {},
    # Choices made on 5,000 held-out training images (val_size), never on the test set.
    "improved": dict(
        epochs=40, batch_size=128, optimizer="sgd", lr=0.1, weight_decay=5e-4, momentum=0.9,
        schedule="onecycle", label_smoothing=0.1, augment=True, mean=None, std=None, val_size=5000,
    ),
}


def make_config(recipe: str = "lab", **overrides) -> TrainConfig:
    """The named recipe's :class:`TrainConfig`, with ``overrides`` that are not ``None`` applied.

    Raises:
        ConfigError: unknown recipe or field, or an invalid value.
    """
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; choose one of {sorted(RECIPES)}")
    names = {f.name for f in fields(TrainConfig)}
    unknown = set(overrides) - names
    if unknown:
        raise ConfigError(f"unknown TrainConfig fields {sorted(unknown)}")
    set_fields = {k: v for k, v in overrides.items() if v is not None}
    return TrainConfig(**{**RECIPES[recipe], "recipe": recipe, **set_fields})


def select_device(name: str | None = None) -> torch.device:
    """``name`` if given, else CUDA, then Apple MPS, then CPU."""
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def describe_device(device: torch.device) -> str:
    """A one-line description such as ``cpu (2 threads)`` or ``cuda (NVIDIA H200)``."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return device.type


def use_physical_cores(threads: int | None = None) -> int:
    """Set torch's CPU threads to ``threads``, or else to the physical core count, and return it.

    Hyper-threads share a core's arithmetic units, so one thread per physical core is the usual
    optimum for dense CPU kernels. ``OMP_NUM_THREADS``, when set, wins over the core count.
    """
    import psutil

    if threads is None and not os.environ.get("OMP_NUM_THREADS"):
        threads = psutil.cpu_count(logical=False)
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def show_progress() -> bool:
    """Progress bars in a terminal or notebook; never when ``CI`` is set or output is piped."""
    if os.environ.get("CI"):
        return False
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython else None
    return sys.stderr.isatty() or type(shell).__name__ == "ZMQInteractiveShell"


def make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
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


def train_one_epoch(model, optimizer, scheduler, images, labels, config: TrainConfig, epoch: int, mean, std):
    """One pass over ``images`` (uint8 ``[N, 3, 32, 32]``) and ``labels`` (int64 ``[N]``).

    The order is a permutation seeded by ``(config.seed, epoch)``, so a resumed run draws the
    same batches. Metrics accumulate on the device with no per-step synchronisation.

    Returns:
        ``(loss, accuracy)``: mean cross-entropy per sample in nats (label-smoothed if the
        recipe smooths), and top-1 accuracy as a fraction, over every sample seen this epoch
        with the model in train mode.

    Raises:
        TrainingDiverged: the loss was NaN or infinite; the message names the epoch and step.
    """
    model.train()
    device = images.device
    generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
    order = torch.randperm(len(labels), generator=generator).to(device)
    steps = math.ceil(len(labels) / config.batch_size)
    losses = torch.zeros(steps, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    bar = tqdm(range(steps), desc=f"epoch {epoch}", leave=False, disable=not show_progress())
    for step in bar:
        index = order[step * config.batch_size : (step + 1) * config.batch_size]
        x, y = images[index], labels[index]
        if config.augment:
            x = augment(x, generator)
        x = normalize(x, mean, std).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.amp and device.type == "cuda"):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses[step] = loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
    losses = losses.cpu()
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        step = bad[0].item()
        raise TrainingDiverged(f"the training loss became {losses[step].item()} at epoch {epoch}, step {step + 1}")
    return losses.double().sum().item() / len(labels), correct.item() / len(labels)


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


def evaluate(model, images, labels, mean=LAB_MEAN, std=LAB_STD, batch_size: int = 1000, flip_tta: bool = False):
    """Cross-entropy, top-1 accuracy, per-class accuracy and confusion matrix of ``model``.

    The model runs in eval mode (BatchNorm uses its running statistics) under
    ``torch.inference_mode()``, then goes back to the mode it was in. Losses are summed per
    sample in float64, so the results do not depend on ``batch_size`` (beyond float rounding).

    Args:
        images: uint8 ``[N, 3, 32, 32]`` on any device; moved to the model's device per batch.
        labels: int64 ``[N]``.
        mean, std: normalization, three fractions each (sequences or float32 ``[3]`` tensors).
        flip_tta: average the logits of each image and its mirror image (test-time augmentation).

    Returns:
        dict with ``loss`` (float, nats per sample), ``accuracy`` (float, fraction),
        ``per_class_accuracy`` (list of 10 fractions), ``confusion`` (int64 ``[10, 10]``,
        rows true class, columns predicted) and ``predictions`` (int64 ``[N]``), on the CPU.
    """
    device = next(model.parameters()).device
    mean, std = normalization_tensors(mean, std, device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    predictions = []
    with eval_mode(model):
        for start in range(0, len(labels), batch_size):
            x = normalize(images[start : start + batch_size].to(device), mean, std)
            x = x.contiguous(memory_format=torch.channels_last)
            y = labels[start : start + batch_size].to(device)
            logits = model(x).float()
            if flip_tta:
                logits = (logits + model(x.flip(3)).float()) / 2
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            predictions.append(logits.argmax(1))
    predictions = torch.cat(predictions).cpu()
    labels = labels.cpu()
    confusion = torch.bincount(labels * 10 + predictions, minlength=100).reshape(10, 10)
    per_class = confusion.diag() / confusion.sum(1).clamp(min=1)
    return {
        "loss": loss_sum.item() / len(labels),
        "accuracy": (predictions == labels).double().mean().item(),
        "per_class_accuracy": per_class.tolist(),
        "confusion": confusion,
        "predictions": predictions,
    }


def format_epoch(record: dict, epochs: int) -> str:
    """``epoch 7/50  train loss 0.912 acc 68.1%  test loss 0.955 acc 66.8%  57 s``."""
    val = f"  val loss {record['val_loss']:.3f} acc {record['val_acc']:.1%}" if "val_loss" in record else ""
    return (
        f"epoch {record['epoch']}/{epochs}  train loss {record['train_loss']:.3f} acc {record['train_acc']:.1%}"
        f"{val}  test loss {record['test_loss']:.3f} acc {record['test_acc']:.1%}  {record['seconds']:.0f} s"
    )


def atomic_write(path: Path, write) -> None:
    """Create ``path`` by calling ``write(binary file)`` on ``path.tmp``, then fsync and rename.

    A crash, kill, Ctrl-C or full disk during the write leaves the previous ``path`` in place.
    The ``.tmp`` file is removed on any error (a killed process leaves it; the next write
    replaces it).

    Raises:
        CheckpointError: the write failed with an OSError (disk full, no permission), naming
            ``path`` and saying whether its previous version is kept.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if not isinstance(e, OSError):
            raise
        kept = f"the previous {path.name} is kept" if path.exists() else f"no {path.name} was written"
        raise CheckpointError(
            f"could not write {path} ({e.strerror or e}); {kept}. Fix that (e.g. free disk space), "
            "then run the same command to resume"
        ) from None


def save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` to ``path`` with ``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: torch.save(state, f))


def write_json(path: Path, value) -> None:
    """Write ``value`` as JSON to ``path`` through :func:`atomic_write`."""
    atomic_write(path, lambda f: f.write((json.dumps(value, indent=1) + "\n").encode()))


def load_checkpoint(path) -> dict:
    """A checkpoint written by :func:`fit`, loaded on the CPU with ``weights_only=True``.

    Returns the dict with ``format``, ``model``, ``optimizer``, ``scheduler`` (state dicts),
    ``epoch`` (int, last completed), ``history`` (list of dicts), ``config`` (dict) and
    ``normalization`` (``mean`` and ``std``, three floats each). Tensors saved on a GPU load on
    the CPU, so a CPU-only machine reads any checkpoint.

    Raises:
        CheckpointError: missing, truncated or damaged, holding objects other than tensors and
            plain values (refused by ``weights_only=True``), not a labcnn checkpoint, or lacking
            one of the keys above.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise load_failure(path, e) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a labcnn checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}: expected a complete {CHECKPOINT_FORMAT} checkpoint")
    return state


def load_failure(path, error: Exception) -> CheckpointError:
    """A one-line :class:`CheckpointError` for ``torch.load``'s ``error`` (whose text spans lines)."""
    text = str(error).strip()
    if "GLOBAL" in text:  # weights_only=True met a pickled Python object
        return CheckpointError(
            f"{path} holds Python objects besides tensors (refused by torch.load(weights_only=True)): "
            "expected a checkpoint written by labcnn"
        )
    detail = text.splitlines()[0].split(". ")[0] if text else ""
    if detail.startswith("Weights only load failed"):  # an unreadable pickle
        detail = "not a torch checkpoint"
    return CheckpointError(f"{path} is not a readable checkpoint ({type(error).__name__}: {detail}): it is truncated or damaged")


def load_weights(path, model: nn.Module, weights) -> None:
    """Load ``weights`` (a state dict) into ``model``.

    Raises:
        CheckpointError: the weights are another model's; names ``path`` and the mismatch.
    """
    try:
        model.load_state_dict(weights)
    except Exception as e:  # RuntimeError for other keys or shapes, TypeError for a non-dict
        detail = " ".join(str(e).split())
        raise CheckpointError(f"{path} holds weights of another model, not LabCNN's ({detail[:200]})") from None


def load_model(path, device="cpu") -> tuple[LabCNN, dict]:
    """The trained :class:`LabCNN` from a checkpoint, on ``device``, and the checkpoint's config.

    Raises:
        CheckpointError: as :func:`load_checkpoint`, or its weights do not fit ``LabCNN``.
    """
    state = load_checkpoint(path)
    return model_from_state(path, state, device), state["config"]


def model_from_state(path, state: dict, device="cpu") -> LabCNN:
    """A :class:`LabCNN` holding the weights of ``state`` (from :func:`load_checkpoint` of ``path``).

    Raises:
        CheckpointError: the weights do not fit ``LabCNN``.
    """
    model = LabCNN()
    load_weights(path, model, state["model"])
    return model.to(device, memory_format=torch.channels_last)


def check_resumable(path: Path, state: dict, config: TrainConfig) -> None:
    """Raise :class:`CheckpointError` if the checkpoint was written with other settings."""
    wanted = asdict(config)
    saved = state["config"]
    diff = [k for k in wanted if saved.get(k) != wanted[k]]
    if diff:
        changes = ", ".join(f"{k}={saved.get(k)!r} (now {wanted[k]!r})" for k in diff)
        raise CheckpointError(
            f"{path} was written with other settings: {changes}. "
            "Run with the checkpoint's settings to resume, or choose a new output folder."
        )


def split_validation(images, labels, size: int, seed: int):
    """``((train_images, train_labels), (val_images, val_labels) or None)`` by a seeded permutation."""
    if size == 0:
        return (images, labels), None
    if size >= len(labels):
        raise ConfigError(f"val_size {size} must be smaller than the {len(labels)} training images")
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed + 1))
    val, train = order[:size], order[size:]
    return (images[train], labels[train]), (images[val], labels[val])


def fit(config: TrainConfig, train_data, test_data, run_dir=None, device=None, log=print):
    """Train :class:`LabCNN` with ``config``; resume from ``run_dir``'s checkpoint if there is one.

    Args:
        config: the settings (the lab's recipe by default).
        train_data, test_data: ``(images, labels)``, uint8 ``[N, 3, 32, 32]`` and int64 ``[N]``
            as returned by :func:`labcnn.data.load_cifar10`. The test set is used whole.
        run_dir: folder for ``checkpoint.pt`` (written after every epoch) and ``history.json``;
            ``None`` keeps nothing on disk.
        device: ``"cpu"``, ``"cuda"``, ``"mps"`` or ``None`` for :func:`select_device`.
        log: receives one line per epoch (and the device line).

    Returns:
        ``(model, history)``: the trained model, and one dict per epoch with ``epoch``,
        ``train_loss``, ``train_acc``, ``test_loss``, ``test_acc`` (losses in nats per sample,
        accuracies as fractions), ``lr``, ``seconds`` (the epoch's wall time) and
        ``elapsed_train_seconds`` (training time since the start), plus ``val_loss`` and
        ``val_acc`` when ``config.val_size`` > 0.

    Raises:
        CheckpointError: ``run_dir`` cannot be created, holds a checkpoint of other settings or
            a damaged one, or a checkpoint cannot be written (disk full); the last complete
            epoch's checkpoint stays on disk.
        TrainingDiverged: the loss became non-finite; the message names the epoch, the step and
            the checkpoint kept (the last good epoch's).
    """
    if run_dir is not None:
        make_run_dir(Path(run_dir))
    device = select_device(device)
    log(f"device: {describe_device(device)}")
    torch.manual_seed(config.seed)
    images, labels = subset(*train_data, config.subset, config.seed)
    (images, labels), val = split_validation(images, labels, config.val_size, config.seed)
    mean, std = (config.mean, config.std) if config.mean is not None else channel_stats(images)
    mean, std = normalization_tensors(mean, std, device)
    model = LabCNN().to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(config, model)
    scheduler = make_scheduler(config, optimizer, math.ceil(len(labels) / config.batch_size))
    history = resume(run_dir, config, model, optimizer, scheduler, log)
    step_model = torch.compile(model) if config.compile else model
    images, labels = images.to(device), labels.to(device)
    for epoch in range(len(history) + 1, config.epochs + 1):
        start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        try:
            train_loss, train_acc = train_one_epoch(step_model, optimizer, scheduler, images, labels, config, epoch, mean, std)
        except TrainingDiverged as e:
            raise TrainingDiverged(f"{e}; {kept_checkpoint(run_dir, len(history))}") from None
        train_seconds = time.perf_counter() - start
        record = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc}
        for name, split in (("val", val), ("test", test_data)):
            if split is not None:
                result = evaluate(model, *split, mean, std, config.eval_batch_size)
                record.update({f"{name}_loss": result["loss"], f"{name}_acc": result["accuracy"]})
        elapsed = (history[-1]["elapsed_train_seconds"] if history else 0.0) + train_seconds
        record.update(lr=lr, seconds=time.perf_counter() - start, elapsed_train_seconds=elapsed)
        history.append(record)
        log(format_epoch(record, config.epochs))
        if run_dir is not None:
            save_run(Path(run_dir), model, optimizer, scheduler, history, config, mean, std)
    return model, history


def make_run_dir(run_dir: Path) -> None:
    """Create ``run_dir`` before training, so an unusable ``--out`` fails at once, not after an epoch."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create the run folder {run_dir} ({e.strerror or e}): expected a writable folder") from None


def kept_checkpoint(run_dir, epochs_done: int) -> str:
    """What a diverged run leaves, for its message: ``"runs/x/checkpoint.pt (epoch 3) is kept. ..."``."""
    if run_dir is None or epochs_done == 0:
        kept = "no checkpoint was written"
    else:
        kept = f"{Path(run_dir) / CHECKPOINT} (epoch {epochs_done}) is kept"
    return f"{kept}. Lower the learning rate and train into a new run folder"


def resume(run_dir, config, model, optimizer, scheduler, log) -> list[dict]:
    """Restore the run in ``run_dir`` into the given objects and return its history (or ``[]``).

    Also rewrites ``history.json`` from the checkpoint, which a kill between the two writes of
    :func:`save_run` may have left one epoch behind.

    Raises:
        CheckpointError: the checkpoint is damaged, of another model, or of other settings.
    """
    if run_dir is None or not (Path(run_dir) / CHECKPOINT).exists():
        return []
    path = Path(run_dir) / CHECKPOINT
    state = load_checkpoint(path)
    check_resumable(path, state, config)
    load_weights(path, model, state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    history = state["history"]
    write_json(Path(run_dir) / HISTORY, history)
    for record in history:
        log(format_epoch(record, config.epochs))
    done = "run complete" if len(history) >= config.epochs else "resuming"
    log(f"{done}: {len(history)} of {config.epochs} epochs restored from {path}")
    return history


def save_run(run_dir: Path, model, optimizer, scheduler, history, config, mean, std) -> None:
    """Write ``checkpoint.pt`` and ``history.json`` (into the folder :func:`fit` made) for the epochs completed so far."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "epoch": len(history),
        "history": history,
        "config": asdict(config),
        "normalization": {"mean": mean.tolist(), "std": std.tolist()},
    }
    save_checkpoint(run_dir / CHECKPOINT, state)
    write_json(run_dir / HISTORY, history)


def first_block_maps(model: LabCNN, image: torch.Tensor, mean=LAB_MEAN, std=LAB_STD) -> torch.Tensor:
    """Feature maps of ``conv1`` after its convolution, BatchNorm and ReLU, before pooling.

    ``image``: uint8 ``[3, 32, 32]``. Returns float32 ``[32, 33, 33]`` on the CPU, computed in
    eval mode (running BatchNorm statistics); the model's mode is left as it was.
    """
    with eval_mode(model):
        image = image[None].to(next(model.parameters()).device)
        return model.conv1[:3](normalize(image, mean, std))[0].cpu()
