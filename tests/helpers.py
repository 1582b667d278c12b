"""Helpers shared by the test modules: one home for each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
# Subprocesses: the checkout's package, one thread (tiny models train faster), no progress bars.
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CI": "1"}
TIME_FIELDS = ("seconds", "elapsed_train_seconds", "device")  # what differs between two runs
QUICK = dict(epochs=2, batch_size=32, lr=0.001)  # a short, stable run on the synthetic data


LABCNN = [sys.executable, "-m", "labcnn"]  # the command line, in a subprocess


def options(**settings) -> list[str]:
    """Command-line options for TrainConfig ``settings``: ``batch_size=8`` -> ``--batch-size 8``."""
    return [a for k, v in settings.items() for a in (f"--{k.replace('_', '-')}", str(v))]


def train_args(root, out, epochs, *options) -> list[str]:
    """``train`` with data from ``root`` into ``out`` on the CPU, and ``options``."""
    args = ["train", "--data-dir", str(root), "--out", str(out), "--epochs", str(epochs)]
    return [*args, "--device", "cpu", *map(str, options)]


def quiet(line: str) -> None:
    """A ``log`` that drops the lines."""


def without_times(history: list[dict]) -> list[dict]:
    """``history`` without the wall-clock fields, the only ones that differ between equal runs."""
    return [{k: v for k, v in r.items() if k not in TIME_FIELDS} for r in history]


def run_cli(*args, env=None, cwd=None, timeout=300) -> subprocess.CompletedProcess:
    """``python -m labcnn ARGS`` in a subprocess, with text output captured."""
    return subprocess.run(
        [sys.executable, "-m", "labcnn", *map(str, args)],
        capture_output=True,
        text=True,
        env={**ENV, **(env or {})},
        cwd=cwd,
        timeout=timeout,
    )


def without_root_override(command: list[str]) -> list[str]:
    """``command``, run so that permission bits apply: as is for a normal user; for root (as in
    CI), under util-linux ``setpriv`` with CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH dropped.
    Skips the test where that is not possible."""
    import shutil

    import pytest

    if os.geteuid() != 0:
        return command
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip(
            "running as root, which ignores permission bits, and util-linux setpriv "
            "(to drop that) is missing"
        )
    drop = [
        setpriv,
        "--inh-caps=-dac_override,-dac_read_search",
        "--bounding-set=-dac_override,-dac_read_search",
    ]
    probe = subprocess.run([*drop, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"setpriv cannot drop root's permission override here: {probe.stderr.strip()}")
    return [*drop, *command]


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextmanager
def serve(folder: Path):
    """An HTTP server for ``folder`` on 127.0.0.1 (a free port), in a thread; yields its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def report_code() -> SimpleNamespace:
    """What the report notebook's cells tagged ``readings`` define (``readings``, ``spread``,
    ``ORIGINAL``, ...), run as the notebook runs them: its readings' one home."""
    notebook = json.loads((REPO / "notebooks" / "lab1_cnn_cifar10.ipynb").read_text("utf-8"))
    namespace = {}
    for cell in notebook["cells"]:
        if "readings" in cell["metadata"].get("tags", []):
            exec("".join(cell["source"]), namespace)
    return SimpleNamespace(**namespace)
