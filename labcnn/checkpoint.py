"""Checkpoint files: written atomically, read with ``weights_only=True`` (no code in a file runs),
and one loader for a labcnn checkpoint or the lab network's weights saved by any tool."""

import hashlib
import json
import pickle
import zipfile
from dataclasses import asdict, astuple
from pathlib import Path

import torch

from labcnn import CheckpointError, ConfigError
from labcnn.fileio import atomic_write, broken_link
from labcnn.model import LAB_NORMALIZATION, LabCNN, Normalization, Trained
from labcnn.settings import config_from_dict

FORMAT, VERSION = "labcnn-checkpoint", 2  # version 1: no data fingerprints, no scaler
CHECKPOINT, HISTORY = "checkpoint.pt", "history.json"
KEYS = ("model", "optimizer", "scheduler", "epoch", "history", "config", "normalization")
WRAPPERS = ("model_state_dict", "state_dict", "model")  # dicts people save around a state dict
# Prefixes that wrappers add to every key, in any order: DataParallel and DistributedDataParallel
# add "module.", torch.compile "_orig_mod." (pytorch/pytorch#101107).
PREFIXES = ("module.", "_orig_mod.")
ACCEPTED = (
    "accepted: a checkpoint.pt written by python -m labcnn train, or the lab network's "
    "state_dict, alone or under 'model_state_dict' or 'state_dict'"
)


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
    state = {
        "state_dict": trained.model.state_dict(),
        "normalization": asdict(trained.normalization),  # tuples, which weights_only reads
        "history_sha256": provenance(trained.model, trained.history)["history sha256"],
    }
    atomic_write(path, lambda f: torch.save(state, f))


def save(path: Path, trained: Trained, data: dict, state: dict) -> None:
    """Write a checkpoint of ``trained`` (``state``: its model, optimizer, scheduler and scaler;
    ``data``: the splits' fingerprints) to ``path``; on WriteError the previous file is kept."""
    checkpoint = {
        "format": f"{FORMAT}-{VERSION}",
        "epoch": trained.epoch,
        "history": trained.history,
        "data": data,
        "config": asdict(trained.config),
        "normalization": asdict(trained.normalization),  # tuples, which weights_only reads
    }
    for key, part in state.items():  # a missing scheduler is stored as None
        checkpoint[key] = part.state_dict() if part is not None else None
    kept = f"the previous {path.name} is kept" if path.exists() else f"no {path.name} was written"
    advice = f"{kept}; free disk space or make {path.parent} writable, then run the same command"
    atomic_write(path, lambda f: torch.save(checkpoint, f), advice + " to resume")


def read_file(path):
    """``path`` loaded onto the CPU, weights only, in any format torch reads so (the zip format
    of torch 1.6 and later, and the older one). CheckpointError: missing, damaged, pickled."""
    path = Path(path).expanduser()
    if path.is_dir():
        inside = path / CHECKPOINT
        what = f"a run folder: pass {inside}" if inside.is_file() else "a folder, not a file"
        raise CheckpointError(f"{path} is {what}; {ACCEPTED}")
    if broken_link(path):
        raise CheckpointError(f"{path} is {broken_link(path)}: fix the link, or pass the file")
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    damaged = f"{path} is not a readable checkpoint: it is truncated or damaged, or was not "
    damaged += "written by torch.save"
    try:
        # torch does not check the zip members' CRCs: a flipped byte would load silently.
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                if archive.testzip() is not None:
                    raise CheckpointError(damaged)
        return torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # not a pickle torch reads: damaged
            raise CheckpointError(damaged) from None
        raise CheckpointError(
            f"{path} holds pickled Python objects (such as a whole model saved with "
            "torch.save(model)), which weights_only loading refuses so that no code runs: "
            "save model.state_dict() instead"
        ) from None
    except Exception as e:  # zipfile, torch and pickle raise many types on damaged files
        raise CheckpointError(f"{damaged} ({type(e).__name__})") from None


def checkpoint_config(path, state):
    """The TrainConfig of ``state`` if it is a labcnn checkpoint (fields it predates: defaults),
    else None. CheckpointError: from a newer labcnn, incomplete, or of unknown settings."""
    name = state.get("format") if isinstance(state, dict) else None
    if not isinstance(name, str) or not name.startswith(f"{FORMAT}-"):
        return None
    if name not in [f"{FORMAT}-{v}" for v in range(1, VERSION + 1)]:
        raise CheckpointError(
            f"{path} comes from a newer labcnn (format {name}; this one reads "
            f"up to {FORMAT}-{VERSION}): update labcnn (pip install -U)"
        )
    missing = [k for k in KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}: expected a complete {name} checkpoint")
    try:
        return config_from_dict(state["config"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path} {e}") from None


def load_checkpoint(path) -> dict:
    """A labcnn checkpoint (see :func:`save`), loaded on the CPU; else CheckpointError."""
    state = read_file(path)
    if checkpoint_config(path, state) is None:
        raise CheckpointError(f"{path} is not a labcnn checkpoint: {describe(state)}")
    return state


def load_trained(path, device="cpu", normalization=None, state=None) -> Trained:
    """The one model loader: a labcnn checkpoint, or an exported, bare or wrapped state dict,
    with its own normalization, else the lab's, unless ``normalization`` is given; ``state``:
    the file as :func:`read_file` gave it, if already read. Returns a Trained in eval mode,
    ``channels_last``, on ``device``; ``note`` says whence its normalization came. Raises
    CheckpointError."""
    path = Path(path).expanduser()
    state = read_file(path) if state is None else state
    norm = state.get("normalization") if isinstance(state, dict) else None
    try:
        saved = Normalization(norm["mean"], norm["std"]) if isinstance(norm, dict) else None
    except (KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{path} holds an invalid normalization ({e})") from None
    config = checkpoint_config(path, state)
    if config is not None:
        trained = Trained(LabCNN(), saved, config, state["history"])
        weights, source = state["model"], "normalization: the checkpoint's"
    else:  # a state dict, bare or under a WRAPPERS key, with its normalization if export() wrote it
        trained = Trained(LabCNN(), saved or LAB_NORMALIZATION)
        weights = state
        if isinstance(state, dict) and not is_state_dict(state):
            weights = next((state[k] for k in WRAPPERS if is_state_dict(state.get(k))), state)
        if not is_state_dict(weights):
            raise CheckpointError(
                f"{path} is not a labcnn checkpoint nor a state dict: {describe(state)}; {ACCEPTED}"
            )
        source = "normalization: the exported run's"
        if not saved:
            source = f"{path} is a bare state dict: normalization is the lab's"
    if normalization is not None:
        trained.normalization, source = normalization, "normalization: as given"
    load_weights(path, trained.model, weights)
    mean, std = (", ".join(f"{v:.4f}" for v in values) for values in astuple(trained.normalization))
    trained.note = f"{source} (mean ({mean}), std ({std}))"
    if trained.config is None and normalization is None:
        trained.note += "; --mean and --std choose others"
    trained.model.to(device, memory_format=torch.channels_last).eval()
    return trained


def is_state_dict(value) -> bool:
    """Whether ``value`` is a non-empty dict of names to tensors."""
    if not isinstance(value, dict) or not value:
        return False
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def without_prefixes(weights: dict) -> dict:
    """``weights`` with PREFIXES removed while every key starts with one, in any order."""
    while True:
        prefix = next((p for p in PREFIXES if all(k.startswith(p) for k in weights)), None)
        if prefix is None:
            return weights
        weights = {k.removeprefix(prefix): v for k, v in weights.items()}


def describe(value) -> str:
    """What a loaded file holds, for error messages: ``found a dict with keys [...]``."""
    if not isinstance(value, dict):
        return f"found a {type(value).__name__}"
    more = " ..." if len(value) > 6 else ""
    return f"found a dict with keys {list(value)[:6]}{more}"


def load_weights(path, model: LabCNN, weights) -> None:
    """Load ``weights`` into ``model`` as torch's ``load_state_dict`` does, after removing
    wrapper prefixes; CheckpointError naming missing, unexpected or misfit keys."""
    if not is_state_dict(weights):
        raise CheckpointError(f"{path} holds weights of another model: {describe(weights)}")
    weights = without_prefixes(weights)
    try:
        model.load_state_dict(weights)
        return
    except RuntimeError:
        pass  # torch's message spans lines: name the differences in one
    own = model.state_dict()
    problems = {
        "missing": [k for k in own if k not in weights and "num_batches_tracked" not in k],
        "unexpected": [k for k in weights if k not in own],
        "shapes differ:": [
            f"{k} {list(weights[k].shape)} (LabCNN: {list(v.shape)})"
            for k, v in own.items()
            if k in weights and weights[k].shape != v.shape
        ],
    }
    found = [
        f"{what} {keys[:3]}{' ...' if len(keys) > 3 else ''}"
        for what, keys in problems.items()
        if keys
    ]
    raise CheckpointError(
        f"{path} holds weights of another model, not LabCNN's ({'; '.join(found)}); {ACCEPTED}"
    )
