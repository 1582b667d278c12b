import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from labcnn import animations as A
from labcnn.model import conv_block

GIFS = {"convolution.gif": (A.conv_steps, 2), "maxpool.gif": (A.pool_steps, 1)}  # steps, default fps


@pytest.fixture(scope="module")
def gif_dir(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("gifs")
    paths = A.make_gifs(out_dir)
    assert [p.name for p in paths] == list(GIFS)
    return out_dir


def frame_durations(path) -> list[int]:
    with Image.open(path) as im:
        assert im.format == "GIF"
        durations = []
        for i in range(im.n_frames):
            im.seek(i)
            durations.append(im.info["duration"])
        return durations


def test_layer_settings_are_the_models():
    conv, pool = conv_block(1, 1)[0], conv_block(1, 1)[3]
    assert conv.kernel_size == (A.CONV_KERNEL_SIZE,) * 2 == tuple(A.CONV_KERNEL.shape)
    assert conv.stride == (A.CONV_STRIDE,) * 2 and conv.padding == (A.CONV_PADDING,) * 2
    assert pool.kernel_size == pool.stride == A.POOL_SIZE


def test_examples_are_small_integers():
    for t in (A.CONV_INPUT, A.CONV_KERNEL, A.POOL_INPUT):
        assert t.dtype == torch.float32 and torch.equal(t, t.round()) and t.abs().max() < 10


def test_conv_steps_match_conv2d():
    expected = F.conv2d(A.CONV_INPUT[None, None], A.CONV_KERNEL[None, None], stride=1, padding=1)[0, 0]
    side = A.output_size(4, 2, stride=1, padding=1)
    assert side == 5 and expected.shape == A.conv_output().shape == (side, side)
    assert torch.equal(A.conv_output(), expected)
    steps = A.conv_steps()
    assert [s.out for s in steps] == [(r, c) for r in range(side) for c in range(side)]
    padded = F.pad(A.CONV_INPUT, (1, 1, 1, 1))
    for s in steps:
        (r, c), (wr, wc) = s.out, s.window
        assert (wr, wc) == (r, c)  # stride 1: window top-left in the padded grid = output cell
        assert torch.equal(s.values, padded[wr:wr + 2, wc:wc + 2])
        assert s.result == expected[r, c].item() == (s.values * A.CONV_KERNEL).sum().item()


def test_pool_steps_match_max_pool2d_and_floor():
    expected = F.max_pool2d(A.POOL_INPUT[None, None], 2)[0, 0]
    side = A.output_size(5, 2, stride=2)
    assert side == 2 and expected.shape == A.pool_output().shape == (side, side)
    assert torch.equal(A.pool_output(), expected)
    steps = A.pool_steps()
    assert [(s.out, s.window) for s in steps] == [((0, 0), (0, 0)), ((0, 1), (0, 2)), ((1, 0), (2, 0)), ((1, 1), (2, 2))]
    for s in steps:
        (wr, wc) = s.window
        assert torch.equal(s.values, A.POOL_INPUT[wr:wr + 2, wc:wc + 2])
        assert s.result == expected[s.out].item() == s.values.max().item()


def test_formulas_read_and_add_up():
    assert A.conv_formula(A.conv_steps()[0]) == "out[0, 0] = 0*1 + 0*0 + 0*(-1) + 1*2 = 2"
    assert A.pool_formula(A.pool_steps()[0]) == "out[0, 0] = max(1, 3, 0, 2) = 3"
    for s in A.conv_steps():
        _, expression, result = A.conv_formula(s).split(" = ")
        assert eval(expression) == float(result) == s.result
    for s in A.pool_steps():
        _, expression, result = A.pool_formula(s).split(" = ")
        assert eval(expression) == float(result) == s.result


@pytest.mark.parametrize("name", GIFS)
def test_gif_loops_small_and_one_frame_per_step_plus_hold(gif_dir, name):
    steps, fps = GIFS[name]
    n, frame_ms = len(steps()), int(1000 / fps)
    path = gif_dir / name
    assert path.stat().st_size < 500_000
    with Image.open(path) as im:
        assert im.info.get("loop") == 0  # repeat forever
    durations = frame_durations(path)
    # The HOLD_FRAMES identical closing frames are stored by Pillow as one frame lasting as long.
    assert len(durations) == n + 1 > 1
    assert durations == [frame_ms] * n + [A.HOLD_FRAMES * frame_ms]
    assert sum(durations) == (n + A.HOLD_FRAMES) * frame_ms


def test_gifs_are_byte_identical_across_runs(gif_dir, tmp_path):
    again = A.make_gifs(tmp_path)
    for path in again:
        assert path.read_bytes() == (gif_dir / path.name).read_bytes()
