"""The report notebook where students run it: copied alone into an empty folder, with no data.

It downloads a synthetic CIFAR-10 archive from a local HTTP server (the real download path),
executes under nbval on a 1-epoch run, and its HTML export, written elsewhere, embeds both GIFs.
The repository's notebook and Images/ are left untouched. (``notebooks/`` holds the in-place
nbval run on synthetic data; see ``notebooks/conftest.py``.)
"""
import base64
import hashlib
import shutil
import subprocess
import sys

import pytest
from helpers import ENV, REPO, serve
from synthetic import make_images, write_archive

NOTEBOOK = REPO / "notebooks" / "lab1_cnn_cifar10.ipynb"
# nbval compares stderr unless told not to; warnings and progress bars go there.
STDERR_HOOK = '''
def pytest_collectstart(collector):
    if collector.fspath and collector.fspath.ext == ".ipynb":
        collector.skip_compare += ("stderr",)
'''


def fingerprint() -> dict:
    files = [NOTEBOOK, *sorted((REPO / "Images").iterdir())]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    """The notebook alone in an empty folder, the server's URL, and the environment of a short run."""
    served, work = tmp_path_factory.mktemp("mirror"), tmp_path_factory.mktemp("alone")
    write_archive(served, make_images(30), make_images(10, seed=1))
    shutil.copy(NOTEBOOK, work / NOTEBOOK.name)
    (work / "conftest.py").write_text(STDERR_HOOK)
    with serve(served) as url:
        yield work, {**ENV, "LABCNN_EPOCHS": "1", "LABCNN_SUBSET": "300", "LABCNN_DATA_DIR": "data", "LABCNN_RUNS_DIR": "runs",
                     "LABCNN_CIFAR10_URL": f"{url}/cifar-10-python.tar.gz", "LABCNN_VERIFY": "0", "NO_PROXY": "127.0.0.1"}


def test_notebook_alone_downloads_its_data_and_passes_nbval(alone):
    work, env = alone
    before = fingerprint()
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval", "--nbval-current-env",
               "--rootdir", str(work), NOTEBOOK.name]
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert (work / "data" / "cifar-10-batches-py").is_dir()  # downloaded and extracted where the notebook runs
    assert (work / "runs" / "lab-1ep-300img" / "checkpoint.pt").is_file()
    assert fingerprint() == before  # the committed report and its figures are untouched


def test_html_export_of_the_executed_copy_embeds_both_gifs(alone, tmp_path):
    work, env = alone
    command = [sys.executable, "-m", "jupyter", "nbconvert", "--to", "html", "--execute", str(work / NOTEBOOK.name), "--output-dir", str(tmp_path)]
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    html = (tmp_path / NOTEBOOK.with_suffix(".html").name).read_text()
    for gif in ("convolution.gif", "maxpool.gif"):
        data = base64.b64encode((REPO / "Images" / gif).read_bytes()).decode()
        assert f"data:image/gif;base64,{data}" in html, f"{gif} is not embedded in the HTML export"
