"""Settings for executing the report notebook under nbval (``pytest`` collects it from here).

At import, before any kernel starts, this makes a small synthetic CIFAR-10 look-alike and points
the notebook at it with a 1-epoch run, so the notebook test needs no real data and no network.
Figures and checkpoints go to a temporary folder: the committed notebook and Images/ stay as they are.
"""
import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from synthetic import make_dataset  # noqa: E402

scratch = Path(tempfile.mkdtemp(prefix="labcnn-nbval-"))
atexit.register(shutil.rmtree, scratch, ignore_errors=True)
make_dataset(scratch / "data", "tree", train_per_class=30, test_per_class=10)
os.environ.update(
    LABCNN_DATA_DIR=str(scratch / "data"),
    LABCNN_EPOCHS="1",
    LABCNN_SUBSET="300",
    LABCNN_RUNS_DIR=str(scratch / "runs"),
    LABCNN_IMAGES_DIR=str(scratch / "Images"),
    MPLBACKEND="module://matplotlib_inline.backend_inline",
)


def pytest_collectstart(collector):
    """Do not compare stderr (warnings, progress bars) of the notebook's cells."""
    if collector.fspath and collector.fspath.ext == ".ipynb":
        collector.skip_compare += ("stderr",)
