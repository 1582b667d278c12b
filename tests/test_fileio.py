"""labcnn.fileio: the one atomic writer, staged folders, the run-folder lock, and what each does
on file systems without permissions or locks (FAT, SMB, NFS without lockd)."""

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import threading

import pytest
import torch
from helpers import ENV, LABCNN, QUICK, options, train_args, without_root_override

from labcnn import RunFolderBusy, WriteError
from labcnn import fileio as F
from labcnn.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
TRAIN = [*options(**{**QUICK, "epochs": 1}), "--device", "cpu"]


@pytest.fixture(autouse=True)
def omp_threads(monkeypatch):
    """The command line keeps the one thread the tests train with."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def raising(error: BaseException):
    """A ``write`` that writes half, then raises ``error``."""

    def write(f):
        f.write(b"half")
        raise error

    return write


def test_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "state.pt"
    path.write_bytes(b"previous")

    def fail(f):
        f.write(b"half")
        raise RuntimeError(
            "[enforce fail at inline_container.cc] PytorchStreamWriter failed writing file\nmore"
        )

    with pytest.raises(
        WriteError,
        match=r"cannot write .*state.pt \(\[enforce fail .*writing "
        r"file\): make its folder writable",
    ):
        F.atomic_write(path, fail)
    with pytest.raises(WriteError, match=r"state.pt \(No space left on device\)") as info:
        F.atomic_write(path, raising(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    assert info.value.path == path and info.value.reason == "No space left on device"
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C mid-write: also nothing half-written
        F.atomic_write(path, raising(KeyboardInterrupt()))
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["state.pt"]


def test_a_missing_folder_is_one_cannot_write(tmp_path):
    with pytest.raises(WriteError, match=f"cannot write {tmp_path}/no/x.json \\(No such file"):
        F.write_json(tmp_path / "no" / "x.json", [])
    (tmp_path / "file").write_text("")
    with pytest.raises(WriteError, match=f"cannot write {tmp_path}/file/sub"):
        F.make_dir(tmp_path / "file" / "sub")
    assert F.make_dir(tmp_path / "a" / "b").is_dir()


def test_written_files_get_the_usual_permissions(tmp_path):
    F.atomic_write(tmp_path / "a", lambda f: f.write(b"x"))
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o666 & ~mask  # not mkstemp's 0o600


def refuse_chmod(monkeypatch) -> list:
    """``os.chmod`` as on FAT, exFAT or SMB: ``EPERM`` for every file (recorded)."""
    calls = []

    def chmod(path, mode, *args, **kwargs):
        calls.append(path)
        raise PermissionError(errno.EPERM, "Operation not permitted", str(path))

    monkeypatch.setattr(os, "chmod", chmod)
    return calls


def test_a_refused_chmod_never_loses_the_file(tmp_path, monkeypatch):
    calls = refuse_chmod(monkeypatch)
    F.atomic_write(tmp_path / "a.bin", lambda f: f.write(b"x"))
    F.write_json(tmp_path / "a.json", {"x": 1})
    assert calls and (tmp_path / "a.bin").read_bytes() == b"x"
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "a.json"]


def test_on_a_disk_without_permissions_every_file_is_written(
    tree_data, tmp_path, monkeypatch, capsys
):
    """Checkpoint, history, figures, the decode cache and the GIFs, with chmod refused (EPERM)."""
    root, _, _ = tree_data
    data = tmp_path / "data"
    for split in ("train", "test"):  # a fresh tree, so that its decode cache is written here
        shutil.copytree(root / split, data / split)
    monkeypatch.setattr("labcnn.animations.gif_bytes", lambda name: b"GIF89a")  # not the drawing
    calls = refuse_chmod(monkeypatch)
    assert main(["train", "--data-dir", str(data), "--out", str(tmp_path / "run"), *TRAIN]) == 0
    assert main(["gifs", "--out", str(tmp_path / "gifs"), "--notebook", "none.ipynb"]) == 0
    assert calls and capsys.readouterr().err == ""  # not even a warning
    written = set(os.listdir(tmp_path / "run"))
    assert {"checkpoint.pt", "history.json", "loss.png", "accuracy.png"} <= written
    assert sorted(os.listdir(tmp_path / "gifs")) == ["convolution.gif", "maxpool.gif"]
    cache = set(os.listdir(data)) - {"train", "test"}
    assert cache and not [name for name in cache if name.endswith(".tmp")]


def test_json_is_strict(tmp_path):
    with pytest.raises(ValueError):
        F.write_json(tmp_path / "h.json", [{"loss": float("nan")}])
    assert os.listdir(tmp_path) == []


def test_concurrent_writers_of_one_file_never_share_a_temporary_file(tmp_path):
    path, errors = tmp_path / "checkpoint.pt", []

    def writer(n):
        try:
            for _ in range(20):
                F.atomic_write(path, lambda f: torch.save({"writer": torch.full((1000,), n)}, f))
        except Exception as e:  # pragma: no cover - the failure being tested for
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and os.listdir(tmp_path) == ["checkpoint.pt"]
    assert torch.load(path)["writer"].unique().numel() == 1  # one writer's whole file


def test_a_staged_folder_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "batches"
    with pytest.raises(RuntimeError), F.staged_dir(target) as scratch:
        (scratch / "half").write_bytes(b"x")
        raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []
    with F.staged_dir(target) as scratch:
        assert scratch.parent == tmp_path and scratch.name.startswith(".")
        assert not any(scratch.iterdir())
        (scratch / "whole").write_bytes(b"x")
    assert os.listdir(tmp_path) == ["batches"] and os.listdir(target) == ["whole"]
    with F.staged_dir(target) as scratch:  # another process put it in place first: kept
        (scratch / "other").write_bytes(b"y")
    assert os.listdir(tmp_path) == ["batches"] and os.listdir(target) == ["whole"]
    missing = pytest.raises(WriteError, match=f"cannot write {tmp_path}/missing")
    with missing, F.staged_dir(tmp_path / "missing" / "x"):
        pass


def test_run_lock_refuses_a_second_holder_and_is_released(tmp_path):
    busy = pytest.raises(RunFolderBusy, match=f"{tmp_path} is in use by another training")
    with F.run_lock(tmp_path), busy, F.run_lock(tmp_path):
        pass
    with F.run_lock(tmp_path):  # released at the end of the block
        pass


def no_locks(monkeypatch, code: int) -> None:
    """``flock`` as on NFS without lockd, or Lustre/GPFS mounted without flock."""

    def flock(handle, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(F.fcntl, "flock", flock)


@pytest.mark.skipif(F.fcntl is None, reason="no fcntl (Windows)")
@pytest.mark.parametrize("code", [errno.ENOLCK, errno.ENOSYS, errno.EBADF])
def test_a_file_system_without_locks_warns_once_and_goes_on(tmp_path, monkeypatch, code):
    no_locks(monkeypatch, code)
    with pytest.warns(UserWarning) as caught:
        for _ in range(2):
            with F.run_lock(tmp_path):
                ran = True
    assert ran and len(caught) == 1
    assert str(caught[0].message) == (
        f"cannot lock {tmp_path} ({os.strerror(code)}; this file "
        "system has no locks): make sure no other run trains into it"
    )


@pytest.mark.skipif(F.fcntl is None, reason="no fcntl (Windows)")
def test_training_on_nfs_without_lockd_goes_on_with_one_warning(
    tree_data, tmp_path, monkeypatch, capsys
):
    root, _, _ = tree_data
    no_locks(monkeypatch, errno.ENOLCK)
    out = tmp_path / "run"
    assert (
        main(["train", "--data-dir", str(root), "--out", str(out), "--subset", "60", *TRAIN]) == 0
    )
    captured = capsys.readouterr()
    assert captured.err == (
        f"warning: cannot lock {out} (No locks available; this file system "
        "has no locks): make sure no other run trains into it\n"
    )
    assert "epoch 1/1" in captured.out and (out / "checkpoint.pt").is_file()


@pytest.mark.skipif(F.fcntl is None, reason="no fcntl (Windows)")
def test_other_lock_failures_are_not_hidden(tmp_path, monkeypatch):
    no_locks(monkeypatch, errno.EIO)
    refused = pytest.raises(WriteError, match=f"cannot write {tmp_path}/.lock \\(Input/output")
    with refused, F.run_lock(tmp_path):
        pass


def test_warn_once(recwarn):
    F.warn_once("test_fileio: once")
    F.warn_once("test_fileio: once")
    F.warn_once("test_fileio: twice")
    assert [str(w.message) for w in recwarn] == ["test_fileio: once", "test_fileio: twice"]


def test_reason():
    assert F.reason(PermissionError(errno.EACCES, "Permission denied", "/x")) == "Permission denied"
    assert F.reason(RuntimeError("first line\nsecond")) == "first line"
    assert F.reason(RuntimeError()) == "RuntimeError"


BUSY = ("--subset", 80, "--batch-size", 8)  # 1000 epochs: a run that lasts until killed


def start(root, out):
    """A training subprocess that runs until killed."""
    command = [*LABCNN, *train_args(root, out, 1000, *BUSY)]
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
    )


def test_a_second_run_into_a_folder_in_use_is_refused_and_a_killed_run_leaves_no_stuck_lock(
    tree_data, tmp_path, capsys
):
    root, _, _ = tree_data
    out = tmp_path / "run"
    first = start(root, out)
    watchdog = threading.Timer(120, first.kill)  # never hang the suite on a stuck child
    watchdog.start()
    try:
        line = next((line for line in first.stdout if line.startswith("device: ")), None)
        assert line is not None, first.stderr.read()  # it holds the lock when it says so
        args = train_args(root, out, 1000, *BUSY)
        assert main(args) == 2
        assert capsys.readouterr().err == (
            f"error: {out} is in use by another training process: "
            "wait for it to end, or choose another --out folder\n"
        )
        assert first.poll() is None  # the first run goes on
    finally:
        watchdog.cancel()
        first.kill()  # SIGKILL: no clean-up code runs; the kernel drops the lock
        first.wait()
        first.stdout.close()
        first.stderr.close()
    with F.run_lock(out):  # free again
        pass


def test_unwritable_folders_give_one_cannot_write_line(tree_data, tmp_path):
    """Permission bits as a user meets them (as root, under setpriv): a new run folder, an
    existing run folder, the GIFs. One subprocess runs the three commands."""
    root, _, _ = tree_data
    locked = tmp_path / "locked"
    (locked / "run").mkdir(parents=True)
    train = ["train", "--data-dir", str(root), "--subset", "40", *TRAIN, "--out"]
    cases = {"new": train, "run": train, "gifs": ["gifs", "--notebook", "none", "--out"]}
    script = (
        "import sys, json; from labcnn.cli import main\n"
        "for argv in json.loads(sys.argv[1]):\n"
        "    print('=== status', main(argv), file=sys.stderr, flush=True)\n"
    )
    argvs = [[*argv, str(locked / name)] for name, argv in cases.items()]
    command = without_root_override([sys.executable, "-c", script, json.dumps(argvs)])
    for folder in (locked / "run", locked):
        folder.chmod(0o555)
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    finally:
        for folder in (locked / "run", locked):
            folder.chmod(0o755)
    assert "Traceback" not in result.stderr and result.returncode == 0, result.stderr
    blocks, lines = [], []
    for line in result.stderr.splitlines():
        if line.startswith("=== status "):
            blocks.append((line.split()[-1], lines))
            lines = []
        else:
            lines.append(line)
    assert [status for status, _ in blocks] == ["2", "2", "2"], result.stderr
    for name, (_, lines) in zip(cases, blocks, strict=False):
        errors = [line for line in lines if not line.startswith("warning: ")]
        assert len(errors) == 1 and errors[0].startswith(f"error: cannot write {locked / name}")
        assert "(Permission denied)" in errors[0]
    assert blocks[1][1][0].startswith(f"warning: cannot lock {locked / 'run'} (Permission denied)")


# --- file systems that refuse an operation, names at the limit (issue 26) -----------------------


def refusing(error: OSError):
    """An ``os.fsync`` that raises ``error``, as a file system without fsync answers."""

    def fsync(fd):
        raise error

    return fsync


def test_any_name_the_file_system_accepts_is_written_atomically(tmp_path):
    """npm/write-file-atomic#63: a temporary name longer than the target's fails near 255 bytes."""
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    for length in (limit - 12, limit):
        path = tmp_path / ("x" * (length - 5) + ".json")
        F.write_json(path, {"length": length})
        assert json.loads(path.read_text(encoding="utf-8")) == {"length": length}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("code", [errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS])
def test_a_file_system_without_fsync_warns_once_and_writes(tmp_path, monkeypatch, code):
    """Some CIFS, vboxsf and FUSE mounts refuse fsync (borgbackup/borg#1287)."""
    F.warn_once.cache_clear()
    monkeypatch.setattr(os, "fsync", refusing(OSError(code, os.strerror(code))))
    with pytest.warns(UserWarning, match=f"cannot fsync in {tmp_path}") as caught:
        for i in range(3):
            F.write_json(tmp_path / f"{i}.json", [i])
    assert len(caught) == 1 and json.loads((tmp_path / "2.json").read_text(encoding="utf-8")) == [2]


def test_an_fsync_that_fails_otherwise_keeps_the_previous_file(tmp_path, monkeypatch):
    F.write_json(tmp_path / "a.json", ["old"])
    monkeypatch.setattr(os, "fsync", refusing(OSError(errno.EIO, "Input/output error")))
    with pytest.raises(WriteError, match="Input/output error"):
        F.write_json(tmp_path / "a.json", ["new"])
    assert json.loads((tmp_path / "a.json").read_text(encoding="utf-8")) == ["old"]
    assert os.listdir(tmp_path) == ["a.json"]


def test_a_finished_run_on_read_only_storage_is_shown_without_a_write(tree_data, tmp_path):
    """A course share or a mounted results folder: replaying a finished run writes nothing."""
    root, _, _ = tree_data
    out = tmp_path / "run"
    args = ["train", "--data-dir", str(root), "--out", str(out), *TRAIN, "--subset", "100"]
    assert main(args) == 0  # trained here; replayed below by a process that cannot write
    command = [sys.executable, "-m", "labcnn", *args]
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    for p in [out, *out.iterdir()]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        replay = subprocess.run(
            without_root_override(command), env=ENV, capture_output=True, text=True
        )
    finally:
        for p in [out, *out.iterdir()]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)
    assert replay.returncode == 0 and replay.stderr == "", replay.stderr
    assert "run complete: 1 of 1 epochs restored" in replay.stdout
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before
