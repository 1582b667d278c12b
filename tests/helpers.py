"""Helpers shared by the test modules: one home for each."""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

from labcnn.data import load_cifar10
from labcnn.train import TIME_FIELDS

REPO = Path(__file__).resolve().parents[1]
# Subprocesses: the checkout's package, one thread (tiny models train faster), no progress bars.
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CI": "1"}
QUICK = dict(epochs=2, batch_size=32, lr=0.001)  # a short, stable run on the synthetic data


def quiet(line: str) -> None:
    """A ``log`` that drops the lines."""


def without_times(history: list[dict]) -> list[dict]:
    """``history`` without the wall-clock fields, the only ones that differ between equal runs."""
    return [{k: v for k, v in r.items() if k not in TIME_FIELDS} for r in history]


def load(root, train=True, verify=False):
    """``load_cifar10`` with the ``verify=False`` warning silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_cifar10(root, train=train, verify=verify)


def run_cli(*args, env=None, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    """``python -m labcnn ARGS`` in a subprocess, with text output captured."""
    return subprocess.run([sys.executable, "-m", "labcnn", *map(str, args)], capture_output=True, text=True,
                          env={**ENV, **(env or {})}, cwd=cwd, timeout=timeout)
