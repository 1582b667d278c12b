"""The report notebook as students meet it (Colab): copied alone into an empty folder, run by a
Python that has the requirements but not labcnn, nothing on ``PYTHONPATH``, so that its setup
cell really installs labcnn. Both routes the README gives are run by papermill with its
``parameters`` (1 epoch, 300 images), the data downloaded from a mirror on 127.0.0.1:

- ``url``: ``REPO_URL`` set (a local git repository stands in for the address);
- ``clone``: ``git clone ADDRESS labcnn`` beside the notebook, ``REPO_URL`` empty.

Each route gets its own virtual environment whose site-packages holds a ``.pth`` file naming
the test environment's site-packages: the requirements import, labcnn does not (its editable
install is another ``.pth`` file, which Python does not read from a folder named in a ``.pth``).
pip builds labcnn without build isolation here, to need no index; on Colab pip fetches setuptools.
(``conftest.py`` at the root runs the committed notebook in place under nbval: a laptop's route.)
"""

import base64
import json
import os
import shutil
import subprocess
import sysconfig
import venv
from pathlib import Path

import pytest
from helpers import REPO, serve
from synthetic import make_images, write_archive

NOTEBOOK = REPO / "notebooks" / "lab1_cnn_cifar10.ipynb"
NOT_FOUND = "the committed runs are in the repository's results/ folder"
SHIPPED = ("labcnn", "pyproject.toml", "README.md", "results")  # what pip and the notebook read
# The test environment, without the checkout on the path and without labcnn's own variables.
BASE_ENV = {
    k: v
    for k, v in os.environ.items()
    if not k.startswith(("LABCNN_", "PYTHON", "VIRTUAL_ENV", "JUPYTER"))
}
BASE_ENV.update(
    OMP_NUM_THREADS="1", CI="1", PIP_NO_BUILD_ISOLATION="0", PIP_NO_INPUT="1", PIP_NO_INDEX="1"
)


def student_python(folder: Path) -> Path:
    """A virtual environment in ``folder`` that sees the requirements but not labcnn."""
    venv.EnvBuilder(with_pip=False).create(folder)
    purelib = Path(
        sysconfig.get_path("purelib", vars={"base": str(folder), "platbase": str(folder)})
    )
    (purelib / "requirements.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return folder / "bin" / "python"


def can_import_labcnn(python: Path, cwd: Path) -> subprocess.CompletedProcess:
    code = "from labcnn import LabcnnError; import labcnn; print(labcnn.__file__)"
    return subprocess.run(
        [str(python), "-c", code], cwd=cwd, env=BASE_ENV, capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def origin(tmp_path_factory) -> Path:
    """A git repository holding what a clone of this checkout holds (its working tree)."""
    repo = tmp_path_factory.mktemp("origin")
    for name in SHIPPED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, repo / name)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "snapshot"]):
        subprocess.run([*git, *command], cwd=repo, check=True, capture_output=True)
    return repo


@pytest.fixture(scope="module")
def executed(tmp_path_factory, origin):
    """Both routes at once (a process per core): ``{route: (folder, python, notebook)}``."""
    served = tmp_path_factory.mktemp("mirror")
    write_archive(served, make_images(30), make_images(10, seed=1))
    runs = {}
    with serve(served) as url:
        env = {
            **BASE_ENV,
            "LABCNN_CIFAR10_URL": f"{url}/cifar-10-python.tar.gz",
            "LABCNN_VERIFY": "0",
            "NO_PROXY": "127.0.0.1",
        }
        for route in ("url", "clone"):
            work = tmp_path_factory.mktemp(route)
            python = student_python(tmp_path_factory.mktemp(f"venv-{route}"))
            assert can_import_labcnn(python, work).returncode != 0, "labcnn is importable already"
            shutil.copy(NOTEBOOK, work / NOTEBOOK.name)
            params = ["-p", "EPOCHS", "1", "-p", "SUBSET", "300"]
            if route == "url":
                params += ["-p", "REPO_URL", str(origin)]
            else:
                subprocess.run(["git", "clone", "-q", str(origin), "labcnn"], cwd=work, check=True)
            command = [str(python), "-m", "papermill", NOTEBOOK.name, "out.ipynb", *params]
            process = subprocess.Popen(
                command,
                cwd=work,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            runs[route] = (work, python, process)
        for route, (_, _, process) in runs.items():
            output = process.communicate(timeout=600)[0]
            assert process.returncode == 0, f"{route}: {output[-3000:]}"
    return {
        route: (work, python, json.loads((work / "out.ipynb").read_text(encoding="utf-8")))
        for route, (work, python, _) in runs.items()
    }


def outputs(notebook: dict, kind: str = "stdout") -> list:
    """The notebook's outputs of one kind: a stream's text, or a MIME type's data."""
    found = []
    for cell in notebook["cells"]:
        for out in cell.get("outputs", []):
            if out.get("name") == kind:
                found.append("".join(out["text"]))
            elif kind in out.get("data", {}):
                found.append(out["data"][kind])
    return found


@pytest.mark.parametrize("route", ["url", "clone"])
def test_each_route_installs_labcnn_and_runs_to_the_end(executed, route):
    work, python, notebook = executed[route]
    errors = [o for c in notebook["cells"] for o in c.get("outputs", []) if "ename" in o]
    assert errors == []
    assert outputs(notebook, "stderr") == []
    text = "".join(outputs(notebook))
    assert "installed labcnn from ./labcnn" in text
    assert "final test accuracy" in text and "history sha256" in text  # the last cell ran
    assert NOT_FOUND not in text  # the clone's results/ were found
    assert (work / "runs" / "lab-1ep-300img" / "checkpoint.pt").is_file()
    installed = can_import_labcnn(python, work.parent)  # not from the clone: from site-packages
    assert installed.returncode == 0, installed.stderr
    assert Path(installed.stdout.strip()).is_relative_to(python.parents[1])


def test_gifs_are_image_gif_outputs_equal_to_the_committed_files(executed):
    for _, _, notebook in executed.values():
        gifs = [base64.b64decode("".join(g)) for g in outputs(notebook, "image/gif")]
        expected = [
            (REPO / "Images" / name).read_bytes() for name in ("convolution.gif", "maxpool.gif")
        ]
        assert gifs == expected


def setup_cell(repo_url: str = "") -> str:
    """The settings and setup cells as one script, ``REPO_URL`` set to ``repo_url``."""
    cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    settings = next(i for i, c in enumerate(code) if "parameters" in c["metadata"].get("tags", []))
    script = "".join(code[settings]["source"]) + "\n" + "".join(code[settings + 1]["source"])
    return script + f"\nREPO_URL = {repo_url!r}\n"


def run_setup(python: Path, cwd: Path, repo_url: str = "", times: int = 1):
    """The setup cell run ``times`` in one IPython shell, as a kernel runs it."""
    code = (
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "shell = InteractiveShell.instance()\n"
        f"cell = {setup_cell(repo_url)!r}\n"
        f"for _ in range({times}):\n"
        "    result = shell.run_cell(cell)\n"
        "    print('CELL', 'ok' if result.success else 'failed')\n"
    )
    return subprocess.run(
        [str(python), "-c", code],
        cwd=cwd,
        env=BASE_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_running_the_setup_cell_again_is_harmless(executed):
    work, python, _ = executed["clone"]
    result = run_setup(python, work, times=2)
    assert result.stdout.count("CELL ok") == 2, result.stdout + result.stderr
    assert "installed" not in result.stdout  # labcnn is installed: nothing to do


def test_a_failed_install_stops_with_pips_last_lines_and_no_traceback(tmp_path, origin):
    python = student_python(tmp_path / "venv")
    shutil.copytree(origin, tmp_path / "labcnn")
    pyproject = tmp_path / "labcnn" / "pyproject.toml"  # a requirement no index has
    text = pyproject.read_text().replace(
        "dependencies = [", 'dependencies = ["no-such-labcnn-dep", '
    )
    pyproject.write_text(text)
    result = run_setup(python, tmp_path)
    out = result.stdout + result.stderr
    assert "CELL failed" in out and "setup stopped: pip install ./labcnn failed" in out
    assert "ERROR:" in out and "no-such-labcnn-dep" in out  # pip's own reason
    assert "run this cell again" in out and "Traceback" not in out
    assert "installed labcnn" not in out
    assert can_import_labcnn(python, tmp_path.parent).returncode != 0


@pytest.mark.parametrize("folder", ["empty", "not a clone"])
def test_a_folder_named_labcnn_is_not_taken_for_labcnn(tmp_path, folder):
    python = student_python(tmp_path / "venv")
    (tmp_path / "labcnn").mkdir()
    if folder == "not a clone":
        (tmp_path / "labcnn" / "notes.txt").write_text("a student's own folder")
    result = run_setup(python, tmp_path)
    out = result.stdout + result.stderr
    assert "CELL failed" in out and "no clone of its repository is beside this notebook" in out
    assert "ImportError" not in out and "Traceback" not in out


def test_the_html_export_embeds_both_gifs(executed):
    """nbconvert's HTML export (what GitHub and a course site show) carries both GIFs."""
    from nbconvert import HTMLExporter

    work, _, _ = executed["url"]
    html, _ = HTMLExporter().from_filename(str(work / "out.ipynb"))
    for gif in ("convolution.gif", "maxpool.gif"):
        data = base64.b64encode((REPO / "Images" / gif).read_bytes()).decode()
        assert f"data:image/gif;base64,{data}" in html, f"{gif} is not embedded in the HTML export"
