"""The report's figures, drawn without pyplot (accuracies are fractions; losses nats per image)."""

import importlib.util
import io
from pathlib import Path

import matplotlib
import torch
from matplotlib.figure import Figure

from labcnn import ConfigError
from labcnn.data import CLASSES
from labcnn.fileio import atomic_write, make_dir, warn_once
from labcnn.model import COLLAPSE_NORM, filter_norms

METRICS = {
    "loss": ("loss", "cross-entropy loss (nats per image)", 1.0),
    "accuracy": ("acc", "top-1 accuracy (%)", 100.0),
}
SPLITS = {
    "train": "train (running mean over the epoch, train mode)",  # not an evaluation
    "val": "validation (eval mode)",
    "test": "test (eval mode)",
}
RED = "firebrick"  # collapsed filters


def usable_backend() -> None:
    """Fall back to Agg, with one warning, when the backend named by ``MPLBACKEND`` cannot be
    imported (``module://matplotlib_inline.backend_inline`` inherited from Jupyter by a
    process whose environment lacks it): figures are written to files either way."""
    backend = str(matplotlib.rcParams._get("backend"))
    module = backend.removeprefix("module://") if backend.startswith("module://") else None
    if module and importlib.util.find_spec(module.split(".")[0]) is None:
        warn_once(f"matplotlib backend {backend!r} (MPLBACKEND) cannot be imported: using Agg")
        matplotlib.use("Agg")


def save(fig: Figure, path) -> None:
    """Write ``fig`` as PNG to ``path`` atomically, making its folder; WriteError names the path."""
    make_dir(Path(path).parent)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))


def save_curves(folder, history: list[dict]) -> None:
    """Write ``loss.png`` and ``accuracy.png`` of ``history`` into ``folder``."""
    for metric in METRICS:
        save(plot_curves(history, metric), Path(folder) / f"{metric}.png")


def show(fig: Figure, alt: str) -> None:
    """Display ``fig`` in a notebook as a PNG with ``alt`` text for screen readers."""
    from IPython.display import Image, display  # IPython exists where notebooks run

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    display(Image(data=buffer.getvalue(), format="png", metadata={"alt": alt}))


def plot_curves(history: list[dict], metric: str = "loss") -> Figure:
    """One run's ``metric`` (``"loss"`` or ``"accuracy"``) per epoch, each split a line."""
    return plot_compare({f"{metric.capitalize()} per epoch": history}, metric)


def plot_compare(runs: dict[str, list[dict]], metric: str = "accuracy") -> Figure:
    """A panel per ``{title: history}``, one y scale; ConfigError: no history, metric unknown."""
    if metric not in METRICS or not runs or not all(runs.values()):
        raise ConfigError(f"expected histories and metric 'loss' or 'accuracy', got {metric!r}")
    key, ylabel, scale = METRICS[metric]
    fig = Figure(figsize=(1.2 + 5.2 * len(runs), 4.2), layout="constrained")
    axes = fig.subplots(1, len(runs), sharey=True, squeeze=False)[0]
    for ax, (title, history) in zip(axes, runs.items(), strict=False):
        for split in (s for s in SPLITS if f"{s}_{key}" in history[0]):
            ax.plot(
                [r["epoch"] for r in history],
                [r[f"{split}_{key}"] * scale for r in history],
                ".-",
                label=SPLITS[split],
            )
        ax.xaxis.get_major_locator().set_params(integer=True, min_n_ticks=1)  # whole epochs
        ax.set(title=title, xlabel="epoch", ylabel=ylabel)
        ax.legend(fontsize=7)
    return fig


def _tiles(nrows: int, ncols: int, width: float, height: float) -> tuple[Figure, list]:
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(
        nrows, ncols, squeeze=False, subplot_kw=dict(xticks=[], yticks=[], frame_on=False)
    )


def plot_examples(images: torch.Tensor, labels: torch.Tensor, per_class: int = 4) -> Figure:
    """A row per class (named), its first ``per_class`` images in stored order (fewer: blanks)."""
    fig, axes = _tiles(len(CLASSES), per_class, 1.1 * per_class + 1.2, 1.1 * len(CLASSES))
    for c, row in enumerate(axes):
        row[0].set_ylabel(CLASSES[c], rotation=0, ha="right", va="center")
        for ax, i in zip(row, (labels.cpu() == c).nonzero().flatten().tolist(), strict=False):
            ax.imshow(images[i].permute(1, 2, 0).cpu().numpy())
    return fig


def plot_per_class(per_class_accuracy) -> Figure:
    """A bar per class: its test accuracy (10 fractions) in percent."""
    ax = Figure(figsize=(6.4, 3.8), layout="constrained").subplots()  # the layout keeps names whole
    bars = ax.barh(CLASSES, [100 * float(a) for a in per_class_accuracy], color="steelblue")
    ax.bar_label(bars, fmt="%.1f", padding=2, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="top-1 accuracy (%)", xlim=(0, 108), title="Test accuracy per class")
    return ax.figure


def plot_confusion(confusion: torch.Tensor) -> Figure:
    """The confusion matrix (int64 ``[10, 10]``, rows true class, columns predicted), counted."""
    ax = Figure(figsize=(7.5, 6.5), layout="constrained").subplots()
    ax.figure.colorbar(ax.imshow(confusion.cpu().numpy(), cmap="Blues"), ax=ax, label="test images")
    ax.set_xticks(range(10), CLASSES, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(10), CLASSES)
    ax.set(xlabel="predicted class", ylabel="true class", title="Confusion matrix (test set)")
    for k, n in enumerate(confusion.flatten().tolist()):  # row by row
        ax.text(
            k % 10,
            k // 10,
            n,
            ha="center",
            va="center",
            fontsize=7,
            color="white" if n > confusion.max() / 2 else "black",
        )
    return ax.figure


def plot_confident_errors(images, labels, predictions, confidence, count: int = 16) -> Figure:
    """The ``count`` most confident errors (``confidence``: float [N]; ties: lower index first)."""
    wrong = (predictions != labels).nonzero().flatten()
    chosen = wrong[confidence.detach()[wrong].sort(descending=True, stable=True).indices[:count]]
    rows = max(1, -(-len(chosen) // 8))  # 8 images a row, rounded up
    fig, axes = _tiles(rows, 8, 10.8, 1.6 * rows + 0.4)
    for ax, i in zip(axes.flat, chosen.tolist(), strict=False):
        ax.imshow(images[i].permute(1, 2, 0).cpu().numpy())
        ax.set_title(
            f"{CLASSES[labels[i]]}\n-> {CLASSES[predictions[i]]} ({confidence[i]:.1%})", fontsize=8
        )
    fig.suptitle(f"Most confident errors, true -> predicted (p): {len(chosen)} of {len(wrong)}")
    return fig


def plot_filters(weight: torch.Tensor, ncols: int = 8) -> Figure:
    """``weight``'s filters (float [C_out, C_in, k, k]) on one colour scale; ConfigError unless
    4-D."""
    norms, w = filter_norms(weight), weight.detach().float().cpu()
    mosaics = torch.cat(torch.nn.functional.pad(w, (0, 1), value=torch.nan).unbind(1), 2)[..., :-1]
    m = w.abs().max().item() or 1.0  # an all-zero layer still gets a symmetric scale
    nrows, collapsed = -(-len(w) // ncols), (norms < COLLAPSE_NORM).tolist()
    fig, axes = _tiles(nrows, ncols, 1.45 * ncols + 1, nrows * (0.2 * w.shape[2] + 0.5) + 0.6)
    for i, (ax, mosaic) in enumerate(
        zip(axes.flat, mosaics, strict=False)
    ):  # channels side by side, NaN gaps
        image = ax.imshow(mosaic.numpy(), cmap="RdBu_r", vmin=-m, vmax=m)
        ax.set_title(f"{i}: {norms[i]:.2g}", fontsize=8, color=RED if collapsed[i] else "black")
        ax.spines[:].set(color=RED, linestyle="--", linewidth=2)
        ax.set_frame_on(collapsed[i])  # the dashed frame marks the collapsed
    fig.colorbar(image, ax=axes, label="weight", shrink=0.9)
    fig.suptitle(f"L2 norm < {COLLAPSE_NORM:g} in red: collapsed ({sum(collapsed)} of {len(w)})")
    return fig
