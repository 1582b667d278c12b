import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/synthetic.py

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
