"""labcnn.arithmetic: the worked examples and tables the notebook prints, checked against PyTorch."""
import torch
import torch.nn.functional as F

from labcnn import arithmetic as A
from labcnn.model import LabCNN, count_parameters


def test_size_chain_by_formula_matches_the_models_shapes():
    assert [side for _, _, side in A.size_chain()] == [32, 33, 16, 17, 8, 9, 4]
    assert A.measured_shapes(LabCNN()) == A.size_chain()
    assert A.size_chain()[-1][1] * A.size_chain()[-1][2] ** 2 == LabCNN().fc1.in_features == 2048


def test_parameter_counts_by_formula_match_the_model():
    rows = A.parameter_counts(LabCNN())
    assert all(by_formula == actual for _, _, by_formula, actual in rows)
    assert sum(row[2] for row in rows) == count_parameters(LabCNN()) == 600_746
    assert rows[0][:3] == ("conv1.0", "32 x (3 x 2 x 2 + 1)", 416) and rows[6][2] == 2048 * 256 + 256


def test_multichannel_convolution_by_hand_equals_conv2d():
    expected = F.conv2d(A.MULTI_INPUT[None], A.MULTI_KERNEL[None], torch.tensor([A.MULTI_BIAS]), padding=1)[0, 0]
    assert torch.equal(A.multichannel_by_hand(), expected)
    assert A.multichannel_by_hand()[0, 0] == 1 * -1 + 0 * 0 + 1 * 1 + A.MULTI_BIAS  # the notebook's worked value
    shuffled = A.multichannel_by_hand(A.MULTI_INPUT.flip(0))
    assert not torch.equal(shuffled, expected)  # each channel meets its own kernel
