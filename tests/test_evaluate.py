"""labcnn.evaluate: whole-split figures that do not depend on the batch size, and the model's mode kept."""
import pytest
import torch

from labcnn.checkpoint import Trained
from labcnn.evaluate import evaluate, first_block_maps
from labcnn.model import LabCNN
from labcnn.transforms import LAB_NORMALIZATION

pytestmark = pytest.mark.usefixtures("one_thread")


def trained_model(train: bool) -> Trained:
    model = LabCNN().train()
    model(torch.randn(8, 3, 32, 32))  # move the BatchNorm running statistics away from their init
    return Trained(model.train(train), LAB_NORMALIZATION)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_results_do_not_depend_on_batch_size_and_the_model_is_left_as_it_was(tree_data, mode):
    _, train, _ = tree_data
    trained = trained_model(mode == "train")
    before = {k: v.clone() for k, v in trained.model.state_dict().items()}
    full = evaluate(trained, *train, batch_size=len(train[1]))
    for batch_size in (1, 7):  # 7 leaves a partial last batch
        part = evaluate(trained, *train, batch_size=batch_size, flip_tta=batch_size == 1)
        flip = evaluate(trained, *train, batch_size=len(train[1]), flip_tta=True) if batch_size == 1 else full
        assert part["loss"] == pytest.approx(flip["loss"], rel=1e-5) and part["accuracy"] == flip["accuracy"]
        assert torch.equal(part["confusion"], flip["confusion"]) and torch.allclose(part["confidence"], flip["confidence"], atol=1e-5)
    assert trained.model.training == (mode == "train") and all(m.training == (mode == "train") for m in trained.model.modules())
    assert all(torch.equal(before[k], v) for k, v in trained.model.state_dict().items())
    assert full["confusion"].sum() == len(train[1]) and full["confusion"].dtype == torch.int64
    assert full["accuracy"] == pytest.approx(full["confusion"].diag().sum().item() / len(train[1]))
    assert ((full["confidence"] > 0.1 - 1e-6) & (full["confidence"] <= 1)).all()  # the top of 10 probabilities


def test_first_block_maps_use_the_models_normalization(tree_data):
    _, train, _ = tree_data
    trained = trained_model(False)
    maps = first_block_maps(trained, train[0][0])
    assert maps.shape == (32, 33, 33) and maps.dtype == torch.float32 and (maps >= 0).all()  # after ReLU
    with torch.no_grad():
        expected = trained.model.conv1[:3](LAB_NORMALIZATION(train[0][:1]))[0]
    assert torch.allclose(maps, expected)
