"""The lab's GIFs of a 2x2 convolution (cross-correlation, as in PyTorch) and a 2x2 max-pool."""

import base64
import io
import json
import re
from collections import namedtuple
from itertools import zip_longest
from pathlib import Path

import matplotlib.style
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from labcnn import ConfigError, LabcnnError
from labcnn.fileio import atomic_write, make_dir, read_notebook
from labcnn.model import KERNEL_SIZE, PADDING, POOL_SIZE, STRIDE  # the lab's layers, one home

# Small integers to check by hand; POOL_INPUT is odd like conv1's 33x33 output: pooling drops a row.
CONV_INPUT = torch.tensor([[1, 2, 0, 3], [0, 1, 2, 1], [3, 0, 1, 2], [2, 1, 0, 1]]).float()
CONV_KERNEL = torch.tensor([[1, 0], [-1, 2]]).float()
POOL_INPUT = torch.tensor(
    [[1, 3, 2, 0, 4], [0, 2, 5, 1, 3], [4, 1, 0, 2, 1], [2, 6, 3, 1, 0], [7, 0, 1, 5, 2]]
).float()
GIFS = {"convolution": 500, "maxpool": 1000}  # name: milliseconds per window position
HOLD_MS = 4000  # the finished output stays this long before the GIF loops
PALETTE_COLORS = 64  # one palette for all frames: Pillow then stores only what changes
GREY, YELLOW, ORANGE, BLUE = "0.82", "#ffe680", (1.0, 0.55, 0.0, 0.3), "#1f4e9c"
SHOW_GIF_CALL = re.compile(r"""\bshow_gif\(\s*["'](\w+)["']\s*\)""")
Step = namedtuple("Step", "out window values result")  # window: top-left cell, padded input
HTML_GIF = '<img src="data:image/gif;base64,{}"/>'  # what nbconvert and GitHub show


def conv_output() -> torch.Tensor:
    """``F.conv2d(CONV_INPUT, CONV_KERNEL)`` with the lab's stride and padding: float32 [5, 5]."""
    return F.conv2d(CONV_INPUT[None], CONV_KERNEL[None, None], stride=STRIDE, padding=PADDING)[0]


def pool_output() -> torch.Tensor:
    """``F.max_pool2d(POOL_INPUT, POOL_SIZE)``: float32 [2, 2]."""
    return F.max_pool2d(POOL_INPUT[None], POOL_SIZE)[0]


def pool_winners() -> list[tuple[int, int]]:
    """(row, col) in ``POOL_INPUT`` of each window's maximum (``return_indices``), step order."""
    _, index = F.max_pool2d(POOL_INPUT[None], POOL_SIZE, return_indices=True)
    return [divmod(i, POOL_INPUT.shape[1]) for i in index.flatten().tolist()]


def _steps(grid: torch.Tensor, output: torch.Tensor, k: int, stride: int) -> list[Step]:
    windows = grid.unfold(0, k, stride).unfold(1, k, stride)  # [rows, cols, k, k]
    return [
        Step((r, c), (r * stride, c * stride), windows[r, c], output[r, c].item())
        for r in range(len(output))
        for c in range(len(output))
    ]


def conv_steps() -> list[Step]:
    """The 25 kernel positions over the padded [6, 6] input, row by row."""
    return _steps(F.pad(CONV_INPUT, (PADDING,) * 4), conv_output(), KERNEL_SIZE, STRIDE)


def pool_steps() -> list[Step]:
    """The 4 pooling windows over POOL_INPUT, row by row."""
    return _steps(POOL_INPUT, pool_output(), POOL_SIZE, POOL_SIZE)


def _nums(values: torch.Tensor) -> list[str]:
    return [f"({v:g})" if v < 0 else f"{v + 0.0:g}" for v in values.flatten().tolist()]  # no -0


def conv_formula(step: Step) -> str:
    """One step's sum of products, e.g. ``out[0, 0] = 0*1 + 0*0 + 0*(-1) + 1*2 = 2``."""
    products = " + ".join(
        f"{a}*{b}" for a, b in zip(_nums(step.values), _nums(CONV_KERNEL), strict=False)
    )
    return f"out{list(step.out)} = {products} = {step.result:g}"


def pool_formula(step: Step) -> str:
    """One step's maximum, e.g. ``out[0, 0] = max(1, 3, 0, 2) = 3``."""
    return f"out{list(step.out)} = max({', '.join(_nums(step.values))}) = {step.result:g}"


NUMBER = dict(ha="center", va="center", fontsize=13)  # a cell's value
WINNER = dict(NUMBER, fontweight="bold", color=BLUE)  # a pooling window's maximum
GRID = dict(left=0.02, right=0.98, top=0.88, bottom=0.17, wspace=0.15)  # the panels' margins
CAPTION = dict(ha="center", family="monospace", fontsize=12)  # the formula under the panels


def _panel(ax, values, title, shown=None, grey=None, window=None, mark=None, ringed=()) -> None:
    """Draw ``values`` [H, W]: numbers ``shown`` (None: all), ``window`` (row, col, k) in red."""
    for (r, c), v in np.ndenumerate(values.numpy()):  # add_artist: add_patch autoscales, slowly
        face = YELLOW if (r, c) == mark else GREY if grey is not None and grey[r, c] else "white"
        ax.add_artist(Rectangle((c, r), 1, 1, facecolor=face, edgecolor="0.35"))
        if shown is None or (r, c) in shown:  # text has zorder 3, above every cell
            ax.text(c + 0.5, r + 0.5, f"{v + 0.0:g}", **(WINNER if (r, c) in ringed else NUMBER))
        if (r, c) in ringed:
            ring = Rectangle((c + 0.1, r + 0.1), 0.8, 0.8, fill=False, ec=BLUE, lw=2.5, zorder=3)
            ax.add_artist(ring)
    if window:
        ax.add_artist(Rectangle(window[1::-1], window[2], window[2], fc=ORANGE, ec="red", lw=3))
    ax.text(0.5, 1.03, title, transform=ax.transAxes, ha="center", va="bottom", fontsize=12)
    ax.set(xlim=(-0.1, values.shape[1] + 0.1), ylim=(len(values) + 0.1, -0.1), aspect="equal")
    ax.set_axis_off()


def _layout(name: str) -> dict:
    """What GIF ``name`` draws: its steps, output, input panels, size formula and figure shape."""
    if name == "convolution":
        n, pad = len(CONV_INPUT), (PADDING,) * 4
        padded = dict(values=F.pad(CONV_INPUT, pad), grey=F.pad(0 * CONV_INPUT, pad, value=1))
        inputs = [
            dict(padded, title=f"input {n}x{n}, zero padding grey"),
            dict(values=CONV_KERNEL, title=f"kernel {KERNEL_SIZE}x{KERNEL_SIZE}"),
        ]
        size = f"floor(({n} + 2*{PADDING} - {KERNEL_SIZE}) / {STRIDE}) + 1"
        return dict(
            steps=conv_steps(),
            output=conv_output(),
            inputs=inputs,
            size=size,
            formula=conv_formula,
            figsize=(8, 3.9),
            widths=(6, 2.4, 5),
            winners=(),
        )
    n, output = len(POOL_INPUT), pool_output()
    reached = len(output) * POOL_SIZE  # the stride is the window: rows and columns pooled
    grey = F.pad(torch.zeros(reached, reached), (0, n - reached) * 2, value=1)
    inputs = [dict(values=POOL_INPUT, title=f"input {n}x{n}, never pooled grey", grey=grey)]
    size = f"floor(({n} - {POOL_SIZE}) / {POOL_SIZE}) + 1"
    return dict(
        steps=pool_steps(),
        output=output,
        inputs=inputs,
        size=size,
        formula=pool_formula,
        figsize=(6, 3.9),
        widths=(5, 2.6),
        winners=pool_winners(),
    )


def _frame(layout: dict, i: int) -> np.ndarray:
    """Frame ``i`` (after step ``i``; the last: the finished output) as uint8 [H, W, 3]."""
    steps, output, winners = layout["steps"], layout["output"], layout["winners"]
    step = steps[i] if i < len(steps) else None
    fig = FigureCanvasAgg(Figure(figsize=layout["figsize"], dpi=80)).figure  # any backend
    widths = layout["widths"]
    axes = fig.subplots(1, len(widths), width_ratios=widths, gridspec_kw=GRID)
    caption = layout["formula"](step) if step else f"output size {layout['size']} = {len(output)}"
    fig.text(0.5, 0.04, caption, **CAPTION)
    done = {s.out for s in steps[: i + 1]}
    last = dict(values=output, title=f"output {len(output)}x{len(output)}", shown=done)
    panels = [*layout["inputs"], dict(last, mark=step and step.out, ringed=winners and done)]
    window = step and (*step.window, len(step.values))
    panels[0] = dict(panels[0], window=window, ringed=set(winners[: i + 1]))
    for ax, panel in zip(axes, panels, strict=True):
        _panel(ax, **panel)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3]


def gif_bytes(name: str) -> bytes:
    """GIF ``name`` (a key of GIFS, else ConfigError): a frame per window position, then the end."""
    if name not in GIFS:
        raise ConfigError(f"no GIF named {name!r}: expected one of {', '.join(GIFS)}")
    layout = _layout(name)
    steps = len(layout["steps"])
    with matplotlib.style.context("default"):  # the same pixels whatever the session's style
        frames = [_frame(layout, i) for i in range(steps + 1)]
    # One palette for all frames, so that Pillow stores only the pixels that change.
    palette = Image.fromarray(np.concatenate(frames)).quantize(PALETTE_COLORS, Image.MEDIANCUT)
    indexed = [Image.fromarray(f).quantize(palette=palette, dither=Image.NONE) for f in frames]
    buffer = io.BytesIO()
    durations = [GIFS[name]] * steps + [HOLD_MS]
    indexed[0].save(
        buffer, "GIF", save_all=True, append_images=indexed[1:], duration=durations, loop=0
    )
    return buffer.getvalue()


def make_gifs(out_dir="Images") -> list[Path]:
    """Write ``NAME.gif`` for each GIF into ``out_dir`` (atomically; WriteError); return paths."""
    folder = make_dir(out_dir)
    paths = []
    for name in GIFS:
        data = gif_bytes(name)
        paths.append(folder / f"{name}.gif")
        atomic_write(paths[-1], lambda f, data=data: f.write(data))
    return paths


def show_gif(name: str) -> None:
    """GIF ``name`` as an ``image/gif`` output, and as HTML for nbconvert, which skips gif."""
    from IPython.display import display  # notebooks only

    data = base64.b64encode(gif_bytes(name)).decode("ascii")
    display({"image/gif": data, "text/html": HTML_GIF.format(data)}, raw=True)


def refresh_notebook(notebook_path, gif_paths) -> bool:
    """Set a code cell's n-th ``image/gif`` output to NAME.gif (of ``gif_paths``) of its n-th call
    ``show_gif("NAME")``; write as Jupyter does, only on a change; return whether there was one.
    LabcnnError: not a notebook, or no code cell shows a GIF."""
    path = Path(notebook_path)
    gifs = {Path(p).stem: base64.b64encode(Path(p).read_bytes()).decode("ascii") for p in gif_paths}
    notebook = read_notebook(path)
    cells = [cell for cell in notebook["cells"] if cell.get("cell_type") == "code"]
    shown, changed = False, False
    for cell in cells:
        outputs = [out for out in cell.get("outputs", []) if "image/gif" in out.get("data", {})]
        for name, output in zip_longest(SHOW_GIF_CALL.findall("".join(cell["source"])), outputs):
            shown |= name in gifs
            new = {"image/gif": gifs.get(name), "text/html": [HTML_GIF.format(gifs.get(name))]}
            if name in gifs and output is not None and {**output["data"], **new} != output["data"]:
                output["data"], changed = {**output["data"], **new}, True
    if not shown:
        raise LabcnnError(
            f'{path}: no code cell shows a GIF; expected a call show_gif("NAME") '
            f"with NAME one of: {', '.join(sorted(gifs)) or '(no GIF given)'}"
        )
    if changed:
        text = json.dumps(notebook, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
        atomic_write(path, lambda f: f.write(text.encode("utf-8")))
    return changed
