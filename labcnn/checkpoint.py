"""Checkpoints: one plain dict per run, written atomically after every epoch, loaded with
``torch.load(weights_only=True)`` so an untrusted file runs no code, and the one model loader.

A checkpoint holds the model, optimizer, scheduler and gradient-scaler state, the history, the
config, the normalization and the fingerprints of the data it trained on: what defines its run,
so a resume with other settings or other data is refused. :func:`load_trained` also reads a bare
``state_dict`` of the lab's network (``torch.save(net.state_dict(), PATH)``).
"""
from __future__ import annotations

import hashlib
import json
import pickle
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch

from labcnn import CheckpointError, ConfigError, WriteError
from labcnn.config import config_dict, config_from_dict
from labcnn.fileio import atomic_write, make_dir, run_lock, write_json
from labcnn.model import LAB_NORMALIZATION, LabCNN, Normalization, Trained

FORMAT, VERSION = "labcnn-checkpoint", 2  # version 1: no data fingerprints
CHECKPOINT, HISTORY = "checkpoint.pt", "history.json"
KEYS = ("model", "optimizer", "scheduler", "epoch", "history", "config", "normalization")
WRAPPERS = ("model_state_dict", "state_dict", "model")  # dicts people save around a state dict
PREFIXES = ("module.", "_orig_mod.")  # added by DataParallel/DDP and by torch.compile
ACCEPTED = ("accepted: a checkpoint.pt written by python -m labcnn train, or the lab network's "
            "state_dict, alone or under 'model_state_dict' or 'state_dict'")

def fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    """SHA-256 (hex, first 16 digits) of uint8 images ``[N, 3, 32, 32]`` and int64 labels ``[N]``."""
    digest = hashlib.sha256(images.contiguous().numpy().tobytes())
    digest.update(labels.to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]

def provenance(model, history: list[dict]) -> dict[str, str]:
    """``weights sha256`` (of the state dict's names and tensor bytes, whatever file holds them)
    and ``history sha256`` (of the history as sorted JSON), in hex."""
    weights = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        weights.update(name.encode())
        weights.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    text = json.dumps(history, sort_keys=True).encode()
    return {"weights sha256": weights.hexdigest(), "history sha256": hashlib.sha256(text).hexdigest()}

def export(path, trained: Trained) -> None:
    """Write ``trained``'s weights as a state dict (about 2.4 MB), with its history's SHA-256,
    for ``python -m labcnn evaluate --checkpoint`` and ``verify``. Raises WriteError."""
    state = {"state_dict": trained.model.state_dict(),
             "history_sha256": provenance(trained.model, trained.history)["history sha256"]}
    atomic_write(path, lambda f: torch.save(state, f))

@contextmanager
def run_folder(run_dir):
    """Create ``run_dir`` (``None``: nothing on disk) and hold its lock for the block.
    Raises WriteError (cannot create it) or RunFolderBusy (another run holds it)."""
    if run_dir is None:
        yield None
        return
    folder = make_dir(Path(run_dir).expanduser())
    with run_lock(folder):
        yield folder

def save(folder: Path, trained: Trained, data: dict, model, optimizer, scheduler, scaler) -> None:
    """Write ``checkpoint.pt``, then ``history.json``, ``loss.png`` and ``accuracy.png``.
    Raises WriteError (disk full, no permission): the previous checkpoint then stays whole."""
    norm = trained.normalization
    state = {"format": f"{FORMAT}-{VERSION}", "model": model.state_dict(),
             "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict() if scheduler is not None else None,
             "scaler": scaler.state_dict() if scaler is not None else None,
             "epoch": trained.epoch, "history": trained.history, "data": data,
             "config": config_dict(trained.config),
             "normalization": {"mean": list(norm.mean), "std": list(norm.std)}}
    path = folder / CHECKPOINT
    kept = f"the previous {CHECKPOINT} is kept" if path.exists() else f"no {CHECKPOINT} was written"
    try:
        atomic_write(path, lambda f: torch.save(state, f))
    except WriteError as e:
        raise WriteError(e.path, e.reason, f"{kept}; free disk space or make {folder} writable, "
                         "then run the same command to resume") from None
    write_json(folder / HISTORY, trained.history)
    from labcnn import plots  # matplotlib only once a run folder is written

    plots.save_curves(folder, trained.history)

def resume(folder, config, data: dict, model, optimizer, scheduler, scaler) -> list[dict]:
    """Restore the run in ``folder`` into the given objects; return its history (``[]``: none).

    Raises:
        CheckpointError: damaged, from a newer labcnn, or written with other settings or data.
    """
    path = Path(folder) / CHECKPOINT if folder is not None else None
    if path is None or not path.exists():
        return []
    state = load_checkpoint(path)
    saved = saved_config(path, state)
    changed = [f"{k}={v!r} (now {getattr(config, k)!r})" for k, v in vars(saved).items()
               if v != getattr(config, k)]
    if changed:
        raise CheckpointError(f"{path} was written with other settings: {', '.join(changed)}. Run "
                              "with the checkpoint's settings to resume, or choose a new output folder")
    other = [f"{split} images (fingerprint {state['data'][split]}, now {data[split]})"
             for split in ("train", "test") if state.get("data", data)[split] != data[split]]
    if other:
        raise CheckpointError(f"{path} was trained on other data: the {' and '.join(other)} differ. "
                              "Resume with the run's --data-dir, or choose a new output folder")
    load_weights(path, model, state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    write_json(Path(folder) / HISTORY, state["history"])  # a kill between two writes: resync it
    return state["history"]

def saved_config(path, state: dict):
    """The checkpoint's TrainConfig; fields it predates read as their defaults."""
    try:
        return config_from_dict(state["config"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path} {e}") from None

def read_file(path):
    """``torch.load(path, map_location="cpu", weights_only=True)`` with one-line errors: no such
    file, truncated or damaged (``torch.save`` writes a zip since torch 1.6), or pickled objects."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    damaged = (f"{path} is not a readable checkpoint: it is truncated or damaged, or was not "
               "written by torch.save (zip format, torch 1.6 or later)")
    try:
        with zipfile.ZipFile(path) as archive:
            if archive.testzip() is not None:
                raise CheckpointError(damaged)
    except (zipfile.BadZipFile, EOFError, OSError):
        raise CheckpointError(damaged) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path} holds pickled Python objects (such as a whole model saved "
                              "with torch.save(model)), which weights_only loading refuses so "
                              "that no code runs: save model.state_dict() instead") from None
    except Exception as e:
        raise CheckpointError(f"{damaged} ({type(e).__name__})") from None

def load_checkpoint(path) -> dict:
    """A labcnn checkpoint (see :func:`save`), loaded on the CPU. Raises CheckpointError: as
    :func:`read_file`, not a labcnn checkpoint, from a newer labcnn, or lacking a key."""
    state = read_file(path)
    if not is_checkpoint(path, state):
        raise CheckpointError(f"{path} is not a labcnn checkpoint: {describe(state)}")
    return state

def is_checkpoint(path, state) -> bool:
    """Whether ``state`` is a labcnn checkpoint this version reads; CheckpointError when it is
    one from a newer labcnn or an incomplete one."""
    name = state.get("format") if isinstance(state, dict) else None
    if not isinstance(name, str) or not name.startswith(f"{FORMAT}-"):
        return False
    version = name.rsplit("-", 1)[1]
    if not version.isdigit() or int(version) > VERSION:
        raise CheckpointError(f"{path} comes from a newer labcnn (format {name}; this one reads up to "
                              f"{FORMAT}-{VERSION}): update labcnn (pip install -U) to use it")
    missing = [k for k in KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}: expected a complete {name} checkpoint")
    return True

def load_trained(path, device="cpu", normalization: Normalization | None = None) -> Trained:
    """The one way to load a trained model: a labcnn checkpoint, or a bare or wrapped state dict
    (``module.``/``_orig_mod.`` prefixes stripped), normalized with the checkpoint's statistics,
    or the lab's for a state dict, unless ``normalization`` is given.

    Returns a :class:`Trained` in eval mode, ``channels_last``, on ``device``; ``note`` says where
    its normalization came from. Raises CheckpointError naming what was found and what is accepted.
    """
    path = Path(path).expanduser()
    state = read_file(path)
    if is_checkpoint(path, state):
        trained = Trained(LabCNN(), Normalization(**state["normalization"]),
                          saved_config(path, state), state["history"])
        weights, source = state["model"], "normalization: the checkpoint's"
    else:
        weights = bare_state_dict(path, state)
        trained = Trained(LabCNN(), LAB_NORMALIZATION)
        source = f"{path} is a bare state dict: normalization is the lab's"
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
    return isinstance(value, dict) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())

def bare_state_dict(path, state) -> dict:
    """LabCNN's weights from a bare or wrapped state dict, prefixes stripped; else CheckpointError."""
    if isinstance(state, dict) and not is_state_dict(state):
        state = next((state[k] for k in WRAPPERS if is_state_dict(state.get(k))), state)
    if not is_state_dict(state):
        raise CheckpointError(f"{path} is not a labcnn checkpoint nor a state dict: "
                              f"{describe(state)}; {ACCEPTED}")
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state

def describe(value) -> str:
    """A few words on what a loaded file holds, for error messages."""
    if isinstance(value, dict):
        keys = list(value)
        return f"found a dict with keys {keys[:6]}{' ...' if len(keys) > 6 else ''}"
    return f"found a {type(value).__name__}"

def load_weights(path, model: LabCNN, weights) -> None:
    """Load ``weights`` into ``model`` after comparing names and shapes with LabCNN's own.
    Raises CheckpointError naming ``path``, a few missing, unexpected or misshapen keys."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if not is_state_dict(weights):
        raise CheckpointError(f"{path} holds weights of another model: {describe(weights)}")
    problems = {"missing": [k for k in expected if k not in weights],
                "unexpected": [k for k in weights if k not in expected],
                "shapes differ:": [f"{k} {list(weights[k].shape)} (LabCNN: {list(s)})"
                                   for k, s in expected.items()
                                   if k in weights and tuple(weights[k].shape) != s]}
    found = "; ".join(f"{what} {keys[:3]}{' ...' * (len(keys) > 3)}"
                      for what, keys in problems.items() if keys)
    if found:
        raise CheckpointError(f"{path} holds weights of another model, not LabCNN's ({found}); {ACCEPTED}")
    model.load_state_dict(weights)
