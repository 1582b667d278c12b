"""labcnn.model: the network's size and shapes, its summary, size arithmetic, filter norms,
normalization and the Trained record."""

import re

import pytest
import torch
from torch import nn

from labcnn import ConfigError
from labcnn.model import (
    CHANNELS,
    COLLAPSE_NORM,
    INPUT_SIZE,
    LAB_MEAN,
    LAB_NORMALIZATION,
    LAB_STD,
    LabCNN,
    Normalization,
    Trained,
    collapsed_filters,
    filter_norms,
    output_size,
    size_chain,
    summary,
)


def test_parameter_count_is_the_labs():
    assert sum(p.numel() for p in LabCNN().parameters() if p.requires_grad) == 600_746


def test_block_and_logit_shapes():
    model = LabCNN().eval()
    x = torch.zeros(INPUT_SIZE)
    shapes = []
    for block in (model.conv1, model.conv2, model.conv3):
        x = block(x)
        shapes.append(tuple(x.shape))
    assert shapes == [(1, 32, 16, 16), (1, 64, 8, 8), (1, 128, 4, 4)]
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert [
        model.fc1.in_features,
        model.fc2.in_features,
        model.fc3.in_features,
        model.fc3.out_features,
    ] == [2048, 256, 128, 10]


def test_summary_table_and_model_untouched():
    model = LabCNN().train()
    table = str(summary(model))
    # each convolution's row: output shape, parameters
    convs = re.findall(r"Conv2d \(0\)\s+(\[[^]]+\])\s+(\S+)", table)
    assert convs == [
        ("[1, 32, 33, 33]", "416"),
        ("[1, 64, 17, 17]", "8,256"),
        ("[1, 128, 9, 9]", "32,896"),
    ]
    assert "Total params: 600,746" in table
    assert model.training
    assert next(model.parameters()).device.type == "cpu"


@pytest.mark.parametrize(
    "size, kernel, stride, padding",
    [(32, 2, 1, 1), (33, 2, 2, 0), (17, 2, 2, 0), (32, 3, 1, 1), (32, 5, 2, 2), (7, 3, 3, 0)],
)
def test_output_size_is_what_torch_computes(size, kernel, stride, padding):
    conv = nn.Conv2d(1, 1, kernel, stride=stride, padding=padding)
    assert (
        output_size(size, kernel, stride, padding) == conv(torch.zeros(1, 1, size, size)).shape[-1]
    )
    if padding == 0:
        pool = nn.MaxPool2d(kernel, stride)
        assert output_size(size, kernel, stride) == pool(torch.zeros(1, 1, size, size)).shape[-1]


def test_size_chain_by_formula_matches_the_models_shapes():
    model, measured = LabCNN().eval(), [("input", *INPUT_SIZE[1:3])]
    for i in (1, 2, 3):
        block = getattr(model, f"conv{i}")
        for layer, name in ((block[0], f"conv{i}"), (block[3], f"pool{i}")):
            layer.register_forward_hook(
                lambda _, __, out, name=name: measured.append((name, out.shape[1], out.shape[-1]))
            )
    model(torch.zeros(INPUT_SIZE))
    assert size_chain() == measured
    assert [side for _, _, side in size_chain()] == [32, 33, 16, 17, 8, 9, 4]
    assert [c for name, c, _ in size_chain() if name.startswith("conv")] == list(CHANNELS)
    assert size_chain()[-1][1] * size_chain()[-1][2] ** 2 == model.fc1.in_features == 2048


def test_collapsed_filters_counts_zeroed_kernels():
    model = LabCNN()
    assert collapsed_filters(model) == {"conv1": (0, 32), "conv2": (0, 64), "conv3": (0, 128)}
    with torch.no_grad():
        model.conv2[0].weight[:5] = 1e-5
    assert collapsed_filters(model)["conv2"] == (5, 64)
    assert collapsed_filters(model, threshold=0.0) == {
        "conv1": (0, 32),
        "conv2": (0, 64),
        "conv3": (0, 128),
    }


def test_filter_norms_are_l2_norms_per_filter():
    weight = torch.zeros(3, 2, 2, 2, dtype=torch.float64)
    weight[1, 0, 0, 0], weight[2, 1, 1, 1], weight[2, 0, 0, 1] = -3.0, 3.0, 4.0
    norms = filter_norms(weight)
    assert norms.tolist() == [0.0, 3.0, 5.0] and norms.dtype == torch.float32
    assert (filter_norms(weight) < COLLAPSE_NORM).tolist() == [True, False, False]
    with pytest.raises(ValueError, match=r"expected a convolution weight .*got \(3, 4\)"):
        filter_norms(torch.zeros(3, 4))


def test_normalization_is_measured_per_channel_and_applied():
    images = torch.stack(
        [torch.full((3, 2, 2), 0, dtype=torch.uint8), torch.full((3, 2, 2), 255, dtype=torch.uint8)]
    )
    measured = Normalization.measure(images)
    assert measured.mean == pytest.approx((0.5,) * 3) and measured.std == pytest.approx((0.5,) * 3)
    images[:, 2] = torch.tensor([51, 153], dtype=torch.uint8).view(2, 1, 1)
    assert Normalization.measure(images).mean[2] == pytest.approx(0.4)
    assert Normalization.measure(images).std[2] == pytest.approx(0.2)
    mean, std = LAB_NORMALIZATION.tensors()
    assert mean.shape == std.shape == (1, 3, 1, 1) and mean.dtype == torch.float32
    assert (LAB_NORMALIZATION.mean, LAB_NORMALIZATION.std) == (LAB_MEAN, LAB_STD)
    x = LAB_NORMALIZATION(images)
    assert x.dtype == torch.float32 and x.shape == images.shape and images.dtype == torch.uint8
    assert x[1, 0, 0, 0].item() == pytest.approx((1 - LAB_MEAN[0]) / LAB_STD[0])
    assert x[0, 2, 1, 1].item() == pytest.approx((0.2 - LAB_MEAN[2]) / LAB_STD[2])


def test_normalization_refuses_bad_statistics():
    for mean, std in [
        ((0.5,) * 2, (0.2,) * 3),
        ((0.5,) * 3, (0.2, 0.0, 0.2)),
        ((float("nan"),) * 3, (0.2,) * 3),
        (None, (0.2,) * 3),
        (("a",) * 3, (0.2,) * 3),
    ]:
        with pytest.raises(ConfigError, match="expected three finite numbers each, std > 0"):
            Normalization(mean, std)
    assert Normalization([0.5, 0.5, 0.5], [1, 1, 1]) == Normalization((0.5,) * 3, (1.0,) * 3)


def test_trained_counts_its_epochs():
    trained = Trained(LabCNN(), LAB_NORMALIZATION)
    assert trained.epoch == 0 and trained.history == [] and trained.config is None
    assert Trained(LabCNN(), LAB_NORMALIZATION, history=[{"epoch": 1}, {"epoch": 2}]).epoch == 2
