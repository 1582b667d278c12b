"""Helpers for the report notebook: its settings from environment variables, and run facts.

The notebook reads its run length and data location from the environment, so CI can execute it
on a short synthetic run while the committed outputs come from the full lab recipe:

=====================  ============================================  ===================
variable               meaning                                       default
=====================  ============================================  ===================
``LABCNN_EPOCHS``      epochs of the lab recipe                      50
``LABCNN_SUBSET``      training images used (the test set is whole)  all 50,000
``LABCNN_DATA_DIR``    folder holding CIFAR-10 (any layout)          ``../data``
``LABCNN_RUNS_DIR``    where run folders (checkpoints) go            ``../runs``
``LABCNN_IMAGES_DIR``  where figures are saved                       ``../Images``
=====================  ============================================  ===================
"""
from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision

from labcnn.config import TrainConfig, make_config
from labcnn.device import describe_device, select_device


ORIGINAL_ACCURACY = 0.6926  # the original lab report's claimed test accuracy (see the notebook's section 7)


@dataclass(frozen=True)
class Settings:
    """The notebook's run: its config, data folder, run folder and figure folder."""

    config: TrainConfig
    data_dir: Path
    run_dir: Path
    images_dir: Path


def settings_from_env(env=os.environ) -> Settings:
    """Read the ``LABCNN_*`` variables (see the module docstring) into :class:`Settings`.

    The full lab recipe runs in ``RUNS_DIR/lab``, the folder ``python -m labcnn train --out
    runs/lab`` writes, so the notebook resumes or replays that run; shortened runs get their own.
    """
    epochs = int(env.get("LABCNN_EPOCHS", 50))
    subset = int(env["LABCNN_SUBSET"]) if env.get("LABCNN_SUBSET") else None
    config = make_config(epochs=epochs, subset=subset)
    name = "lab" if config == make_config() else f"lab-{epochs}ep-{subset or 'all'}img"
    return Settings(
        config=config,
        data_dir=Path(env.get("LABCNN_DATA_DIR", "../data")),
        run_dir=Path(env.get("LABCNN_RUNS_DIR", "../runs")) / name,
        images_dir=Path(env.get("LABCNN_IMAGES_DIR", "../Images")),
    )


def cpu_name() -> str:
    """The processor's model name from ``/proc/cpuinfo`` (Linux), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> str:
    """One line on the machine and libraries: device, CPU, threads, torch and torchvision versions."""
    device = select_device()
    return (
        f"device {describe_device(device)}; CPU {cpu_name()} ({os.cpu_count()} logical cores); "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, Python {platform.python_version()}"
    )


def training_time(history: list[dict]) -> str:
    """Total wall time of a run's epochs (training and evaluation), as ``"41 min 12 s"``."""
    seconds = round(sum(r["seconds"] for r in history))
    return f"{seconds // 60} min {seconds % 60} s"


def best_epoch(history: list[dict], key: str = "test_acc") -> dict:
    """The epoch record with the highest ``key``."""
    return max(history, key=lambda r: r[key])


def headline(history: list[dict]) -> dict[str, str]:
    """A run's figures as the README and the notebook print them (percent with two decimals).

    Keys: ``final_acc``, ``final_loss``, ``best_epoch``, ``best_acc`` (best test accuracy),
    ``wall_time``; with a validation split ``best_val_epoch``, ``best_val_acc``; and once the
    test accuracy reached the original report's 69.26%, ``original_epoch`` and
    ``original_seconds`` (training seconds until then).
    """
    last, best = history[-1], best_epoch(history)
    figures = {
        "final_acc": f"{last['test_acc']:.2%}",
        "final_loss": f"{last['test_loss']:.4f}",
        "best_epoch": str(best["epoch"]),
        "best_acc": f"{best['test_acc']:.2%}",
        "wall_time": training_time(history),
    }
    if "val_acc" in last:
        best_val = best_epoch(history, "val_acc")
        figures.update(best_val_epoch=str(best_val["epoch"]), best_val_acc=f"{best_val['val_acc']:.2%}")
    reached = first_reaching(history, ORIGINAL_ACCURACY)
    if reached is not None:
        figures.update(original_epoch=str(reached["epoch"]), original_seconds=f"{reached['elapsed_train_seconds']:.0f} s")
    return figures


def first_reaching(history: list[dict], accuracy: float) -> dict | None:
    """The first epoch record whose test accuracy is at least ``accuracy`` (a fraction), or ``None``."""
    return next((r for r in history if r["test_acc"] >= accuracy), None)
