"""One short epoch on the real copy of CIFAR-10 when ../shared/data holds it; skipped otherwise.
(Loading the whole real copy is tested in test_data.py.)"""
import tarfile
from pathlib import Path

import pytest

from labcnn.config import make_config
from labcnn.data import load_cifar10
from labcnn.train import fit

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
PER_CLASS = 300  # training images per class: a quick epoch, still far above chance


@pytest.fixture(scope="module")
def real_root(tmp_path_factory):
    """The whole real test split and the first PER_CLASS training images of each class."""
    if not SHARED.is_file():
        pytest.skip(f"no real CIFAR-10 copy at {SHARED}")
    root, taken = tmp_path_factory.mktemp("real"), {}
    with tarfile.open(SHARED) as tar:
        for member in tar:
            parts = Path(member.name).parts  # cifar10-jpeg/<split>/<class>/NNNN.jpg
            if member.isfile() and len(parts) == 4:
                key = parts[1:3]
                taken[key] = taken.get(key, 0) + 1
                if parts[1] == "test" or taken[key] <= PER_CLASS:
                    tar.extract(member, root, filter="data")
    return root


def test_one_short_epoch_beats_chance_on_the_full_real_test_set(real_root):
    train, test = load_cifar10(real_root), load_cifar10(real_root, train=False)
    assert len(train[1]) == 10 * PER_CLASS and len(test[1]) == 10_000
    config = make_config(epochs=1, batch_size=50, lr=0.001)  # 60 steps: a stable start
    history = fit(config, train, test, device="cpu", log=print).history
    assert history[0]["test_acc"] > 0.2  # chance is 0.1
