"""labcnn.animations: the two GIFs, their display as image/gif outputs, refreshing a notebook's."""

import base64
import json
from pathlib import Path

import IPython.display
import matplotlib
import nbformat
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output
from PIL import Image

from labcnn import LabcnnError, WriteError
from labcnn import animations as A
from labcnn import model as M

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "lab1_cnn_cifar10.ipynb"
STEPS = {"convolution": A.conv_steps, "maxpool": A.pool_steps}
REFRESH = "python -m labcnn gifs --out Images --notebook notebooks/lab1_cnn_cifar10.ipynb"
# What matplotlib-inline and a student's style may change; the GIFs must not change with it.
NOTEBOOK_STYLE = {
    "figure.facecolor": (1, 1, 1, 0),
    "font.size": 10,
    "font.family": "serif",
    "patch.linewidth": 3,
    "text.color": "green",
    "figure.dpi": 72,
}


@pytest.fixture(scope="module")
def gif_dir(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("gifs") / "Images"  # missing: make_gifs makes it
    assert A.make_gifs(out_dir) == [out_dir / "convolution.gif", out_dir / "maxpool.gif"]
    assert sorted(p.name for p in out_dir.iterdir()) == ["convolution.gif", "maxpool.gif"]
    return out_dir


def frames(path) -> list[tuple[int, np.ndarray]]:
    """(duration in ms, RGB uint8 [H, W, 3]) of every frame of the GIF at ``path``."""
    with Image.open(path) as im:
        assert im.format == "GIF" and im.info.get("loop") == 0  # repeats forever
        out = []
        for i in range(im.n_frames):
            im.seek(i)
            out.append((im.info["duration"], np.array(im.convert("RGB"))))
        return out


def near(image: np.ndarray, color) -> np.ndarray:
    """bool [H, W]: pixels within 12 of ``color`` (a "#rrggbb" string or an RGB tuple)."""
    if isinstance(color, str):
        color = [int(color[i : i + 2], 16) for i in (1, 3, 5)]
    return np.abs(image.astype(int) - np.array(color)).max(axis=2) <= 12


def test_layer_settings_are_the_models():
    block = M.LabCNN().conv1
    conv, pool = block[0], block[3]
    assert (A.KERNEL_SIZE, A.STRIDE, A.PADDING, A.POOL_SIZE) == (
        M.KERNEL_SIZE,
        M.STRIDE,
        M.PADDING,
        M.POOL_SIZE,
    )
    assert conv.kernel_size == (A.KERNEL_SIZE,) * 2 == tuple(A.CONV_KERNEL.shape)
    assert conv.stride == (A.STRIDE,) * 2 and conv.padding == (A.PADDING,) * 2
    assert pool.kernel_size == pool.stride == A.POOL_SIZE


def test_examples_are_small_integers():
    for t in (A.CONV_INPUT, A.CONV_KERNEL, A.POOL_INPUT):
        assert t.dtype == torch.float32 and torch.equal(t, t.round()) and t.abs().max() < 10
    assert A.CONV_INPUT.shape == (4, 4) and A.POOL_INPUT.shape == (5, 5)


def test_conv_steps_match_conv2d():
    expected = F.conv2d(A.CONV_INPUT[None, None], A.CONV_KERNEL[None, None], stride=1, padding=1)[
        0, 0
    ]
    side = M.output_size(4, 2, stride=1, padding=1)
    assert side == 5 and expected.shape == A.conv_output().shape == (side, side)
    assert A.conv_output().dtype == torch.float32 and torch.equal(A.conv_output(), expected)
    steps = A.conv_steps()
    assert [s.out for s in steps] == [(r, c) for r in range(side) for c in range(side)]
    padded = F.pad(A.CONV_INPUT, (1, 1, 1, 1))
    for s in steps:
        (r, c), (wr, wc) = s.out, s.window
        assert (wr, wc) == (r, c)  # stride 1: the window's corner in the padded grid = output cell
        assert torch.equal(s.values, padded[wr : wr + 2, wc : wc + 2])
        assert s.result == expected[r, c].item() == (s.values * A.CONV_KERNEL).sum().item()


def test_pool_steps_match_max_pool2d_and_floor():
    expected = F.max_pool2d(A.POOL_INPUT[None, None], 2)[0, 0]
    side = M.output_size(5, 2, stride=2)
    assert side == 2 and expected.shape == A.pool_output().shape == (side, side)
    assert torch.equal(A.pool_output(), expected)
    steps = A.pool_steps()
    assert [(s.out, s.window) for s in steps] == [
        ((0, 0), (0, 0)),
        ((0, 1), (0, 2)),
        ((1, 0), (2, 0)),
        ((1, 1), (2, 2)),
    ]
    for s in steps:
        wr, wc = s.window
        assert torch.equal(s.values, A.POOL_INPUT[wr : wr + 2, wc : wc + 2])
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
    for formula, steps in ((A.conv_formula, A.conv_steps()), (A.pool_formula, A.pool_steps())):
        for s in steps:
            _, expression, result = formula(s).split(" = ")
            assert eval(expression) == float(result) == s.result


@pytest.mark.parametrize("name", STEPS)
def test_gif_has_a_frame_per_step_then_holds_the_output(gif_dir, name):
    n = len(STEPS[name]())
    assert (gif_dir / f"{name}.gif").stat().st_size < 150_000  # stored in the notebook too
    durations = [d for d, _ in frames(gif_dir / f"{name}.gif")]
    assert durations == [A.GIFS[name]] * n + [A.HOLD_MS]
    assert A.HOLD_MS >= 3000 and A.GIFS == {"convolution": 500, "maxpool": 1000}


def test_convolution_gif_slides_the_window_row_by_row(gif_dir):
    images = [image for _, image in frames(gif_dir / "convolution.gif")]
    corners = []  # (top, left) of the red window outline in each step frame
    for image in images[:-1]:
        rows, cols = np.nonzero(near(image, (255, 0, 0)))
        corners.append((rows.min(), cols.min()))
        assert near(image, A.YELLOW).any()  # the output cell being computed
    assert not near(images[-1], (255, 0, 0)).any() and not near(images[-1], A.YELLOW).any()
    grid = [corners[i : i + 5] for i in range(0, 25, 5)]
    for row in grid:
        assert len({top for top, _ in row}) == 1 and [left for _, left in row] == sorted(
            {left for _, left in row}
        )
    assert [row[0][0] for row in grid] == sorted({row[0][0] for row in grid})


def test_maxpool_gif_rings_each_windows_winner(gif_dir):
    counts = [near(image, A.BLUE).sum() for _, image in frames(gif_dir / "maxpool.gif")]
    # One more winner (ring, bold value, its copy in the output) per step; all four at the end.
    assert 0 < counts[0] < counts[1] < counts[2] < counts[3] <= counts[4]


@pytest.mark.parametrize("name", STEPS)
def test_show_gif_displays_the_file_bytes_as_image_gif(gif_dir, monkeypatch, name):
    shown = []
    monkeypatch.setattr(IPython.display, "display", lambda *objs, **kw: shown.extend(objs))
    with matplotlib.rc_context(NOTEBOOK_STYLE):  # drawn afresh, under a notebook's style
        A.show_gif(name)
    (data,) = shown  # displayed raw: the mimebundle a kernel sends
    assert set(data) == {"image/gif", "text/html"}
    # The very string refresh_notebook stores (no line breaks): nbval compares it as text.
    assert data["image/gif"] == base64.b64encode((gif_dir / f"{name}.gif").read_bytes()).decode()
    assert data["text/html"] == A.HTML_GIF.format(data["image/gif"])  # nbconvert's HTML shows it


def test_unknown_gif_names_are_refused():
    for call in (A.gif_bytes, A.show_gif):
        with pytest.raises(ValueError, match="'sobel'.*convolution, maxpool"):
            call("sobel")


def test_make_gifs_refuses_an_out_dir_that_is_a_file(tmp_path):
    blocker = tmp_path / "Images"
    blocker.write_text("not a folder")
    with pytest.raises(WriteError, match="Images"):
        A.make_gifs(blocker)


def test_make_gifs_reproduces_the_committed_gifs(gif_dir):
    for name in STEPS:
        committed = (REPO / "Images" / f"{name}.gif").read_bytes()
        assert (gif_dir / f"{name}.gif").read_bytes() == committed, (
            f"Images/{name}.gif is stale: run `{REFRESH}`"
        )


def test_committed_notebook_shows_the_committed_gifs(tmp_path):
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    calls = {
        i: A.SHOW_GIF_CALL.findall("".join(cell["source"]))
        for i, cell in enumerate(cells)
        if cell["cell_type"] == "code"
    }
    calls = {i: names for i, names in calls.items() if names}
    assert sorted(sum(calls.values(), [])) == sorted(STEPS)
    for i in calls:  # nbval compares a run cell's image/gif output; a cell not run shows nothing
        gifs = [out for out in cells[i]["outputs"] if "image/gif" in out.get("data", {})]
        assert cells[i]["execution_count"] and gifs, f"{NOTEBOOK.name} cell {i} has no GIF: run it"
    copy = tmp_path / NOTEBOOK.name
    copy.write_bytes(NOTEBOOK.read_bytes())
    changed = A.refresh_notebook(copy, [REPO / "Images" / f"{name}.gif" for name in STEPS])
    assert not changed, f"the notebook's GIF outputs differ from Images/: run `{REFRESH}`"


def gif_output(data: str):
    return new_output(
        "display_data",
        data={"image/gif": data, "text/plain": "<IPython.core.display.Image object>"},
    )


@pytest.fixture
def notebook(tmp_path):
    """A small notebook: two run cells showing GIFs, one not run, and cells to leave alone."""
    nb = new_notebook(
        cells=[
            new_markdown_cell("# Faltung und Pooling \u2014 f\u00fcr alle"),
            new_code_cell(
                'from labcnn.animations import show_gif\nshow_gif("convolution")',
                execution_count=1,
                outputs=[gif_output("R0lGODlhAQ==")],
            ),
            new_code_cell(
                "print('pooling')\nanimations.show_gif('maxpool')  # 2x2",
                execution_count=2,
                outputs=[
                    new_output("stream", name="stdout", text="pooling\n"),
                    gif_output("R0lGODlhAg=="),
                ],
            ),
            new_code_cell('show_gif("convolution")', execution_count=None),
            new_code_cell(
                "import matplotlib",
                execution_count=3,
                outputs=[
                    new_output(
                        "display_data", data={"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"}
                    )
                ],
            ),
        ]
    )
    nb.metadata["kernelspec"] = dict(name="python3", display_name="Python 3", language="python")
    path = tmp_path / "report.ipynb"
    nbformat.write(nb, path)
    return path


def without_gifs(text: str) -> dict:
    nb = json.loads(text)
    for cell in nb["cells"]:
        for output in cell.get("outputs", []):
            for kind in ("image/gif", "text/html"):
                output.get("data", {}).pop(kind, None)
    return nb


def test_refresh_notebook_sets_only_the_gif_outputs_then_is_a_no_op(notebook, gif_dir):
    before = notebook.read_text(encoding="utf-8")
    gifs = [gif_dir / "convolution.gif", gif_dir / "maxpool.gif"]
    assert A.refresh_notebook(notebook, gifs) is True
    after = notebook.read_text(encoding="utf-8")
    cells = json.loads(after)["cells"]
    for cell, name in ((cells[1], "convolution"), (cells[2], "maxpool")):
        (output,) = [o for o in cell["outputs"] if "image/gif" in o.get("data", {})]
        gif = base64.b64decode(output["data"]["image/gif"])
        assert gif == (gif_dir / f"{name}.gif").read_bytes()
    assert cells[3]["outputs"] == []  # a cell not run keeps no output (nbval: "unrun cell")
    assert without_gifs(after) == without_gifs(before)  # sources, other outputs, metadata kept
    assert after == nbformat.writes(nbformat.reads(after, as_version=4)) + "\n"  # as Jupyter writes
    nbformat.validate(nbformat.reads(after, as_version=4))
    assert "f\u00fcr" in after  # non-ASCII kept as is
    stamp = notebook.stat().st_mtime_ns
    assert A.refresh_notebook(notebook, gifs) is False
    assert notebook.read_text(encoding="utf-8") == after and notebook.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in notebook.parent.iterdir()) == ["report.ipynb"]  # no temp file


def test_refresh_notebook_fills_the_nth_gif_output_with_the_nth_call(tmp_path, gif_dir):
    path = tmp_path / "both.ipynb"
    nbformat.write(
        new_notebook(
            cells=[
                new_code_cell(
                    "show_gif('maxpool')\nshow_gif('convolution')",
                    execution_count=1,
                    outputs=[gif_output("AA=="), gif_output("AA==")],
                )
            ]
        ),
        path,
    )
    assert A.refresh_notebook(path, [gif_dir / "convolution.gif", gif_dir / "maxpool.gif"])
    outputs = json.loads(path.read_text())["cells"][0]["outputs"]
    assert [base64.b64decode(o["data"]["image/gif"]) for o in outputs] == [
        (gif_dir / f"{name}.gif").read_bytes() for name in ("maxpool", "convolution")
    ]


def test_refresh_notebook_refuses_a_notebook_showing_no_gif(notebook, tmp_path, gif_dir):
    stray = tmp_path / "stray.gif"
    stray.write_bytes(b"GIF89a")
    text = notebook.read_text()
    with pytest.raises(LabcnnError, match=r"report\.ipynb: no code cell shows a GIF.*: stray$"):
        A.refresh_notebook(notebook, [stray])
    assert notebook.read_text() == text
    bare = tmp_path / "bare.ipynb"
    nbformat.write(new_notebook(cells=[new_markdown_cell('show_gif("maxpool")')]), bare)
    with pytest.raises(LabcnnError, match=r"bare\.ipynb: no code cell shows a GIF"):
        A.refresh_notebook(bare, [gif_dir / "maxpool.gif"])


def test_refresh_notebook_names_what_it_cannot_read(notebook, tmp_path, gif_dir):
    for name, content in (
        ("broken.ipynb", b'{"cells": ['),
        ("other.json", b'{"data": 1}'),
        ("picture.ipynb", (gif_dir / "maxpool.gif").read_bytes()),
    ):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(LabcnnError, match=f"{name} is not a Jupyter notebook"):
            A.refresh_notebook(tmp_path / name, [gif_dir / "maxpool.gif"])
    with pytest.raises(FileNotFoundError, match="missing.gif"):
        A.refresh_notebook(notebook, [tmp_path / "missing.gif"])
