"""Run checkpoints, written atomically, read with weights_only=True (no code runs); one loader."""
import hashlib
import json
import pickle
import zipfile
from contextlib import contextmanager, nullcontext
from dataclasses import astuple
from pathlib import Path

import torch

from labcnn import CheckpointError, ConfigError
from labcnn.config import config_dict, config_from_dict
from labcnn.fileio import atomic_write, make_dir, run_lock, write_json
from labcnn.model import LAB_NORMALIZATION, LabCNN, Normalization, Trained

FORMAT, VERSION = "labcnn-checkpoint", 2  # version 1: no data fingerprints, no scaler
CHECKPOINT, HISTORY = "checkpoint.pt", "history.json"
KEYS = ("model", "optimizer", "scheduler", "epoch", "history", "config", "normalization")
WRAPPERS = ("model_state_dict", "state_dict", "model")  # dicts people save around a state dict
ACCEPTED = ("accepted: a checkpoint.pt written by python -m labcnn train, or the lab network's "
            "state_dict, alone or under 'model_state_dict' or 'state_dict'")

def fingerprint(images: torch.Tensor, labels: torch.Tensor) -> str:
    """SHA-256 (16 hex digits) of uint8 images ``[N, 3, 32, 32]`` and int64 labels ``[N]``."""
    digest = hashlib.sha256(images.cpu().contiguous().numpy().tobytes())
    digest.update(labels.cpu().to(torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]

def provenance(model, history: list[dict]) -> dict[str, str]:
    """Hex SHA-256s of the state dict (names, tensor bytes) and of the history (sorted JSON)."""
    weights = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        weights.update(name.encode())
        weights.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    history = hashlib.sha256(json.dumps(history, sort_keys=True).encode())
    return {"weights sha256": weights.hexdigest(), "history sha256": history.hexdigest()}

def export(path, trained: Trained) -> None:
    """Write ``trained``'s state dict (2.4 MB), normalization and history SHA-256; WriteError."""
    norm = trained.normalization
    state = {"state_dict": trained.model.state_dict(),
             "normalization": {"mean": list(norm.mean), "std": list(norm.std)},
             "history_sha256": provenance(trained.model, trained.history)["history sha256"]}
    atomic_write(path, lambda f: torch.save(state, f))

@contextmanager
def run_folder(run_dir):
    """Create ``run_dir`` (None: none) and lock it for the block; WriteError, RunFolderBusy."""
    folder = make_dir(Path(run_dir).expanduser()) if run_dir is not None else None
    with run_lock(folder) if folder is not None else nullcontext():
        yield folder

def save(folder: Path, trained: Trained, data: dict, model, optimizer, scheduler, scaler) -> None:
    """Write checkpoint.pt, then history.json and the curves; on WriteError the old one stays."""
    norm, path = trained.normalization, folder / CHECKPOINT
    state = {"format": f"{FORMAT}-{VERSION}", "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler and scheduler.state_dict(),
             "scaler": scaler and scaler.state_dict(), "epoch": trained.epoch,
             "history": trained.history, "data": data, "config": config_dict(trained.config),
             "normalization": {"mean": list(norm.mean), "std": list(norm.std)}}
    kept = f"the previous {CHECKPOINT} is kept" if path.exists() else f"no {CHECKPOINT} was written"
    atomic_write(path, lambda f: torch.save(state, f), f"{kept}; free disk space or make "
                 f"{folder} writable, then run the same command to resume")
    write_json(folder / HISTORY, trained.history)
    from labcnn import plots  # matplotlib only once a run folder is written
    plots.save_curves(folder, trained.history)

def resume(folder, config, data: dict, model, optimizer, scheduler, scaler) -> list[dict]:
    """Restore the run in ``folder`` into the given objects; return its history (``[]``: none).
    Raises CheckpointError: damaged, from a newer labcnn, or of other settings or data."""
    if folder is None or not (path := Path(folder) / CHECKPOINT).exists():
        return []
    state = load_checkpoint(path)
    saved = checkpoint_config(path, state)
    changed = [f"{k}={v!r} (now {getattr(config, k)!r})" for k, v in vars(saved).items()
               if v != getattr(config, k)]
    if changed:
        raise CheckpointError(f"{path} was written with other settings: {', '.join(changed)}. "
                              "Resume with the saved settings, or use a new output folder")
    other = [f"{split} images (fingerprint {state['data'][split]}, now {data[split]})"
             for split in ("train", "test") if state.get("data", data)[split] != data[split]]
    if other:
        raise CheckpointError(f"{path} was trained on other data: the {' and '.join(other)} "
                              "differ. Resume with the run's --data-dir or use a new output folder")
    load_weights(path, model, state["model"])
    for part, key in ((optimizer, "optimizer"), (scheduler, "scheduler"), (scaler, "scaler")):
        if part is not None and state.get(key):  # version 1 saved no scaler; {}: a disabled one
            part.load_state_dict(state[key])
    write_json(Path(folder) / HISTORY, state["history"])  # a kill between two writes: resync it
    return state["history"]

def read_file(path):
    """``path`` loaded onto the CPU, weights only; CheckpointError: missing, damaged or pickled."""
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
    """A labcnn checkpoint (see :func:`save`), loaded on the CPU; else CheckpointError."""
    if checkpoint_config(path, state := read_file(path)) is None:
        raise CheckpointError(f"{path} is not a labcnn checkpoint: {describe(state)}")
    return state

def checkpoint_config(path, state):
    """The TrainConfig of ``state`` if it is a labcnn checkpoint (fields it predates: defaults),
    else None. CheckpointError: from a newer labcnn, incomplete, or of unknown settings."""
    name = state.get("format") if isinstance(state, dict) else None
    if not isinstance(name, str) or not name.startswith(f"{FORMAT}-"):
        return None
    if name not in [f"{FORMAT}-{v}" for v in range(1, VERSION + 1)]:
        raise CheckpointError(f"{path} comes from a newer labcnn (format {name}; this one reads "
                              f"up to {FORMAT}-{VERSION}): update labcnn (pip install -U)")
    missing = [k for k in KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}: expected a complete {name} checkpoint")
    try:
        return config_from_dict(state["config"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path} {e}") from None

def load_trained(path, device="cpu", normalization: Normalization | None = None) -> Trained:
    """The one model loader: a labcnn checkpoint, an exported, bare or wrapped state dict, with its
    own normalization, else the lab's, unless ``normalization`` is given. A Trained in eval mode,
    ``channels_last``, on ``device``; ``note``: whence its normalization. Raises CheckpointError."""
    path = Path(path).expanduser()
    state = read_file(path)
    norm = state.get("normalization") if isinstance(state, dict) else None
    try:
        saved = Normalization(norm["mean"], norm["std"]) if isinstance(norm, dict) else None
    except (KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{path} holds an invalid normalization ({e})") from None
    if (config := checkpoint_config(path, state)) is not None:
        trained = Trained(LabCNN(), saved, config, state["history"])
        weights, source = state["model"], "normalization: the checkpoint's"
    else:  # a state dict, with its normalization if export() wrote it
        trained = Trained(LabCNN(), saved or LAB_NORMALIZATION)
        weights = bare_state_dict(path, state)
        source = ("normalization: the exported run's" if saved
                  else f"{path} is a bare state dict: normalization is the lab's")
    if normalization is not None:
        trained.normalization, source = normalization, "normalization: as given"
    load_weights(path, trained.model, weights)
    mean, std = (", ".join(f"{v:.4f}" for v in vs) for vs in astuple(trained.normalization))
    trained.note = f"{source} (mean ({mean}), std ({std}))"
    if trained.config is None and normalization is None:
        trained.note += "; --mean and --std choose others"
    trained.model.to(device, memory_format=torch.channels_last).eval()
    return trained

def is_state_dict(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())

def bare_state_dict(path, state) -> dict:
    """LabCNN's weights in a bare or wrapped state dict, prefixes stripped; else CheckpointError."""
    if isinstance(state, dict) and not is_state_dict(state):
        state = next((state[k] for k in WRAPPERS if is_state_dict(state.get(k))), state)
    if not is_state_dict(state):
        raise CheckpointError(f"{path} is not a labcnn checkpoint nor a state dict: "
                              f"{describe(state)}; {ACCEPTED}")
    for prefix in ("module.", "_orig_mod."):  # added by DataParallel/DDP and by torch.compile
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state

def describe(value) -> str:
    """What a loaded file holds, for error messages: ``found a dict with keys [...]``."""
    if not isinstance(value, dict):
        return f"found a {type(value).__name__}"
    return f"found a dict with keys {list(value)[:6]}{' ...' * (len(value) > 6)}"

def load_weights(path, model: LabCNN, weights) -> None:
    """Load ``weights`` into ``model``; CheckpointError naming missing, unexpected, misfit keys."""
    own = model.state_dict()
    if not is_state_dict(weights):
        raise CheckpointError(f"{path} holds weights of another model: {describe(weights)}")
    problems = {"missing": [k for k in own if k not in weights],
                "unexpected": [k for k in weights if k not in own],
                "shapes differ:": [f"{k} {list(weights[k].shape)} (LabCNN: {list(v.shape)})"
                                   for k, v in own.items() if weights.get(k, v).shape != v.shape]}
    found = "; ".join(f"{what} {keys[:3]}{' ...' * (len(keys) > 3)}"
                      for what, keys in problems.items() if keys)
    if found:
        raise CheckpointError(f"{path} holds weights of another model, not LabCNN's ({found}); "
                              f"{ACCEPTED}")
    model.load_state_dict(weights)
