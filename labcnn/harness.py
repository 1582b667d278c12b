"""The harness around :func:`labcnn.lab.fit`: a run folder with its lock, resume and replay of a
saved run, divergence checks, the time left, and after every epoch the checkpoint,
``history.json`` and the curves. The command line and the notebook train through :func:`train`.
"""

import copy
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path

from tqdm.auto import tqdm

from labcnn import CheckpointError, TrainingDiverged
from labcnn import checkpoint as ckpt
from labcnn.device import amp_dtype, describe_device, precision_name, select_device
from labcnn.fileio import make_dir, read_json, run_lock, write_json
from labcnn.lab import check_sizes, fit
from labcnn.model import LabCNN
from labcnn.plots import save_curves, usable_backend


def train(config, train_data, test_data, run_dir=None, device=None, log=print, model=None):
    """Train with ``config`` as :func:`~labcnn.lab.fit` does, resuming ``run_dir``'s checkpoint
    (``None``: nothing on disk); a finished run is replayed: its log printed, nothing written.

    After every epoch the checkpoint, ``history.json``, ``loss.png`` and ``accuracy.png`` are
    written, then the epoch's line is logged with the time left. Raises ConfigError or
    DeviceError before writing anything; CheckpointError, WriteError, RunFolderBusy;
    TrainingDiverged (NaN or inf; the last finite checkpoint is kept)."""
    check_sizes(config, len(train_data[1]))
    usable_backend()  # before the first epoch, whose curves it draws
    device = select_device(device)
    dtype = amp_dtype(device, config.amp)
    data = {"train": ckpt.fingerprint(*train_data), "test": ckpt.fingerprint(*test_data)}
    device_line = f"{describe_device(device)}, {precision_name(device, dtype)}"
    run = Run(run_dir, config, data, device_line, model or LabCNN())
    images = (config.subset or len(train_data[1])) - config.val_size
    run.steps = math.ceil(images / config.batch_size)
    with run.opened():
        log(f"device: {run.device_line}")
        if run.saved:  # said first, so that the saved epochs' lines are not taken for new ones
            done = "run complete" if run.finished else "resuming"
            epochs = f"{run.saved['epoch']} of {config.epochs} epochs"
            log(f"{done}: {epochs} restored from {shown(run.folder)}")
        for record in run.saved["history"] if run.saved else []:
            log(format_epoch(record, config.epochs))
        try:
            hooks = dict(restore=run.restore, progress=run.progress)
            hooks["on_epoch"] = lambda *state: log(run.saved_epoch(*state))
            return fit(config, train_data, test_data, device, dtype, model, **hooks)
        except TrainingDiverged as e:
            where = "of" if " at step " in str(e) else "at"
            raise TrainingDiverged(f"{e} {where} epoch {run.epoch}; {run.kept()}") from None


class Run:
    """One run folder (``None``: a run kept in memory): what it holds, and what each epoch adds.
    Raises CheckpointError when its checkpoint is damaged or of other settings or data."""

    def __init__(self, folder, config, data: dict, device_line: str, model=None):
        self.folder = Path(folder).expanduser() if folder is not None else None
        self.config, self.data, self.device_line = config, data, device_line
        self.model = model or LabCNN()  # to check saved weights (on a copy) before any write
        self.epoch = 0  # the epoch in training
        self.seconds = []  # of this session's epochs, for the time left
        self.steps = None  # per epoch, for the progress bar
        self.saved = None
        if self.folder is not None and (self.folder / ckpt.CHECKPOINT).exists():
            self.saved = self.checked(self.folder / ckpt.CHECKPOINT)
        self.finished = bool(self.saved) and self.saved["epoch"] >= config.epochs

    def checked(self, path: Path) -> dict:
        """The checkpoint at ``path``, refused unless of this run's settings and data."""
        state = ckpt.load_checkpoint(path)
        saved = ckpt.checkpoint_config(path, state)
        changed = [
            f"{k}={v!r} (now {getattr(self.config, k)!r})"
            for k, v in vars(saved).items()
            if v != getattr(self.config, k)
        ]
        if changed:
            raise CheckpointError(
                f"{path} was written with other settings: {', '.join(changed)}. "
                "Resume with the saved settings, or use a new output folder"
            )
        data = state.get("data", self.data)  # version 1 recorded no data
        other = [
            f"{split} images (fingerprint {data[split]}, now {self.data[split]})"
            for split in ("train", "test")
            if data[split] != self.data[split]
        ]
        if other:
            raise CheckpointError(
                f"{path} was trained on other data: the {' and '.join(other)} differ. "
                "Resume with the run's --data-dir or use a new output folder"
            )
        ckpt.load_weights(path, copy.deepcopy(self.model), state["model"])
        return state

    @contextmanager
    def opened(self):
        """The folder, created and locked for training; a finished run is only read."""
        if self.folder is None:
            yield
            return
        if self.finished:  # shown, not trained: no lock, and no write unless out of step
            self.resync()
            yield
            return
        with run_lock(make_dir(self.folder)):
            path = self.folder / ckpt.CHECKPOINT
            if path.exists():  # read again: another process may have trained on meanwhile
                self.saved = self.checked(path)
                self.finished = self.saved["epoch"] >= self.config.epochs
                self.resync()
            yield

    def resync(self) -> None:
        """Rewrite ``history.json`` if it differs from the checkpoint's history, as a kill
        between the two writes leaves it; a finished run on read-only storage is left as is."""
        path = self.folder / ckpt.HISTORY
        history = self.saved["history"]
        if not path.is_file() or read_json(path, "a run's history") != history:
            write_json(path, history)

    def restore(self, trained, state: dict) -> list[dict]:
        """Load the saved run into ``state``'s objects; return its history (``[]``: none)."""
        if self.saved is None:
            return []
        ckpt.load_weights(self.folder / ckpt.CHECKPOINT, state["model"], self.saved["model"])
        for key in ("optimizer", "scheduler", "scaler"):
            if state[key] is not None and self.saved.get(key):  # {}: a disabled scaler
                state[key].load_state_dict(self.saved[key])
        return list(self.saved["history"])

    def progress(self, batches, epoch: int):
        """An epoch's batches, with a progress bar in a terminal (not in CI, logs or pythonw)."""
        self.epoch = epoch
        quiet = sys.stderr is None or not sys.stderr.isatty() or bool(os.environ.get("CI"))
        return tqdm(batches, total=self.steps, desc=f"epoch {epoch}", leave=False, disable=quiet)

    def saved_epoch(self, trained, state: dict) -> str:
        """Check the epoch just trained, write it to the folder; return its line to log."""
        record = trained.history[-1]
        record["device"] = self.device_line
        bad = next(
            (k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)), None
        )
        if bad:
            raise TrainingDiverged(f"the {bad.replace('_', ' ')} became {record[bad]}")
        if self.folder is not None:
            ckpt.save(self.folder / ckpt.CHECKPOINT, trained, self.data, state)
            write_json(self.folder / ckpt.HISTORY, trained.history)
            save_curves(self.folder, trained.history)
        self.seconds.append(record["seconds"])
        left = sum(self.seconds) / len(self.seconds) * (self.config.epochs - record["epoch"])
        return format_epoch(record, self.config.epochs, left)

    def kept(self) -> str:
        """What is kept after a divergence in epoch ``self.epoch``, and what to do."""
        what = "no checkpoint was written"
        if self.folder is not None and self.epoch > 1:
            what = f"{self.folder / ckpt.CHECKPOINT} (epoch {self.epoch - 1}, all figures finite)"
            what += " is kept"
        return f"{what}. Lower the learning rate and train into a new run folder"


def format_epoch(record: dict, epochs: int, seconds_left: float | None = None) -> str:
    """``epoch 7/50  train loss 0.912 acc 68.1%  test loss 0.955 acc 66.8%  19 s`` + time left."""
    val = left = ""
    if "val_loss" in record:
        val = f"  val loss {record['val_loss']:.3f} acc {record['val_acc']:.1%}"
    if seconds_left is not None and record["epoch"] < epochs:
        left = f"  about {format_duration(seconds_left)} left"
    return (
        f"epoch {record['epoch']}/{epochs}  train loss {record['train_loss']:.3f} "
        f"acc {record['train_acc']:.1%}{val}  test loss {record['test_loss']:.3f} "
        f"acc {record['test_acc']:.1%}  {record['seconds']:.0f} s{left}"
    )


def format_duration(seconds: float) -> str:
    """``"2 h 05 min"``, ``"41 min 12 s"`` or ``"37 s"``: the one duration format."""
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds} s"


def shown(path: Path) -> str:
    """``path`` relative to the working folder when inside it or its parent (``../runs/lab`` in
    a notebook), so that a committed log shows no one's home folder; else as it is."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith(os.path.join("..", "..")) else relative
