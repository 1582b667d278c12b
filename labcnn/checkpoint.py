"""Run folders and checkpoints: every byte a training run writes, and the one way to load a model.

A checkpoint is one plain dict, as in torchvision's ``references/classification``: model,
optimizer, scheduler and gradient-scaler state, the epoch, the history, the config and the
normalization. It is written after every epoch through :func:`labcnn.fileio.atomic_write` and
loaded with ``torch.load(weights_only=True)``, so an untrusted file runs no code.

:func:`load_trained` is the one loader: it returns a :class:`Trained`, the model together with
the normalization it must be used with. It also reads a bare ``state_dict`` of the lab's network
(``torch.save(net.state_dict(), "model.pth")`` in the original lab script).
"""
from __future__ import annotations

import pickle
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from labcnn.config import TrainConfig, config_dict, config_from_dict
from labcnn.errors import CheckpointError, ConfigError, WriteError
from labcnn.fileio import atomic_write, make_dir, run_lock, write_json
from labcnn.model import LabCNN
from labcnn.transforms import LAB_NORMALIZATION, Normalization

CHECKPOINT_FORMAT = "labcnn-checkpoint-1"
CHECKPOINT = "checkpoint.pt"
HISTORY = "history.json"
CURVES = ("loss", "accuracy")  # RUN/loss.png and RUN/accuracy.png, redrawn after every epoch
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "epoch", "history", "config", "normalization")
WRAPPER_KEYS = ("model_state_dict", "state_dict", "model")  # dicts people save around a state dict
PREFIXES = ("module.", "_orig_mod.")  # added by nn.DataParallel / DDP and by torch.compile


@dataclass
class Trained:
    """A trained :class:`LabCNN` and what it needs to be used: its input normalization.

    Attributes:
        model: the network, in the mode and on the device it was left.
        normalization: the per-channel statistics it was trained with.
        config: the run's settings (``None`` for a bare state dict).
        history: one dict per completed epoch (see :func:`labcnn.train.fit`); empty if unknown.
        note: where the normalization came from, for the user (e.g. for a bare state dict).
    """

    model: LabCNN
    normalization: Normalization
    config: TrainConfig | None = None
    history: list = field(default_factory=list)
    note: str = ""

    @property
    def epoch(self) -> int:
        """Completed epochs (0 when unknown)."""
        return len(self.history)


@contextmanager
def open_run(run_dir):
    """Create ``run_dir`` (``None``: nothing on disk) and hold its lock for the block.

    Raises:
        WriteError: the folder cannot be created (``--out`` is a file, or not writable).
        RunFolderBusy: another process is training into it.
    """
    if run_dir is None:
        yield None
        return
    folder = make_dir(Path(run_dir).expanduser())
    with run_lock(folder):
        yield folder


def save_run(folder: Path, state: dict) -> None:
    """Write ``checkpoint.pt``, then ``history.json``, ``loss.png`` and ``accuracy.png``.

    ``state``: the checkpoint dict (:data:`CHECKPOINT_KEYS`); its ``history`` holds only finite
    figures (strict JSON). Raises :class:`WriteError` (disk full, no permission); the previous
    checkpoint then stays, and the message says so.
    """
    path = folder / CHECKPOINT
    kept = f"the previous {CHECKPOINT} (epoch {state['epoch'] - 1}) is kept" if path.exists() else f"no {CHECKPOINT} was written"
    try:
        atomic_write(path, lambda f: torch.save({"format": CHECKPOINT_FORMAT, **state}, f))
    except WriteError as e:
        raise WriteError(e.path, e.reason, f"{kept}; free disk space or make {folder} writable, then run the same command to resume") from None
    write_json(folder / HISTORY, state["history"])
    from labcnn import plots  # matplotlib: imported only when a run folder is written

    for metric in CURVES:
        plots.save(plots.plot_curves(state["history"], metric), folder / f"{metric}.png")


def checkpoint_state(model, optimizer, scheduler, scaler, history, config, normalization, ema=None) -> dict:
    """The checkpoint dict of a run after ``len(history)`` epochs (plain values and tensors only).

    ``model`` holds the weights evaluated: the moving average's when ``ema`` (an ``AveragedModel``)
    is given; the trained weights are then under ``training_model``, and its step count under
    ``ema_steps``, so a resumed run continues both.
    """
    extra = {} if ema is None else {"training_model": model.state_dict(), "ema_steps": int(ema.n_averaged)}
    return {
        "model": (ema.module if ema is not None else model).state_dict(),
        **extra,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict(),
        "epoch": len(history),
        "history": history,
        "config": config_dict(config),
        "normalization": {"mean": list(normalization.mean), "std": list(normalization.std)},
    }


def resume(folder, config: TrainConfig, model, optimizer, scheduler, scaler, ema=None) -> list[dict]:
    """Restore the run in ``folder`` into the given objects and return its history (or ``[]``).

    Raises:
        CheckpointError: the checkpoint is damaged, of another model, or of other settings.
    """
    path = Path(folder) / CHECKPOINT if folder is not None else None
    if path is None or not path.exists():
        return []
    state = load_checkpoint(path)
    saved = saved_config(path, state)
    if saved != config:
        changes = ", ".join(f"{k}={getattr(saved, k)!r} (now {getattr(config, k)!r})" for k in config_dict(config) if getattr(saved, k) != getattr(config, k))
        raise CheckpointError(
            f"{path} was written with other settings: {changes}. "
            "Run with the checkpoint's settings to resume, or choose a new output folder."
        )
    missing = [k for k in ("training_model", "ema_steps") if ema is not None and k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}: a run with a moving average (ema={config.ema}) saves both")
    load_weights(path, model, state.get("training_model", state["model"]))
    if ema is not None:
        load_weights(path, ema.module, state["model"])
        ema.n_averaged.fill_(state["ema_steps"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    write_json(Path(folder) / HISTORY, state["history"])  # a kill between two writes may have left it behind
    return state["history"]


def saved_config(path, state: dict) -> TrainConfig:
    """The checkpoint's :class:`TrainConfig`; fields it predates read as their defaults."""
    try:
        return config_from_dict(state["config"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path} holds settings this version cannot read ({e})") from None


def load_checkpoint(path) -> dict:
    """A checkpoint written by :func:`labcnn.train.fit`, loaded on the CPU with ``weights_only=True``.

    Returns the dict with ``format``, ``model``, ``optimizer``, ``scheduler`` (state dicts),
    ``epoch`` (int, last completed), ``history`` (list of dicts), ``config`` (dict) and
    ``normalization`` (``mean`` and ``std``, three floats each). Tensors saved on a GPU load on
    the CPU, so a CPU-only machine reads any checkpoint.

    Raises:
        CheckpointError: as :func:`read_file`; or not a labcnn checkpoint, or lacking a key above.
    """
    return checked(path, read_file(path))


def checked(path, state) -> dict:
    """``state`` if it is a complete labcnn checkpoint, else :class:`CheckpointError` naming ``path``."""
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a labcnn checkpoint (expected format {CHECKPOINT_FORMAT!r}): {describe(state)}")
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}: expected a complete {CHECKPOINT_FORMAT} checkpoint")
    return state


def read_file(path):
    """``torch.load(path, map_location="cpu", weights_only=True)``, with one-line errors.

    Failures are told apart by file structure and exception type, not by torch's wording: a
    file written by ``torch.save`` (torch 1.6 and later) is a zip archive, checked first.

    Raises:
        CheckpointError: no such file; truncated or damaged (bad zip, or not a zip at all);
            or holding pickled Python objects (a whole model), which ``weights_only`` refuses.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    damaged = f"{path} is not a readable checkpoint: it is truncated or damaged, or was not written by torch.save (zip format, torch 1.6 or later)"
    try:
        with zipfile.ZipFile(path) as archive:
            if archive.testzip() is not None:
                raise CheckpointError(damaged)
    except (zipfile.BadZipFile, EOFError, OSError):
        raise CheckpointError(damaged) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # weights_only=True met a pickled class or function
        raise CheckpointError(
            f"{path} holds pickled Python objects (such as a whole model saved with torch.save(model)), "
            "which torch.load(weights_only=True) refuses so that no code runs: save model.state_dict() instead"
        ) from None
    except Exception as e:
        raise CheckpointError(f"{damaged} ({type(e).__name__})") from None


def load_trained(path, device="cpu", normalization: Normalization | None = None) -> Trained:
    """The one way to load a trained model: from a labcnn checkpoint, or a bare state dict.

    Args:
        path: a ``checkpoint.pt`` written by ``python -m labcnn train``, or a file holding
            ``LabCNN``'s ``state_dict`` alone or under ``model_state_dict``, ``state_dict`` or
            ``model`` (``module.`` and ``_orig_mod.`` key prefixes, from DataParallel and
            torch.compile, are stripped).
        device: where the model goes (``torch.device`` or name).
        normalization: use these statistics instead. ``None``: a checkpoint's own; for a bare
            state dict, the lab's (:data:`labcnn.transforms.LAB_NORMALIZATION`), and ``note``
            says so.

    Returns:
        :class:`Trained` with the model in eval mode, ``channels_last``, on ``device``.

    Raises:
        CheckpointError: unreadable (see :func:`read_file`), or holding something other than
            LabCNN's weights; the message says what was found and what is accepted.
    """
    path = Path(path).expanduser()
    state = read_file(path)
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        state = checked(path, state)
        trained = Trained(LabCNN(), Normalization(**state["normalization"]), saved_config(path, state), state["history"])
        weights, source = state["model"], "normalization: the checkpoint's"
    else:
        weights = bare_state_dict(path, state)
        trained, source = Trained(LabCNN(), LAB_NORMALIZATION), f"{path} is a bare state dict: normalization is the lab's"
    if normalization is not None:
        trained.normalization, source = normalization, "normalization: as given"
    load_weights(path, trained.model, weights)
    n = trained.normalization
    trained.note = f"{source} (mean {fmt(n.mean)}, std {fmt(n.std)})"
    if trained.config is None and normalization is None:
        trained.note += "; --mean and --std choose others"
    trained.model.to(device, memory_format=torch.channels_last).eval()
    return trained


def fmt(values) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"


def is_state_dict(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def bare_state_dict(path, state) -> dict:
    """LabCNN's weights from a bare or wrapped state dict, prefixes stripped; else CheckpointError."""
    if not is_state_dict(state) and isinstance(state, dict):
        state = next((state[k] for k in WRAPPER_KEYS if is_state_dict(state.get(k))), state)
    if not is_state_dict(state):
        raise CheckpointError(f"{path} is not a labcnn checkpoint nor a state dict: {describe(state)}. {ACCEPTED}")
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


ACCEPTED = ("Accepted: a checkpoint.pt written by python -m labcnn train, or the lab network's "
            "state_dict (torch.save(net.state_dict(), PATH)), alone or under 'model_state_dict' or 'state_dict'")


def describe(value) -> str:
    """A few words on what a loaded file holds, for error messages."""
    if isinstance(value, dict):
        keys = list(value)
        return f"found a dict with keys {keys[:6]}{' ...' if len(keys) > 6 else ''}"
    return f"found a {type(value).__name__}"


def load_weights(path, model: LabCNN, weights: dict) -> None:
    """Load ``weights`` into ``model`` after comparing names and shapes with LabCNN's own.

    Raises:
        CheckpointError: keys missing or unexpected, or shapes differ; names ``path``, a few of
            each, and what is accepted.
    """
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if not is_state_dict(weights):
        raise CheckpointError(f"{path} holds weights of another model, not LabCNN's: {describe(weights)}")
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    shapes = [f"{k} {list(weights[k].shape)} (LabCNN: {list(s)})" for k, s in expected.items() if k in weights and tuple(weights[k].shape) != s]
    if missing or unexpected or shapes:
        found = "; ".join(f"{what} {items[:3]}{' ...' if len(items) > 3 else ''}" for what, items in
                          (("missing", missing), ("unexpected", unexpected), ("shapes differ:", shapes)) if items)
        raise CheckpointError(f"{path} holds weights of another model, not LabCNN's ({found}). {ACCEPTED}")
    model.load_state_dict(weights)
