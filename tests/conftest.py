import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/synthetic.py
sys.path.insert(1, str(Path(__file__).parents[1]))  # benchmarks/

from synthetic import make_dataset  # noqa: E402


@pytest.fixture(params=["batches", "archive", "tree"])
def layout(request):
    return request.param


@pytest.fixture(scope="session")
def tree_data(tmp_path_factory):
    """A synthetic image tree (20 training and 5 test images per class) and its tensors."""
    root = tmp_path_factory.mktemp("tree")
    train, test = make_dataset(root, "tree")
    return root, train, test


@pytest.fixture
def one_thread():
    """One torch thread: on a busy machine these tiny models then train several times faster."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
REAL_TRAIN_PER_CLASS = 300  # a quick real epoch, still far above chance


@pytest.fixture(scope="session")
def real_copy():
    """The real copy's whole test split and its first 300 training images per class, extracted
    once per session (into memory where /dev/shm is); skipped where ../shared lacks the copy."""
    import gzip  # noqa: E401
    import io
    import os
    import shutil
    import tarfile
    import tempfile

    if not SHARED.is_file():
        pytest.skip(f"no real CIFAR-10 copy at {SHARED}")
    root, taken = Path(tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)), {}
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(SHARED.read_bytes()))) as tar:
        for member in tar:  # cifar10-jpeg/<split>/<class>/NNNN.jpg, a known archive
            parts = Path(member.name).parts
            if member.isfile() and len(parts) == 4 and ".." not in parts:
                taken[parts[1:3]] = taken.get(parts[1:3], 0) + 1
                if parts[1] == "test" or taken[parts[1:3]] <= REAL_TRAIN_PER_CLASS:
                    path = root / member.name
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(tar.extractfile(member).read())
    yield root
    shutil.rmtree(root, ignore_errors=True)
