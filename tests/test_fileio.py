"""labcnn.fileio: the one atomic writer, the run-folder lock, and unwritable folders for every write."""
import os
import stat
import subprocess
import sys
import threading

import pytest
import torch
from helpers import ENV, without_root_override

from labcnn.errors import RunFolderBusy, WriteError
from labcnn.fileio import atomic_write, run_lock, write_json


def test_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "state.pt"
    path.write_bytes(b"previous")

    def fail(f):
        f.write(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed writing file\nmore")

    with pytest.raises(WriteError, match=r"cannot write .*state.pt \(\[enforce fail .*writing file\): make its folder writable"):
        atomic_write(path, fail)
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["state.pt"]


def test_written_files_get_the_usual_permissions(tmp_path):
    atomic_write(tmp_path / "a", lambda f: f.write(b"x"))
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o666 & ~mask  # not mkstemp's 0o600


def test_json_is_strict():
    with pytest.raises(ValueError):
        write_json("/nonexistent/never-written.json", [{"loss": float("nan")}])


def test_concurrent_writers_of_one_file_never_share_a_temporary_file(tmp_path):
    path, errors = tmp_path / "checkpoint.pt", []

    def writer(n):
        try:
            for _ in range(20):
                atomic_write(path, lambda f: torch.save({"writer": torch.full((1000,), n)}, f))
        except Exception as e:  # pragma: no cover - the failure being tested for
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and os.listdir(tmp_path) == ["checkpoint.pt"]
    assert torch.load(path)["writer"].unique().numel() == 1  # one writer's whole file


def test_run_lock_refuses_a_second_holder_and_is_released(tmp_path):
    with run_lock(tmp_path):
        with pytest.raises(RunFolderBusy, match=f"{tmp_path} is in use by another training process"):
            with run_lock(tmp_path):
                pass
    with run_lock(tmp_path):  # released at the end of the block
        pass


def start(root, out, epochs="1000"):
    """A training subprocess that runs until killed."""
    command = [sys.executable, "-m", "labcnn", "train", "--data-dir", str(root), "--out", str(out), "--epochs", epochs,
               "--subset", "80", "--batch-size", "8", "--device", "cpu"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def test_second_run_into_a_folder_in_use_is_refused_and_a_killed_run_leaves_no_stuck_lock(tree_data, tmp_path):
    root, _, _ = tree_data
    out = tmp_path / "run"
    first = start(root, out)
    try:
        assert next(line for line in first.stdout if line.startswith("epoch ")).startswith("epoch 1/1000")
        second = start(root, out)
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2
        assert err == f"error: {out} is in use by another training process: wait for it to end, or choose another --out folder\n"
        assert first.poll() is None  # the first run goes on
    finally:
        first.kill()  # SIGKILL: no clean-up code runs; the kernel drops the lock
        first.wait()
    third = start(root, out)  # takes the lock and resumes
    try:
        assert next(line for line in third.stdout if not line.startswith(("data:", "device:", "epoch "))).startswith("resuming: ")
    finally:
        third.kill()
        third.wait()


def run_unprivileged(*args) -> subprocess.CompletedProcess:
    command = without_root_override([sys.executable, "-m", "labcnn", *map(str, args)])
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)


@pytest.mark.parametrize("what", ["new run folder", "run folder", "gifs"])
def test_unwritable_folders_give_one_cannot_write_line(tree_data, tmp_path, what):
    """Every write goes through fileio: the run folder, the checkpoint, history and figures, the GIFs."""
    root, _, _ = tree_data
    locked = tmp_path / "locked"
    locked.mkdir()
    if what == "run folder":
        (locked / "run").mkdir()
    locked.chmod(0o555)
    (locked / "run").exists() and (locked / "run").chmod(0o555)
    args = {
        "new run folder": ["train", "--data-dir", root, "--out", locked / "run", "--epochs", "1", "--subset", "40", "--device", "cpu"],
        "run folder": ["train", "--data-dir", root, "--out", locked / "run", "--epochs", "1", "--subset", "40", "--device", "cpu"],
        "gifs": ["gifs", "--out", locked / "gifs"],
    }[what]
    try:
        result = run_unprivileged(*args)
    finally:
        for p in (locked / "run", locked):
            p.exists() and p.chmod(0o755)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot write {locked}") and "(Permission denied)" in lines[0]
    assert "Traceback" not in result.stderr
