"""Settings for executing the report notebook in place under nbval (``pytest`` collects it from
``notebooks/``; this file sits at the root so that the students' folder holds only the notebook).

Before the notebook's kernel starts, a small synthetic CIFAR-10 look-alike is made and the
notebook is pointed at it with a 1-epoch run, so the test needs no real data and no network.
Figures and checkpoints go to a temporary folder: the committed notebook and Images/ stay as
they are.
"""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "tests"))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Point the notebook at synthetic data before nbval starts its kernel (the first cell)."""
    if item.path.suffix != ".ipynb" or os.environ.get("LABCNN_NBVAL_DATA"):
        return
    from synthetic import make_dataset

    scratch = Path(tempfile.mkdtemp(prefix="labcnn-nbval-"))
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    make_dataset(scratch / "data", "tree", train_per_class=30, test_per_class=10)
    os.environ.update(
        LABCNN_NBVAL_DATA=str(scratch / "data"),  # once per session
        LABCNN_DATA_DIR=str(scratch / "data"),
        LABCNN_EPOCHS="1",
        LABCNN_SUBSET="300",
        LABCNN_RUNS_DIR=str(scratch / "runs"),
        LABCNN_IMAGES_DIR=str(scratch / "Images"),
        MPLBACKEND="module://matplotlib_inline.backend_inline",
    )


def pytest_collectstart(collector):
    """Do not compare stderr (warnings, progress bars) of the notebook's cells."""
    if collector.path and collector.path.suffix == ".ipynb":
        collector.skip_compare += ("stderr",)

