"""One short epoch on the real copy of CIFAR-10, when ../shared/data holds it; skipped otherwise.

Loading the real copy is tested in test_data.py; this training check belongs in test_train.py."""
import tarfile
from pathlib import Path

import pytest

from labcnn.data import load_cifar10
from labcnn.config import make_config
from labcnn.train import fit

SHARED_ARCHIVE = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
pytestmark = pytest.mark.skipif(not SHARED_ARCHIVE.is_file(), reason=f"no real CIFAR-10 copy at {SHARED_ARCHIVE}")


@pytest.fixture(scope="module")
def real_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    with tarfile.open(SHARED_ARCHIVE) as tar:  # the image tree cifar10-jpeg/{train,test}/<class>/*.jpg
        tar.extractall(root, filter="data" if hasattr(tarfile, "data_filter") else None)
    return root


def test_one_short_epoch_beats_chance_on_the_full_test_set(real_root):
    train, test = load_cifar10(real_root), load_cifar10(real_root, train=False)
    assert len(train[1]) == 50_000
    history = fit(make_config(epochs=1, subset=10_000), train, test, device="cpu", log=print).history
    assert history[0]["test_acc"] > 0.3  # chance is 0.1; measured 0.41 on this subset
