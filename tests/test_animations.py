import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from labcnn import animations as A
from labcnn import model as M
from labcnn.arithmetic import output_size

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "lab1_cnn_cifar10.ipynb"
GIFS = {"convolution.gif": (A.conv_steps, 2), "maxpool.gif": (A.pool_steps, 1)}  # steps, default fps


@pytest.fixture(scope="module")
def gif_dir(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("gifs")
    paths = A.make_gifs(out_dir)
    assert [p.name for p in paths] == list(GIFS)
    return out_dir


def frames(path) -> list[tuple[int, Image.Image]]:
    """(duration in ms, full RGB frame) of every frame of the GIF at ``path``."""
    with Image.open(path) as im:
        assert im.format == "GIF"
        out = []
        for i in range(im.n_frames):
            im.seek(i)
            out.append((im.info["duration"], im.convert("RGB")))
        return out


def markdown_cells_showing(name) -> list[dict]:
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    return [c for c in cells if c["cell_type"] == "markdown" and f"](attachment:{name})" in "".join(c["source"])]


def test_layer_settings_are_the_models():
    conv, pool = M.conv_block(1, 1)[0], M.conv_block(1, 1)[3]
    assert (A.KERNEL_SIZE, A.STRIDE, A.PADDING, A.POOL_SIZE) == (M.KERNEL_SIZE, M.STRIDE, M.PADDING, M.POOL_SIZE)
    assert conv.kernel_size == (A.KERNEL_SIZE,) * 2 == tuple(A.CONV_KERNEL.shape)
    assert conv.stride == (A.STRIDE,) * 2 and conv.padding == (A.PADDING,) * 2
    assert pool.kernel_size == pool.stride == A.POOL_SIZE


def test_examples_are_small_integers():
    for t in (A.CONV_INPUT, A.CONV_KERNEL, A.POOL_INPUT):
        assert t.dtype == torch.float32 and torch.equal(t, t.round()) and t.abs().max() < 10


def test_conv_steps_match_conv2d():
    expected = F.conv2d(A.CONV_INPUT[None, None], A.CONV_KERNEL[None, None], stride=1, padding=1)[0, 0]
    side = output_size(4, 2, stride=1, padding=1)
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
    side = output_size(5, 2, stride=2)
    assert side == 2 and expected.shape == A.pool_output().shape == (side, side)
    assert torch.equal(A.pool_output(), expected)
    steps = A.pool_steps()
    assert [(s.out, s.window) for s in steps] == [((0, 0), (0, 0)), ((0, 1), (0, 2)), ((1, 0), (2, 0)), ((1, 1), (2, 2))]
    for s in steps:
        (wr, wc) = s.window
        assert torch.equal(s.values, A.POOL_INPUT[wr:wr + 2, wc:wc + 2])
        assert s.result == expected[s.out].item() == s.values.max().item()


def test_pool_winners_are_each_windows_maximum():
    winners = A.pool_winners()
    assert winners == [(0, 1), (1, 2), (3, 1), (3, 2)]  # the 3, 5, 6 and 3 of POOL_INPUT
    for step, (r, c) in zip(A.pool_steps(), winners, strict=True):
        wr, wc = step.window
        assert wr <= r < wr + 2 and wc <= c < wc + 2
        assert A.POOL_INPUT[r, c].item() == step.result


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
def test_gif_loops_small_and_holds_the_finished_output(gif_dir, name):
    steps, fps = GIFS[name]
    n, frame_ms = len(steps()), int(1000 / fps)
    path = gif_dir / name
    assert path.stat().st_size < 150_000  # embedded in the notebook too: keep it small
    with Image.open(path) as im:
        assert im.info.get("loop") == 0  # repeat forever
    durations = [d for d, _ in frames(path)]
    assert durations == [frame_ms] * n + [A.hold_frames(fps) * frame_ms]  # one frame per step, then the hold
    assert durations[-1] >= 3000 and A.hold_frames(fps) * frame_ms == A.HOLD_SECONDS * 1000


def test_maxpool_gif_rings_each_windows_winner(gif_dir):
    blue = torch.tensor([int(A.BLUE[i:i + 2], 16) for i in (1, 3, 5)])

    def blue_pixels(image):
        rgb = torch.from_numpy(np.array(image)).int()  # [H, W, 3]
        return int(((rgb - blue).abs().amax(dim=2) <= 12).sum())

    counts = [blue_pixels(image) for _, image in frames(gif_dir / "maxpool.gif")]
    # One more winner (ring and bold value, and its copy in the output) per step; all four at the end.
    assert 0 < counts[0] < counts[1] < counts[2] < counts[3] <= counts[4]


def test_make_gifs_reproduces_the_committed_gifs(gif_dir):
    for name in GIFS:
        assert (gif_dir / name).read_bytes() == (REPO / "Images" / name).read_bytes(), (
            f"Images/{name} is stale: run `python -m labcnn gifs`, then refresh the notebook's attachments"
        )


@pytest.mark.parametrize("name", GIFS)
def test_notebook_embeds_the_committed_gifs(name):
    cells = markdown_cells_showing(name)
    assert cells, f"no markdown cell shows ![...](attachment:{name})"
    for cell in cells:
        assert list(cell["attachments"][name]) == ["image/gif"]
        embedded = base64.b64decode(cell["attachments"][name]["image/gif"])
        assert embedded == (REPO / "Images" / name).read_bytes(), f"the notebook's copy of {name} differs from Images/{name}"
    text = NOTEBOOK.read_text()
    assert f"Images/{name})" not in text  # a relative link breaks in copies written elsewhere


def test_attach_gifs_refreshes_only_the_attachments(tmp_path):
    notebook = tmp_path / "report.ipynb"
    shutil.copyfile(NOTEBOOK, notebook)
    gifs = [tmp_path / name for name in GIFS]
    for i, path in enumerate(gifs):
        path.write_bytes(b"GIF89a" + bytes([i]) * 10)
    assert A.attach_gifs(notebook, gifs) is True
    before, after = json.loads(NOTEBOOK.read_text()), json.loads(notebook.read_text())
    for path in gifs:
        for cell in after["cells"]:
            if f"attachment:{path.name}" in "".join(cell["source"]):
                assert base64.b64decode(cell["attachments"][path.name]["image/gif"]) == path.read_bytes()
    for nb in (before, after):
        for cell in nb["cells"]:
            cell.pop("attachments", None)
    assert before == after  # sources, outputs and metadata untouched
    written = notebook.read_bytes()
    assert A.attach_gifs(notebook, gifs) is False and notebook.read_bytes() == written
    assert not list(tmp_path.glob(".*.tmp"))


def test_attach_gifs_refuses_a_gif_no_cell_shows(tmp_path):
    notebook = tmp_path / "report.ipynb"
    shutil.copyfile(NOTEBOOK, notebook)
    stray = tmp_path / "stray.gif"
    stray.write_bytes(b"GIF89a")
    with pytest.raises(ValueError, match="stray.gif"):
        A.attach_gifs(notebook, [stray])
    assert notebook.read_bytes() == NOTEBOOK.read_bytes()
