"""labcnn.whitening: airbench's whitening initialisation of the first convolution."""
import pytest
import torch
from helpers import QUICK, quiet

from labcnn import train as T
from labcnn.config import make_config
from labcnn.model import LabCNN
from labcnn.whitening import patches, whiten_conv

pytestmark = pytest.mark.usefixtures("one_thread")


def correlated_images(n=200, seed=0):
    """Images whose channels have different scales and are correlated, as real photographs are."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=gen) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1)
    x[:, 1] += x[:, 0]
    return x


def test_patches_follow_the_convolution_weight_order():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    conv = torch.nn.Conv2d(3, 1, 2, bias=False)
    flat = patches(x, (2, 2))
    assert flat.shape == (2 * 3 * 3, 12)
    # each patch dotted with the flattened weight is the convolution's output at that place
    expected = conv(x).permute(0, 2, 3, 1).reshape(-1)
    assert torch.allclose(flat @ conv.weight.detach().reshape(-1), expected, atol=1e-3)


def test_whitened_filters_decorrelate_the_patches():
    x = correlated_images()
    model = LabCNN()
    default = model.conv1[0].weight[24:].clone()
    whiten_conv(model.conv1[0], x)
    weight = model.conv1[0].weight.detach().reshape(32, -1).double()
    outputs = patches(x, (2, 2)).double() @ weight[:12].T
    covariance = outputs.T @ outputs / len(outputs)
    assert torch.allclose(covariance, torch.eye(12, dtype=torch.float64), atol=1e-2)  # eps shrinks the diagonal a little
    assert torch.equal(weight[12:24], -weight[:12])  # each filter also with the opposite sign
    assert torch.equal(model.conv1[0].weight[24:], default)  # the other 8 keep their initialization


def test_too_few_filters_or_wrong_channels_are_refused():
    with pytest.raises(ValueError, match=">= 24 filters"):
        whiten_conv(torch.nn.Conv2d(3, 16, 2), correlated_images(4))
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        whiten_conv(torch.nn.Conv2d(3, 32, 2), torch.zeros(4, 1, 32, 32))


def test_fit_starts_from_whitened_filters_and_resumes(tree_data, tmp_path):
    _, train, test = tree_data
    config = make_config(**{**QUICK, "epochs": 2, "whiten": True})
    whitened = T.fit(config, train, test, run_dir=tmp_path / "a", device="cpu", log=quiet)
    plain = T.fit(make_config(**{**QUICK, "epochs": 2}), train, test, device="cpu", log=quiet)
    assert not torch.equal(whitened.model.conv1[0].weight, plain.model.conv1[0].weight)
    lines = []
    again = T.fit(config, train, test, run_dir=tmp_path / "a", device="cpu", log=lines.append)
    assert "run complete: 2 of 2 epochs restored" in " ".join(lines)
    assert torch.equal(again.model.conv1[0].weight, whitened.model.conv1[0].weight)
