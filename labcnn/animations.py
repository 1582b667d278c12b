"""Teaching GIFs for the lab's CNN: a 2x2 convolution (stride 1, padding 1) and a 2x2 max-pool.

The example inputs are small integers so that every frame can be checked by hand, and every
number drawn is computed by ``torch.nn.functional`` (``conv2d``, ``max_pool2d``): the same
operations as the lab's ``nn.Conv2d(kernel_size=2, stride=1, padding=1)`` and ``nn.MaxPool2d(2)``.
As in PyTorch, "convolution" is cross-correlation: the kernel is not flipped.

The layer settings (``KERNEL_SIZE``, ``STRIDE``, ``PADDING``, ``POOL_SIZE``) are
:mod:`labcnn.model`'s. Frames are drawn on a ``matplotlib.figure.Figure`` with the Agg canvas,
quantized to one palette and saved by Pillow as an endlessly looping GIF (``loop=0``); the same
call writes the same bytes. :func:`attach_gifs` embeds the GIFs in the report notebook.
"""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from labcnn.fileio import atomic_write, make_dir
from labcnn.model import KERNEL_SIZE, PADDING, POOL_SIZE, STRIDE  # the lab's layer settings, one home

# Examples, float32 holding small integers. The pooling input is 5x5, odd like the lab's 33x33
# conv1 output: floor((5 - 2) / 2) + 1 = 2, so its last row and column (and the 7) are dropped.
CONV_INPUT = torch.tensor([[1, 2, 0, 3], [0, 1, 2, 1], [3, 0, 1, 2], [2, 1, 0, 1]], dtype=torch.float32)
CONV_KERNEL = torch.tensor([[1, 0], [-1, 2]], dtype=torch.float32)
POOL_INPUT = torch.tensor(
    [[1, 3, 2, 0, 4], [0, 2, 5, 1, 3], [4, 1, 0, 2, 1], [2, 6, 3, 1, 0], [7, 0, 1, 5, 2]], dtype=torch.float32
)

# How long the finished output stays on screen before the GIF loops, in seconds: one GIF frame
# lasting hold_frames(fps) frame durations.
HOLD_SECONDS = 4
PALETTE_COLORS = 64  # one palette for every frame of a GIF; GIFs allow at most 256 colours
DPI = 80  # dots per inch of the GIF frames; figure sizes below are in inches
GREY, YELLOW, ORANGE, BLUE = "0.82", "#ffe680", (1.0, 0.55, 0.0, 0.3), "#1f4e9c"


class Step(NamedTuple):
    """One window position: output cell ``out`` = (row, col); ``window`` = (row, col) of the
    window's top-left cell in the drawn input grid (padded for convolution); ``values`` the
    float32 ``[k, k]`` input values under the window; ``result`` the output value (a float)."""

    out: tuple[int, int]
    window: tuple[int, int]
    values: torch.Tensor
    result: float


def hold_frames(fps: float) -> int:
    """Number of closing frames (at ``fps`` frames per second) that last ``HOLD_SECONDS``."""
    return max(1, round(HOLD_SECONDS * fps))


def conv_output() -> torch.Tensor:
    """``F.conv2d`` of ``CONV_INPUT`` with ``CONV_KERNEL`` (stride 1, padding 1): float32 ``[5, 5]``."""
    x, k = CONV_INPUT[None, None], CONV_KERNEL[None, None]
    return F.conv2d(x, k, stride=STRIDE, padding=PADDING)[0, 0]


def pool_output() -> torch.Tensor:
    """``F.max_pool2d(POOL_INPUT, 2)``: float32 ``[2, 2]``."""
    return F.max_pool2d(POOL_INPUT[None, None], POOL_SIZE)[0, 0]


def pool_winners() -> list[tuple[int, int]]:
    """(row, col) in ``POOL_INPUT`` of each window's maximum, in :func:`pool_steps` order, from
    ``F.max_pool2d(..., return_indices=True)`` (on a tie, the index PyTorch returns)."""
    _, index = F.max_pool2d(POOL_INPUT[None, None], POOL_SIZE, return_indices=True)
    return [divmod(i, POOL_INPUT.shape[1]) for i in index.flatten().tolist()]


def conv_padded_input() -> torch.Tensor:
    """``CONV_INPUT`` with its ring of zero padding, as the kernel sees it: float32 ``[6, 6]``."""
    return F.pad(CONV_INPUT, (PADDING,) * 4)


def _steps(grid: torch.Tensor, output: torch.Tensor, size: int, stride: int) -> list[Step]:
    rows, cols = output.shape
    return [
        Step((r, c), (r * stride, c * stride), grid[r * stride:r * stride + size, c * stride:c * stride + size],
             output[r, c].item())
        for r in range(rows) for c in range(cols)
    ]


def conv_steps() -> list[Step]:
    """The 25 kernel positions over the padded input, row by row; ``result`` is ``conv_output()[out]``."""
    return _steps(conv_padded_input(), conv_output(), KERNEL_SIZE, STRIDE)


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

    Returns ``update(window=None, shown=None, mark=None, outlined=())``, which redraws what
    changes between frames: ``window`` = (row, col, size) outlined in red, values hidden where
    not ``shown`` (indexed by (row, col)), the cell ``mark`` = (row, col) yellow, the cells in
    ``outlined`` ringed in blue with bold values. Artists are made once.
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
    rings = {(r, c): ax.add_patch(Rectangle((c + 0.1, r + 0.1), 0.8, 0.8, fill=False, edgecolor=BLUE,
                                            linewidth=2.5, visible=False, zorder=3)) for r, c in base}
    ax.text(0.5, 1.03, title, transform=ax.transAxes, ha="center", va="bottom", fontsize=12)
    ax.set(xlim=(-0.1, width + 0.1), ylim=(height + 0.1, -0.1), aspect="equal")
    ax.set_axis_off()

    def update(window=None, shown=None, mark=None, outlined=()):
        for rc, cell in cells.items():
            cell.set_facecolor(YELLOW if rc == mark else base[rc])
            texts[rc].set_visible(shown is None or bool(shown[rc]))
            texts[rc].set_fontweight("bold" if rc in outlined else "normal")
            texts[rc].set_color(BLUE if rc in outlined else "black")
            rings[rc].set_visible(rc in outlined)
        box.set_visible(window is not None)
        if window is not None:
            box.set_bounds(window[1], window[0], window[2], window[2])

    return update


def _size(grid: torch.Tensor) -> str:
    return "x".join(str(n) for n in grid.shape)


def _window(step: Step | None):
    return None if step is None else (*step.window, step.values.shape[0])


def _output_update(steps: list[Step], i: int) -> dict:
    """The output grid at frame ``i``: cells of steps ``0..i`` filled, the current one yellow."""
    done = {step.out for step in steps[:i + 1]}
    return dict(shown={step.out: step.out in done for step in steps}, mark=steps[i].out if i < len(steps) else None)


def _frame(fig: Figure) -> Image.Image:
    fig.canvas.draw()
    width, height = fig.canvas.get_width_height()
    return Image.frombuffer("RGBA", (width, height), fig.canvas.buffer_rgba(), "raw", "RGBA", 0, 1).convert("RGB")


def _write_gif(path, frames: list[Image.Image], durations: list[int]) -> None:
    """Save ``frames`` as an endlessly looping GIF, all quantized to one palette (so that Pillow
    stores only each frame's changed rectangle), through :func:`labcnn.fileio.atomic_write`."""
    strip = Image.new("RGB", (frames[0].width, frames[0].height * len(frames)))
    for i, frame in enumerate(frames):
        strip.paste(frame, (0, i * frame.height))
    palette = strip.quantize(colors=PALETTE_COLORS, method=Image.Quantize.MEDIANCUT)
    indexed = [frame.quantize(palette=palette, dither=Image.Dither.NONE) for frame in frames]
    atomic_write(path, lambda f: indexed[0].save(f, format="GIF", save_all=True, append_images=indexed[1:],
                                                 duration=durations, loop=0))


def _grid_gif(path, fps: float, figsize, widths, grids, updates, captions: list[str]) -> Path:
    """Draw ``len(captions) - 1`` step frames and one closing frame lasting ``HOLD_SECONDS``
    over one axes per ``grids`` entry (``_grid`` arguments: values, title, shaded). Frame ``i``
    calls each grid's update with ``updates(i)[j]`` and shows the text line ``captions[i]``."""
    fig = Figure(figsize=figsize, dpi=DPI)
    FigureCanvasAgg(fig)  # render with Agg whatever the session's backend: same pixels every run
    axes = fig.subplots(1, len(widths), width_ratios=widths)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.88, bottom=0.17, wspace=0.15)
    grid_updates = [_grid(ax, *grid) for ax, grid in zip(axes, grids)]
    caption = fig.text(0.5, 0.04, "", ha="center", family="monospace", fontsize=12)
    frames = []
    for i, text in enumerate(captions):
        for update, kwargs in zip(grid_updates, updates(i)):
            update(**kwargs)
        caption.set_text(text)
        frames.append(_frame(fig))
    frame_ms = int(1000 / fps)
    path = Path(path)
    make_dir(path.parent)
    _write_gif(path, frames, [frame_ms] * (len(frames) - 1) + [hold_frames(fps) * frame_ms])
    return path


def convolution_gif(path, fps: float = 2) -> Path:
    """Write the convolution GIF to ``path``: the 2x2 ``CONV_KERNEL`` sliding (stride 1) over
    the 4x4 ``CONV_INPUT`` and its zero padding, filling in the 5x5 output, one step per frame.

    ``fps`` is in frames per second. Frames: 25 steps, then the finished output with its size
    formula for ``HOLD_SECONDS``; loops forever. Returns ``path`` as a ``Path``.
    Raises :class:`labcnn.errors.WriteError` when the file cannot be written.
    """
    steps, output = conv_steps(), conv_output()
    padded, p = conv_padded_input(), PADDING
    ring = torch.ones(padded.shape, dtype=torch.bool)
    ring[p:-p, p:-p] = False
    grids = [(padded, f"input {_size(CONV_INPUT)}, zero padding grey", ring), (CONV_KERNEL, f"kernel {_size(CONV_KERNEL)}"),
             (output, f"output {_size(output)}")]
    size = f"floor(({CONV_INPUT.shape[0]} + 2*{p} - {KERNEL_SIZE}) / {STRIDE}) + 1 = {output.shape[0]}"
    captions = [conv_formula(s) for s in steps] + [f"output size {size}"]

    def updates(i):
        return [dict(window=_window(steps[i] if i < len(steps) else None)), {}, _output_update(steps, i)]

    return _grid_gif(path, fps, (8, 3.9), (6, 2.4, 5), grids, updates, captions)


def maxpool_gif(path, fps: float = 1) -> Path:
    """Write the max-pooling GIF to ``path``: a 2x2 window with stride 2 over the 5x5
    ``POOL_INPUT``, filling in the 2x2 output; the uncovered last row and column are grey. Each
    window's maximum (:func:`pool_winners`) is ringed in blue and bold from its step on, as is
    its copy in the output.

    ``fps`` is in frames per second. Frames: 4 steps, then the finished output with its size
    formula for ``HOLD_SECONDS``; loops forever. Returns ``path`` as a ``Path``.
    Raises :class:`labcnn.errors.WriteError` when the file cannot be written.
    """
    steps, output, winners = pool_steps(), pool_output(), pool_winners()
    covered = (output.shape[0] - 1) * POOL_SIZE + POOL_SIZE
    dropped = torch.ones(POOL_INPUT.shape, dtype=torch.bool)
    dropped[:covered, :covered] = False
    grids = [(POOL_INPUT, f"input {_size(POOL_INPUT)}, never pooled grey", dropped), (output, f"output {_size(output)}")]
    size = f"floor(({POOL_INPUT.shape[0]} - {POOL_SIZE}) / {POOL_SIZE}) + 1 = {output.shape[0]}"
    captions = [pool_formula(s) for s in steps] + [f"output size {size}"]

    def updates(i):
        window = _window(steps[i] if i < len(steps) else None)
        output_cells = _output_update(steps, i)
        filled = {rc for rc, shown in output_cells["shown"].items() if shown}
        return [dict(window=window, outlined=set(winners[:i + 1])), dict(output_cells, outlined=filled)]

    return _grid_gif(path, fps, (6, 3.9), (5, 2.6), grids, updates, captions)


def make_gifs(out_dir="Images") -> list[Path]:
    """Write ``convolution.gif`` and ``maxpool.gif`` into ``out_dir`` (created if missing); return
    their paths. The same call writes the same bytes. Raises :class:`labcnn.errors.WriteError`."""
    out_dir = Path(out_dir)
    return [convolution_gif(out_dir / "convolution.gif"), maxpool_gif(out_dir / "maxpool.gif")]


def attach_gifs(notebook_path, gif_paths) -> bool:
    """Embed each GIF in ``gif_paths`` into the notebook's markdown cells that show it.

    A cell shows ``NAME.gif`` with ``![alt text](attachment:NAME.gif)``; its nbformat attachment
    ``cell["attachments"]["NAME.gif"] = {"image/gif": <base64 of the file>}`` is set to the
    file's bytes, so the GIF travels with the notebook (Jupyter, Colab, VS Code, HTML export).
    Everything else is kept: the JSON is written back as Jupyter writes it (one-space indent,
    sorted keys, a final newline), through :func:`labcnn.fileio.atomic_write`, and only when an
    attachment changed; returns whether it did.

    Raises:
        ValueError: a GIF is shown by no markdown cell, or the notebook is not valid JSON.
        OSError: a file cannot be read. :class:`labcnn.errors.WriteError`: the notebook cannot
            be written (the previous file is kept).
    """
    notebook_path = Path(notebook_path)
    text = notebook_path.read_text(encoding="utf-8")
    notebook = json.loads(text)
    gifs = {Path(p).name: base64.b64encode(Path(p).read_bytes()).decode("ascii") for p in gif_paths}
    unused = set(gifs)
    for cell in notebook["cells"]:
        source = "".join(cell["source"])
        for name, data in gifs.items():
            if cell["cell_type"] == "markdown" and re.search(rf"\]\(attachment:{re.escape(name)}[\s)]", source):
                cell.setdefault("attachments", {})[name] = {"image/gif": data}
                unused.discard(name)
    if unused:
        raise ValueError(f"{notebook_path}: no markdown cell shows {sorted(unused)} as ![...](attachment:NAME)")
    new_text = json.dumps(notebook, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    if new_text == text:
        return False
    atomic_write(notebook_path, lambda f: f.write(new_text.encode("utf-8")))
    return True
