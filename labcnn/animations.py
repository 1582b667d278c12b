"""Teaching GIFs for the lab's CNN: a 2x2 convolution (stride 1, padding 1) and a 2x2 max-pool.

The example inputs are small integers so that every frame can be checked by hand, and every
number drawn is computed by ``torch.nn.functional`` (``conv2d``, ``max_pool2d``): the same
operations as the lab's ``nn.Conv2d(kernel_size=2, stride=1, padding=1)`` and ``nn.MaxPool2d(2)``.
As in PyTorch, "convolution" is cross-correlation: the kernel is not flipped.

Frames are drawn on a ``matplotlib.figure.Figure`` with the Agg canvas and written by
``PillowWriter`` (an endlessly looping GIF, ``loop=0``); the same call writes the same bytes.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from matplotlib.animation import FuncAnimation, PillowWriter
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

# The lab's layer settings, as in labcnn.model.conv_block (a test checks they agree).
CONV_KERNEL_SIZE, CONV_STRIDE, CONV_PADDING = 2, 1, 1
POOL_SIZE = 2  # MaxPool2d(2): a 2x2 window, stride 2 (the stride defaults to the window size)

# Examples, float32 holding small integers. The pooling input is 5x5, odd like the lab's 33x33
# conv1 output: floor((5 - 2) / 2) + 1 = 2, so its last row and column (and the 7) are dropped.
CONV_INPUT = torch.tensor([[1, 2, 0, 3], [0, 1, 2, 1], [3, 0, 1, 2], [2, 1, 0, 1]], dtype=torch.float32)
CONV_KERNEL = torch.tensor([[1, 0], [-1, 2]], dtype=torch.float32)
POOL_INPUT = torch.tensor(
    [[1, 3, 2, 0, 4], [0, 2, 5, 1, 3], [4, 1, 0, 2, 1], [2, 6, 3, 1, 0], [7, 0, 1, 5, 2]], dtype=torch.float32
)

# Frames after the last step that show the finished output. They are identical, so Pillow
# stores them as one GIF frame lasting HOLD_FRAMES frame durations.
HOLD_FRAMES = 3
DPI = 80  # dots per inch of the GIF frames; figure sizes below are in inches
GREY, YELLOW, ORANGE = "0.82", "#ffe680", (1.0, 0.55, 0.0, 0.3)


class Step(NamedTuple):
    """One window position: output cell ``out`` = (row, col); ``window`` = (row, col) of the
    window's top-left cell in the drawn input grid (padded for convolution); ``values`` the
    float32 ``[k, k]`` input values under the window; ``result`` the output value (a float)."""

    out: tuple[int, int]
    window: tuple[int, int]
    values: torch.Tensor
    result: float


def output_size(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Output side length of a convolution or pooling: ``floor((size + 2*padding - kernel) / stride) + 1``."""
    return (size + 2 * padding - kernel) // stride + 1


def conv_output() -> torch.Tensor:
    """``F.conv2d`` of ``CONV_INPUT`` with ``CONV_KERNEL`` (stride 1, padding 1): float32 ``[5, 5]``."""
    x, k = CONV_INPUT[None, None], CONV_KERNEL[None, None]
    return F.conv2d(x, k, stride=CONV_STRIDE, padding=CONV_PADDING)[0, 0]


def pool_output() -> torch.Tensor:
    """``F.max_pool2d(POOL_INPUT, 2)``: float32 ``[2, 2]``."""
    return F.max_pool2d(POOL_INPUT[None, None], POOL_SIZE)[0, 0]


def conv_padded_input() -> torch.Tensor:
    """``CONV_INPUT`` with its ring of zero padding, as the kernel sees it: float32 ``[6, 6]``."""
    return F.pad(CONV_INPUT, (CONV_PADDING,) * 4)


def _steps(grid: torch.Tensor, output: torch.Tensor, size: int, stride: int) -> list[Step]:
    rows, cols = output.shape
    return [
        Step((r, c), (r * stride, c * stride), grid[r * stride:r * stride + size, c * stride:c * stride + size],
             output[r, c].item())
        for r in range(rows) for c in range(cols)
    ]


def conv_steps() -> list[Step]:
    """The 25 kernel positions over the padded input, row by row; ``result`` is ``conv_output()[out]``."""
    return _steps(conv_padded_input(), conv_output(), CONV_KERNEL_SIZE, CONV_STRIDE)


def pool_steps() -> list[Step]:
    """The 4 pooling windows over ``POOL_INPUT``, row by row; ``result`` is ``pool_output()[out]``."""
    return _steps(POOL_INPUT, pool_output(), POOL_SIZE, POOL_SIZE)


def _num(value: float, bare: bool = False) -> str:
    """``value`` as an integer-looking string, negatives in parentheses unless ``bare``."""
    text = f"{value + 0.0:g}"  # + 0.0 turns -0.0 into 0.0
    return f"({text})" if value < 0 and not bare else text


def conv_formula(step: Step) -> str:
    """The sum of products of one step, e.g. ``out[0, 0] = 0*1 + 0*0 + 0*(-1) + 1*2 = 2``."""
    pairs = zip(step.values.flatten().tolist(), CONV_KERNEL.flatten().tolist())
    return f"out{list(step.out)} = " + " + ".join(f"{_num(a)}*{_num(b)}" for a, b in pairs) + f" = {step.result:g}"


def pool_formula(step: Step) -> str:
    """The maximum of one step, e.g. ``out[0, 0] = max(1, 3, 0, 2) = 3``."""
    values = ", ".join(_num(v) for v in step.values.flatten().tolist())
    return f"out{list(step.out)} = max({values}) = {step.result:g}"


def _grid(ax, values, title, shaded=None):
    """Draw ``values`` ([H, W]) on ``ax`` as a table of cells, grey where ``shaded`` ([H, W] bool).

    Returns ``update(window=None, shown=None, mark=None)``, which redraws what changes between
    frames: ``window`` = (row, col, size) outlined in red, values hidden where not ``shown``
    (indexed by (row, col)), the cell ``mark`` = (row, col) yellow. Artists are made once.
    """
    grid = values.tolist()
    height, width = len(grid), len(grid[0])
    base = {(r, c): GREY if shaded is not None and shaded[r, c] else "white"
            for r in range(height) for c in range(width)}
    cells = {(r, c): ax.add_patch(Rectangle((c, r), 1, 1, facecolor=face, edgecolor="0.35"))
             for (r, c), face in base.items()}
    texts = {(r, c): ax.text(c + 0.5, r + 0.5, _num(grid[r][c], bare=True), ha="center", va="center", fontsize=13)
             for r, c in base}
    box = ax.add_patch(Rectangle((0, 0), 1, 1, facecolor=ORANGE, edgecolor="red", linewidth=3, visible=False))
    ax.text(0.5, 1.03, title, transform=ax.transAxes, ha="center", va="bottom", fontsize=12)
    ax.set(xlim=(-0.1, width + 0.1), ylim=(height + 0.1, -0.1), aspect="equal")
    ax.set_axis_off()

    def update(window=None, shown=None, mark=None):
        for rc, cell in cells.items():
            cell.set_facecolor(YELLOW if rc == mark else base[rc])
            texts[rc].set_visible(shown is None or bool(shown[rc]))
        box.set_visible(window is not None)
        if window is not None:
            box.set_bounds(window[1], window[0], window[2], window[2])

    return update


def _window(step: Step | None):
    return None if step is None else (*step.window, step.values.shape[0])


def _output_update(steps: list[Step], i: int) -> dict:
    """The output grid at frame ``i``: cells of steps ``0..i`` filled, the current one yellow."""
    done = {step.out for step in steps[:i + 1]}
    return dict(shown={step.out: step.out in done for step in steps}, mark=steps[i].out if i < len(steps) else None)


def _grid_gif(path, fps: float, figsize, widths, grids, updates, captions: list[str]) -> Path:
    """Animate ``len(captions) - 1`` steps plus ``HOLD_FRAMES`` over one axes per ``grids`` entry
    (``_grid`` arguments: values, title, shaded). Frame ``i`` calls each grid's update with
    ``updates(i)[j]`` and shows the text line ``captions[min(i, steps)]``."""
    fig = Figure(figsize=figsize, dpi=DPI)
    FigureCanvasAgg(fig)  # render with Agg whatever the session's backend: same pixels every run
    axes = fig.subplots(1, len(widths), width_ratios=widths)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.88, bottom=0.17, wspace=0.15)
    grid_updates = [_grid(ax, *grid) for ax, grid in zip(axes, grids)]
    caption = fig.text(0.5, 0.04, "", ha="center", family="monospace", fontsize=12)
    steps = len(captions) - 1

    def draw(i):
        for update, kwargs in zip(grid_updates, updates(i)):
            update(**kwargs)
        caption.set_text(captions[min(i, steps)])

    animation = FuncAnimation(fig, draw, frames=steps + HOLD_FRAMES, cache_frame_data=False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    animation.save(path, writer=PillowWriter(fps=fps))  # PillowWriter saves with loop=0
    return path


def convolution_gif(path, fps: float = 2) -> Path:
    """Write the convolution GIF to ``path``: the 2x2 ``CONV_KERNEL`` sliding (stride 1) over
    the 4x4 ``CONV_INPUT`` and its zero padding, filling in the 5x5 output, one step per frame.

    ``fps`` is in frames per second. Frames: 25 steps, then ``HOLD_FRAMES`` of the finished
    output (stored by Pillow as one longer frame). Returns ``path`` as a ``Path``.
    """
    steps, output = conv_steps(), conv_output()
    padded, p = conv_padded_input(), CONV_PADDING
    ring = torch.ones(padded.shape, dtype=torch.bool)
    ring[p:-p, p:-p] = False
    grids = [(padded, "input 4x4, zero padding grey", ring), (CONV_KERNEL, "kernel 2x2"), (output, "output 5x5")]
    size = f"floor(({CONV_INPUT.shape[0]} + 2*{p} - {CONV_KERNEL_SIZE}) / {CONV_STRIDE}) + 1 = {output.shape[0]}"
    captions = [conv_formula(s) for s in steps] + [f"output size {size}"]

    def updates(i):
        return [dict(window=_window(steps[i] if i < len(steps) else None)), {}, _output_update(steps, i)]

    return _grid_gif(path, fps, (8, 3.9), (6, 2.4, 5), grids, updates, captions)


def maxpool_gif(path, fps: float = 1) -> Path:
    """Write the max-pooling GIF to ``path``: a 2x2 window with stride 2 over the 5x5
    ``POOL_INPUT``, filling in the 2x2 output; the uncovered last row and column are grey.

    ``fps`` is in frames per second. Frames: 4 steps, then ``HOLD_FRAMES`` of the finished
    output (stored by Pillow as one longer frame). Returns ``path`` as a ``Path``.
    """
    steps, output = pool_steps(), pool_output()
    covered = (output.shape[0] - 1) * POOL_SIZE + POOL_SIZE
    dropped = torch.ones(POOL_INPUT.shape, dtype=torch.bool)
    dropped[:covered, :covered] = False
    grids = [(POOL_INPUT, "input 5x5, never pooled grey", dropped), (output, "output 2x2")]
    size = f"floor(({POOL_INPUT.shape[0]} - {POOL_SIZE}) / {POOL_SIZE}) + 1 = {output.shape[0]}"
    captions = [pool_formula(s) for s in steps] + [f"output size {size}"]

    def updates(i):
        return [dict(window=_window(steps[i] if i < len(steps) else None)), _output_update(steps, i)]

    return _grid_gif(path, fps, (6, 3.9), (5, 2.6), grids, updates, captions)


def make_gifs(out_dir="Images") -> list[Path]:
    """Write ``convolution.gif`` and ``maxpool.gif`` into ``out_dir`` (created if missing); return their paths."""
    out_dir = Path(out_dir)
    return [convolution_gif(out_dir / "convolution.gif"), maxpool_gif(out_dir / "maxpool.gif")]
