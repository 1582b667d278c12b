"""What the data code writes: read-only data folders, two processes preparing one folder, downloads.

Read-only folders are tested in a child process: as root (as in CI), permission bits stop
nothing, so the child runs without root's override (util-linux ``setpriv``).
"""
import hashlib
import json
import re
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import ENV, serve, without_root_override
from synthetic import load, make_dataset
from torchvision.datasets import CIFAR10

from labcnn import cifar_download
from labcnn.errors import DataError

ENV = {**ENV, "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}  # the local test server, never a proxy

# A child process: waits for the file GO (if given), loads the training split TIMES times,
# printing one JSON line each time.
# HOLD seconds of sleep inside the staging folder (extraction, download) and before the cache
# write, so that two children started together are inside them at the same time.
CHILD = r"""
import hashlib, json, sys, time, warnings
from pathlib import Path
import torch
import labcnn.cifar_download as download
import labcnn.cifar_files as files
from labcnn.data import load_cifar10
from labcnn.errors import LabcnnError

root, url, go, hold, times = sys.argv[1], sys.argv[2] or None, sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
if hold:
    unpack, save = files.unpack, torch.save
    files.unpack = download.unpack = lambda *a, **k: (unpack(*a, **k), time.sleep(hold))[0]
    torch.save = lambda *a, **k: (time.sleep(hold), save(*a, **k))[1]
print("ready", flush=True)
while go and not Path(go).exists():
    time.sleep(0.01)
for _ in range(times):
    result = {"start": time.time()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            images, labels = load_cifar10(root, download=bool(url), verify=False, url=url)
            result["sha"] = hashlib.sha256(images.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()
        except LabcnnError as e:
            result["error"] = f"{type(e).__name__}: {e}"
    result["end"] = time.time()
    result["warnings"] = [str(w.message) for w in caught if "verify=False" not in str(w.message)]
    print(json.dumps(result), flush=True)
"""


def sha(data):
    images, labels = data
    return hashlib.sha256(images.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()


def start_child(root, url="", go="", hold=0.0, times=1, unprivileged=False) -> subprocess.Popen:
    command = [sys.executable, "-c", CHILD, str(root), url, str(go), str(hold), str(times)]
    command = without_root_override(command) if unprivileged else command
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def finish(child: subprocess.Popen) -> list[dict]:
    """The child's results, one per load."""
    out, err = child.communicate(timeout=300)
    assert child.returncode == 0, err
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def run_child(root, **kwargs) -> dict:
    """The result of the child's last load."""
    return finish(start_child(root, **kwargs))[-1]


@contextmanager
def read_only(folder: Path):
    """``chmod -R a-w folder`` for the block (as Kaggle's /kaggle/input)."""
    paths = [folder, *folder.rglob("*")]
    for p in paths:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        yield folder
    finally:
        for p in paths:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------- read-only data folders


def test_read_only_image_tree_loads_with_a_warning_every_time(tmp_path):
    root = tmp_path / "input"
    train, _ = make_dataset(root, "tree", train_per_class=2, test_per_class=1)
    with read_only(root):
        for result in finish(start_child(root, times=2, unprivileged=True)):  # no cache: decoded twice
            assert result.get("sha") == sha(train), result
            [warning] = result["warnings"]
            assert re.fullmatch(rf"could not write the decode cache {root}/\.labcnn-train-\w+\.pt \(Permission denied\); "
                                "the next load decodes again", warning), warning
            assert entries(root) == ["test", "train"]


def test_read_only_archive_says_how_to_extract_it_elsewhere(tmp_path):
    root = tmp_path / "input"
    train, _ = make_dataset(root, "archive", train_per_class=2, test_per_class=1)
    archive = root / "cifar-10-python.tar.gz"
    with read_only(root):
        result = run_child(root, unprivileged=True)
        assert result.get("error") == (
            f"WriteError: cannot write {root} (Permission denied): extract the archive elsewhere (tar -xzf {archive} -C DIR) "
            f"and pass that DIR (command line: --data-dir DIR), or point --data-dir at a writable copy of {root}")
        assert entries(root) == ["cifar-10-python.tar.gz"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if shutil.which("tar"):  # the advice, as given
        subprocess.run(["tar", "-xzf", str(archive), "-C", str(elsewhere)], check=True)
    else:
        with tarfile.open(archive) as tar:
            tar.extractall(elsewhere, filter="data")
    assert sha(load(elsewhere)) == sha(train)


@pytest.mark.parametrize("existing", [True, False], ids=["root exists", "root to create"])
def test_download_into_an_unwritable_folder_says_cannot_write(tmp_path, existing):
    make_dataset(tmp_path / "mirror", "archive", train_per_class=1, test_per_class=1)
    parent = tmp_path / "input"
    parent.mkdir()
    root = parent if existing else parent / "data"
    with serve(tmp_path / "mirror") as url, read_only(parent):
        result = run_child(root, url=f"{url}/cifar-10-python.tar.gz", unprivileged=True)
    assert result.get("error") == (
        f"WriteError: cannot write {root} (Permission denied): download into a writable folder instead: "
        "pass it as root (command line: --data-dir DIR)")
    assert entries(parent) == []


# ---------------------------------------------------------------- two processes at once


@pytest.mark.parametrize("task", ["extract the archive", "write the decode cache", "download"])
def test_two_processes_preparing_one_folder_both_succeed(tmp_path, task):
    root = tmp_path / "data"
    mirror = tmp_path / "mirror"
    if task == "download":
        train, _ = make_dataset(mirror, "archive", train_per_class=2, test_per_class=1)
    else:
        train, _ = make_dataset(root, "archive" if task == "extract the archive" else "tree", train_per_class=2, test_per_class=1)
        mirror.mkdir()
    go = tmp_path / "go"
    with serve(mirror) as url:
        url = f"{url}/cifar-10-python.tar.gz" if task == "download" else ""
        children = [start_child(root, url=url, go=go, hold=1.0) for _ in range(2)]
        for child in children:
            assert child.stdout.readline() == "ready\n"
        go.touch()  # both start loading now
        results = [finish(child)[0] for child in children]
    assert [r.get("sha") for r in results] == [sha(train)] * 2, results
    assert max(r["start"] for r in results) < min(r["end"] for r in results)  # they overlapped
    expected = {
        "extract the archive": ["cifar-10-batches-py", "cifar-10-python.tar.gz"],
        "write the decode cache": [".labcnn-train-", "test", "train"],
        "download": ["cifar-10-batches-py"],
    }[task]
    assert [re.sub(r"(\.labcnn-train-).*", r"\1", name) for name in entries(root)] == expected  # no temp files left
    assert sha(load(root)) == sha(train)  # what they left loads


# ---------------------------------------------------------------- downloads


def test_download_from_a_mirror(tmp_path):
    train, _ = make_dataset(tmp_path / "mirror", "archive", train_per_class=2, test_per_class=1)
    (tmp_path / "mirror" / "cifar-10-python.tar.gz").rename(tmp_path / "mirror" / "course-copy.tgz")
    root = tmp_path / "data"
    with serve(tmp_path / "mirror") as url:
        data = load(root, download=True, url=f"{url}/course-copy.tgz")  # verify=False: not the official MD5
    assert sha(data) == sha(train)
    assert entries(root) == ["cifar-10-batches-py"]
    unreachable = f"http://127.0.0.1:{closed_port()}/gone.tgz"
    assert sha(load(root, download=True, url=unreachable)) == sha(train)  # found locally: no download


def test_download_with_the_wrong_md5_is_refused_and_leaves_nothing(tmp_path):
    make_dataset(tmp_path / "mirror", "archive", train_per_class=1, test_per_class=1)
    root = tmp_path / "data"
    with serve(tmp_path / "mirror") as url, pytest.raises(DataError) as info:
        load(root, download=True, verify=True, url=f"{url}/cifar-10-python.tar.gz")
    assert str(info.value) == (
        f"the file downloaded from {url}/cifar-10-python.tar.gz does not match the official CIFAR-10 archive "
        f"(MD5 {CIFAR10.tgz_md5} expected, per torchvision.datasets.CIFAR10); nothing was kept. Download again, "
        "or, for a mirror's re-packed archive, pass verify=False (command line: --no-verify).")
    assert entries(root) == []


def test_damaged_download_is_named_by_its_url_and_leaves_nothing(tmp_path):
    make_dataset(tmp_path / "mirror", "archive", train_per_class=1, test_per_class=1)
    archive = tmp_path / "mirror" / "cifar-10-python.tar.gz"
    archive.write_bytes(archive.read_bytes()[:1000])
    root = tmp_path / "data"
    with serve(tmp_path / "mirror") as url, pytest.raises(DataError) as info:
        load(root, download=True, url=f"{url}/cifar-10-python.tar.gz")
    assert str(info.value).startswith(f"could not extract the archive downloaded from {url}/cifar-10-python.tar.gz (")
    assert entries(root) == []


@pytest.mark.parametrize("where", ["closed port", "missing file"])
def test_unreachable_download_is_one_clear_line(tmp_path, where):
    root = tmp_path / "data"
    with serve(tmp_path) as live:
        url = f"http://127.0.0.1:{closed_port()}/c.tgz" if where == "closed port" else f"{live}/no-such.tgz"
        with pytest.raises(DataError) as info:
            load(root, download=True, url=url)
    error = r"URLError: <urlopen error \[Errno \d+\] Connection refused>" if where == "closed port" else "HTTPError: HTTP Error 404: File not found"
    assert re.fullmatch(
        re.escape(f"could not download CIFAR-10 from {url} into {root} (") + error + re.escape(
            f"). Without internet, copy cifar-10-python.tar.gz, cifar-10-batches-py/ or an image tree train/<class>/, "
            f"test/<class>/ into {root}."), str(info.value)), str(info.value)
    assert entries(root) == []


def test_download_defaults_to_torchvisions_url(tmp_path, monkeypatch):
    asked = []

    def offline(url, *args, **kwargs):
        asked.append(url)
        raise OSError("network is unreachable")

    monkeypatch.setattr(cifar_download, "download_url", offline)
    with pytest.raises(DataError, match=f"could not download CIFAR-10 from {re.escape(CIFAR10.url)} into {tmp_path} "):
        load(tmp_path, download=True)
    assert asked == [CIFAR10.url] and entries(tmp_path) == []
