"""The report notebook where students open it: copied alone, with labcnn installed as a regular
package (not from a checkout), run by papermill with its ``parameters`` (1 epoch, 300 images) and
its data downloaded from a mirror on 127.0.0.1; once with a clone of the repository beside it and
once without. (``notebooks/conftest.py`` runs the committed notebook in place under nbval.)
"""
import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys

import pytest
from helpers import ENV, REPO, serve
from synthetic import make_images, write_archive

NOTEBOOK = REPO / "notebooks" / "lab1_cnn_cifar10.ipynb"
NOT_FOUND = "the committed runs are in the repository's results/ folder"


def fingerprint() -> dict:
    files = [NOTEBOOK, *sorted((REPO / "Images").iterdir())]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Both copies executed at once (two processes for two cores): ``{case: (folder, notebook)}``."""
    served, site = tmp_path_factory.mktemp("mirror"), tmp_path_factory.mktemp("site")
    write_archive(served, make_images(30), make_images(10, seed=1))
    shutil.copytree(REPO / "labcnn", site / "labcnn")  # imported from here: no checkout around it
    before, runs = fingerprint(), {}
    with serve(served) as url:
        clean = {k: v for k, v in ENV.items() if not k.startswith("LABCNN_")}  # notebooks/conftest.py
        env = {**clean, "PYTHONPATH": str(site), "LABCNN_CIFAR10_URL": f"{url}/cifar-10-python.tar.gz",
               "LABCNN_VERIFY": "0", "NO_PROXY": "127.0.0.1"}
        for case in ("clone", "alone"):
            work = tmp_path_factory.mktemp(case)
            shutil.copy(NOTEBOOK, work / NOTEBOOK.name)
            if case == "clone":  # what `git clone ... labcnn` leaves beside the notebook
                (work / "labcnn").mkdir()
                shutil.copy(REPO / "pyproject.toml", work / "labcnn")
                shutil.copytree(REPO / "results", work / "labcnn" / "results")
            command = [sys.executable, "-m", "papermill", NOTEBOOK.name, "out.ipynb", "-p", "EPOCHS", "1",
                       "-p", "SUBSET", "300", "--cwd", str(work)]
            runs[case] = (work, subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE,
                                                 stderr=subprocess.STDOUT, text=True))
        for case, (work, proc) in runs.items():
            output = proc.communicate(timeout=600)[0]
            assert proc.returncode == 0, f"{case}: {output[-3000:]}"
    assert fingerprint() == before  # the committed report and its figures are untouched
    return {case: (work, json.loads((work / "out.ipynb").read_text())) for case, (work, _) in runs.items()}


def outputs(notebook: dict, kind: str = "text") -> list:
    found = []
    for cell in notebook["cells"]:
        for out in cell.get("outputs", []):
            if kind == "text" and out.get("name") == "stdout":
                found.append("".join(out["text"]))
            elif kind == "stderr" and out.get("name") == "stderr":
                found.append("".join(out["text"]))
            elif kind in out.get("data", {}):
                found.append(out["data"][kind])
    return found


@pytest.mark.parametrize("case", ["clone", "alone"])
def test_runs_to_the_end_and_writes_nothing_to_stderr(executed, case):
    work, notebook = executed[case]
    assert outputs(notebook, "stderr") == []
    assert not [o for c in notebook["cells"] for o in c.get("outputs", []) if o["output_type"] == "error"]
    text = "".join(outputs(notebook))
    assert re.search(r"final test accuracy \d+\.\d\d%", text)
    assert "history sha256" in text  # the provenance cell, the last code cell, ran
    assert (work / "data" / "cifar-10-batches-py").is_dir()  # downloaded where the notebook runs
    assert (work / "runs" / "lab-1ep-300img" / "checkpoint.pt").is_file()
    injected = [c for c in notebook["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert injected and "EPOCHS = 1" in "".join(injected[0]["source"])


def test_gifs_are_image_gif_outputs_equal_to_the_committed_files(executed):
    gifs = [base64.b64decode("".join(g)) for g in outputs(executed["alone"][1], "image/gif")]
    assert gifs == [(REPO / "Images" / name).read_bytes() for name in ("convolution.gif", "maxpool.gif")]


def test_beside_a_clone_every_section_prints_its_committed_runs(executed):
    text = "".join(outputs(executed["clone"][1]))
    assert NOT_FOUND not in text
    results = REPO / "results"
    for name in ("lab-5ep-seed1", "lab-unrecorded-cpu", "lab-loaded-cpu", "lab-5ep-adamw-wd0.01-seed1",
                 "improved"):
        history = json.loads((results / f"{name}.json").read_text())
        assert f"{history[-1]['test_acc']:.2%}" in text, name


def test_alone_it_says_where_the_committed_runs_are(executed):
    text = "".join(outputs(executed["alone"][1]))
    assert text.count(NOT_FOUND) == 3  # sections 7, 8 and 9


def test_html_export_embeds_both_gifs(executed, tmp_path):
    work, _ = executed["alone"]
    command = [sys.executable, "-m", "jupyter", "nbconvert", "--to", "html", str(work / "out.ipynb"),
               "--output-dir", str(tmp_path)]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    html = (tmp_path / "out.html").read_text()
    for gif in ("convolution.gif", "maxpool.gif"):
        data = base64.b64encode((REPO / "Images" / gif).read_bytes()).decode()
        assert f"data:image/gif;base64,{data}" in html, f"{gif} is not embedded in the HTML export"
