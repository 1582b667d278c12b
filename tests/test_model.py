import torch

import re

import pytest

from labcnn.model import COLLAPSE_NORM, LabCNN, collapsed_filters, count_parameters, filter_norms, summary


def test_parameter_count_is_the_labs():
    assert count_parameters(LabCNN()) == 600_746


def test_block_and_logit_shapes():
    model = LabCNN().eval()
    x = torch.zeros(1, 3, 32, 32)
    shapes = []
    for block in (model.conv1, model.conv2, model.conv3):
        x = block(x)
        shapes.append(tuple(x.shape))
    assert shapes == [(1, 32, 16, 16), (1, 64, 8, 8), (1, 128, 4, 4)]
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert [model.fc1.in_features, model.fc2.in_features, model.fc3.in_features, model.fc3.out_features] == [2048, 256, 128, 10]


def test_summary_table_and_model_untouched():
    model = LabCNN().train()
    table = str(summary(model))
    convs = re.findall(r"Conv2d \(0\)\s+(\[[^]]+\])\s+(\S+)", table)  # each convolution's row: output shape, parameters
    assert convs == [("[1, 32, 33, 33]", "416"), ("[1, 64, 17, 17]", "8,256"), ("[1, 128, 9, 9]", "32,896")]
    assert "Total params: 600,746" in table
    assert model.training
    assert next(model.parameters()).device.type == "cpu"


def test_collapsed_filters_counts_zeroed_kernels():
    model = LabCNN()
    assert collapsed_filters(model) == {"conv1": (0, 32), "conv2": (0, 64), "conv3": (0, 128)}
    with torch.no_grad():
        model.conv2[0].weight[:5] = 1e-5
    assert collapsed_filters(model)["conv2"] == (5, 64)


def test_filter_norms_are_l2_norms_per_filter():
    weight = torch.zeros(3, 2, 2, 2)
    weight[1, 0, 0, 0], weight[2, 1, 1, 1], weight[2, 0, 0, 1] = -3.0, 3.0, 4.0
    assert filter_norms(weight).tolist() == [0.0, 3.0, 5.0]
    assert (filter_norms(weight) < COLLAPSE_NORM).tolist() == [True, False, False]
    with pytest.raises(ValueError):
        filter_norms(torch.zeros(3, 4))
