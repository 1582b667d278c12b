"""Figures for the report, drawn with matplotlib's object API (no display needed).

Every ``plot_*`` function returns a ``matplotlib.figure.Figure``. With ``path`` it also writes
the figure as PNG through :func:`labcnn.fileio.atomic_write` (the folder is made if missing);
a failed write raises :class:`labcnn.errors.WriteError`, left for the caller to handle.
Images are uint8 ``[N, 3, H, W]`` tensors; labels and predictions integer ``[N]`` class indices.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from labcnn.data import CLASSES
from labcnn.fileio import atomic_write, make_dir
from labcnn.model import COLLAPSE_NORM, filter_norms

METRICS = {"loss": ("loss", "cross-entropy loss (nats per image)"), "accuracy": ("acc", "top-1 accuracy (%)")}
SPLITS = {  # history key prefix -> legend label (the train figures are not an evaluation)
    "train": "train (running mean over the epoch, train mode)",
    "val": "validation (eval mode)",
    "test": "test (eval mode)",
}
OVERLAY_STYLES = {"train": ":", "val": "--", "test": "-"}
ERROR_COLOR = "firebrick"


def save(fig: Figure, path, dpi: int = 100) -> Figure:
    """Write ``fig`` as PNG to ``path`` (skipped when ``path`` is None) and return it.

    Raises:
        WriteError: the folder cannot be made or the file cannot be written; a previous file at
            ``path`` is kept.
    """
    if path is not None:
        path = Path(path)
        make_dir(path.parent)
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight"))
    return fig


def _metric(metric: str) -> tuple[str, str, float]:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: expected one of {sorted(METRICS)}")
    key, ylabel = METRICS[metric]
    return key, ylabel, 100.0 if metric == "accuracy" else 1.0


def _draw_curves(ax, history: list[dict], metric: str, run: str | None = None, color=None) -> None:
    """Draw every split of ``history`` that has ``metric`` on ``ax``; ``run`` prefixes the labels
    and, with ``color``, gives one colour per run and one line style per split."""
    if not history:
        raise ValueError("empty history: nothing to plot")
    key, ylabel, scale = _metric(metric)
    epochs = [r["epoch"] for r in history]
    for split, label in SPLITS.items():
        if f"{split}_{key}" in history[0]:
            style = dict(color=color, linestyle=OVERLAY_STYLES[split]) if color else {}
            ax.plot(epochs, [r[f"{split}_{key}"] * scale for r in history], marker=".",
                    label=label if run is None else f"{run}: {label}", **style)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # whole epochs, even on 1-epoch runs
    ax.set(xlabel="epoch", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_curves(history: list[dict], metric: str = "loss", path=None, title: str | None = None) -> Figure:
    """Train, validation (when present) and test ``metric`` per epoch of one run.

    ``history``: :func:`labcnn.train.fit`'s list of per-epoch dicts (``epoch``, ``train_loss``,
    ``train_acc``, ``test_loss``, ``test_acc``, optionally ``val_loss``, ``val_acc``; accuracies
    as fractions). ``metric``: ``"loss"`` (nats per image) or ``"accuracy"`` (drawn in percent).
    The train curve is the running mean over each epoch's batches in train mode, not an
    evaluation. Epoch ticks are whole numbers. Raises ValueError for an unknown metric or an
    empty history.
    """
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    _draw_curves(ax, history, metric)
    ax.set_title(title or f"{metric.capitalize()} per epoch")
    return save(fig, path)


def plot_compare(histories: dict[str, list[dict]], metric: str = "accuracy", overlay: bool = False,
                 path=None, title: str | None = None) -> Figure:
    """Several runs' curves for comparison, e.g. ``{"lab recipe": lab, "improved recipe": improved}``
    loaded from ``results/*.json``.

    Each history is as for :func:`plot_curves`. Side by side (one panel per run, in the dict's
    order, shared y axis), or with ``overlay`` on one panel: one colour per run, line style per
    split (train dotted, validation dashed, test solid). Raises ValueError for no runs, an
    unknown metric or an empty history.
    """
    if not histories:
        raise ValueError("no histories to compare")
    panels = 1 if overlay else len(histories)
    fig = Figure(figsize=(6.4 if overlay else 5.2 * panels, 4.4), layout="constrained")
    axes = fig.subplots(1, panels, sharey=True, squeeze=False)[0]
    for i, (run, history) in enumerate(histories.items()):
        if overlay:
            _draw_curves(axes[0], history, metric, run=run, color=f"C{i}")
        else:
            _draw_curves(axes[i], history, metric)
            axes[i].set_title(run)
    fig.suptitle(title or f"{metric.capitalize()} per epoch: " + " vs ".join(histories))
    return save(fig, path)


def plot_images(images: torch.Tensor, titles: list[str], ncols: int = 8, path=None, colors=None,
                title: str | None = None) -> Figure:
    """A grid of uint8 ``[N, 3, H, W]`` images, ``ncols`` per row, with one title each (in
    ``colors[i]`` when given) and an optional figure ``title``."""
    nrows = max(1, -(-len(images) // ncols))
    fig = Figure(figsize=(1.35 * ncols, 1.6 * nrows + (0.4 if title else 0)), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i < len(images):
            ax.imshow(images[i].permute(1, 2, 0).cpu().numpy())
            ax.set_title(titles[i], fontsize=8, color=colors[i] if colors else "black")
    if title:
        fig.suptitle(title, fontsize=10)
    return save(fig, path)


def plot_examples(images, labels, per_class: int = 4, path=None) -> Figure:
    """The first ``per_class`` images (uint8 ``[N, 3, H, W]``) of each class (``labels`` int
    ``[N]``), one class after the other, ``2 * per_class`` per row, titled with the class name."""
    index = torch.cat([(labels == c).nonzero().flatten()[:per_class] for c in range(len(CLASSES))])
    return plot_images(images[index], [CLASSES[i] for i in labels[index]], ncols=per_class * 2, path=path)


def _errors(labels: torch.Tensor, predictions: torch.Tensor) -> torch.Tensor:
    return (predictions.cpu() != labels.cpu()).nonzero().flatten()


def sample_errors(labels: torch.Tensor, predictions: torch.Tensor, count: int = 16, seed: int = 0) -> torch.Tensor:
    """Indices (int64 ``[min(count, errors)]``, ascending) of misclassified images
    (``predictions != labels``), drawn uniformly without replacement by ``torch.randperm``
    with a CPU generator seeded ``seed``: the same inputs and seed give the same sample."""
    wrong = _errors(labels, predictions)
    order = torch.randperm(len(wrong), generator=torch.Generator().manual_seed(seed))
    return wrong[order[:count]].sort().values


def most_confident_errors(labels, predictions, confidence: torch.Tensor, count: int = 16) -> torch.Tensor:
    """Indices (int64 ``[min(count, errors)]``) of the misclassified images with the highest
    ``confidence`` (float ``[N]``, the softmax probability of the predicted class), most
    confident first; ties keep the lower index first."""
    wrong = _errors(labels, predictions)
    order = torch.sort(confidence.detach().cpu()[wrong], descending=True, stable=True).indices
    return wrong[order[:count]]


def _plot_errors(images, labels, predictions, index, title, path, confidence=None) -> Figure:
    """Tiles ``index`` titled ``true -> predicted`` (``(confidence)``); ``title`` is formatted
    with ``shown`` and ``errors`` (counts)."""
    title = title.format(shown=len(index), errors=len(_errors(labels, predictions)))
    titles = [f"{CLASSES[int(labels[i])]}\n-> {CLASSES[int(predictions[i])]}"
              + ("" if confidence is None else f" ({float(confidence[i]):.1%})") for i in index]
    return plot_images(images[index], titles, path=path, colors=[ERROR_COLOR] * len(index), title=title)


def plot_misclassified(images, labels, predictions, count: int = 16, seed: int = 0, path=None) -> Figure:
    """A seeded random sample of misclassified images, each titled ``true -> predicted``.

    ``images``: uint8 ``[N, 3, H, W]``; ``labels``, ``predictions``: int ``[N]`` class indices.
    Draws exactly the images :func:`sample_errors` picks (``count`` of all the errors, or all of
    them if fewer, uniformly at random with ``seed``), in test-set order; the figure title says so.
    """
    title = f"Misclassified, true -> predicted: {{shown}} drawn at random (seed {seed}) from {{errors}} errors"
    return _plot_errors(images, labels, predictions, sample_errors(labels, predictions, count, seed), title, path)


def plot_confident_errors(images, labels, predictions, confidence, count: int = 16, path=None) -> Figure:
    """The ``count`` most confident errors, each titled ``true -> predicted (confidence %)``.

    ``images``, ``labels``, ``predictions`` as for :func:`plot_misclassified`; ``confidence``:
    float ``[N]``, the softmax probability (0 to 1) of each image's predicted class (as
    :func:`labcnn.evaluate.evaluate` returns it). Draws exactly the images
    :func:`most_confident_errors` picks, most confident first.
    """
    index = most_confident_errors(labels, predictions, confidence, count)
    title = "Most confident errors, true -> predicted (probability of the prediction): {shown} of {errors}"
    return _plot_errors(images, labels, predictions, index, title, path, confidence)


def _filter_mosaics(w: torch.Tensor) -> torch.Tensor:
    """``[C_out, C_in, k, k]`` -> ``[C_out, k, C_in * (k + 1) - 1]``: channels side by side, NaN between."""
    gap = torch.full((w.shape[0], w.shape[2], 1), float("nan"))
    return torch.cat([torch.cat([w[:, c], gap], dim=2) for c in range(w.shape[1])], dim=2)[:, :, :-1]


def plot_filters(weight: torch.Tensor, path=None, threshold: float = COLLAPSE_NORM, ncols: int = 8) -> Figure:
    """Every filter of a convolution ``weight`` ``[C_out, C_in, k, k]`` (float), on ONE colour scale.

    Each filter is a row of ``C_in`` ``k x k`` tiles (R, G, B for the first layer), coloured with
    the diverging ``RdBu_r`` map from ``-m`` (blue) through 0 (white) to ``+m`` (red), where ``m``
    is the largest absolute weight of the whole layer; a colour bar gives the scale. Under each
    filter: its L2 norm (:func:`filter_norms`); filters with a norm below ``threshold`` are
    labelled and outlined in red as collapsed. Raises ValueError unless ``weight`` is 4-D.
    """
    norms = filter_norms(weight)
    w = weight.detach().float().cpu()
    m = w.abs().max().item() or 1.0  # an all-zero layer still gets a symmetric scale
    nrows = -(-len(w) // ncols)
    fig = Figure(figsize=(1.45 * ncols + 1, nrows * (0.2 * w.shape[2] + 0.5) + 0.5), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="white")
    for i, (ax, mosaic) in enumerate(zip(axes.flat, _filter_mosaics(w))):
        image = ax.imshow(mosaic.numpy(), cmap=cmap, vmin=-m, vmax=m)
        collapsed = bool(norms[i] < threshold)
        ax.set_title(str(i), fontsize=8)
        ax.text(0.5, -0.12, f"{norms[i]:.2g}", transform=ax.transAxes, ha="center", va="top", fontsize=8,
                color=ERROR_COLOR if collapsed else "black", fontweight="bold" if collapsed else "normal")
        if collapsed:
            ax.add_patch(Rectangle((0, 0), 1, 1, transform=ax.transAxes, fill=False, edgecolor=ERROR_COLOR,
                                   linewidth=2, linestyle="--", clip_on=False))
    for ax in axes.flat:
        ax.set_axis_off()
    fig.colorbar(image, ax=axes, label="weight", shrink=0.9)
    channels = "R, G, B" if w.shape[1] == 3 else f"{w.shape[1]} input channels"
    collapsed = int((norms < threshold).sum())
    fig.suptitle(f"{len(w)} filters, each {channels} left to right, one colour scale (±{m:.2g}); "
                 f"under each its L2 norm; red dashed: norm < {threshold:g}, collapsed ({collapsed} of {len(w)})", fontsize=9)
    return save(fig, path)


def plot_feature_maps(maps: torch.Tensor, image: torch.Tensor | None = None, path=None, ncols: int = 8) -> Figure:
    """Feature maps ``[C, H, W]`` (float) of one image, one grey tile per channel titled with its
    index, each tile scaled to its own min-max (a constant map is drawn in one flat shade).

    With ``image`` (uint8 ``[3, H', W']``, the network's input) the first panel shows it, titled
    ``input``. Raises ValueError for other shapes.
    """
    if maps.dim() != 3 or (image is not None and (image.dim() != 3 or image.shape[0] != 3)):
        raise ValueError(f"expected maps [C, H, W] and image [3, H, W], got {tuple(maps.shape)}"
                         f" and {None if image is None else tuple(image.shape)}")
    panels = [(image.permute(1, 2, 0).cpu().numpy(), "input", None)] if image is not None else []
    panels += [(m.detach().float().cpu().numpy(), str(i), "gray") for i, m in enumerate(maps)]
    nrows = -(-len(panels) // ncols)
    fig = Figure(figsize=(1.35 * ncols, 1.45 * nrows))
    for ax, panel in zip(fig.subplots(nrows, ncols, squeeze=False).flat, panels + [None] * ncols):
        ax.set_axis_off()
        if panel is not None:
            ax.imshow(panel[0], cmap=panel[2])
            ax.set_title(panel[1], fontsize=8, fontweight="bold" if panel[2] is None else "normal")
    fig.tight_layout()
    return save(fig, path)


def plot_confusion(confusion: torch.Tensor, path=None) -> Figure:
    """The 10x10 confusion matrix (int ``[10, 10]``, rows true class, columns predicted), counts in each cell."""
    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    image = ax.imshow(confusion.numpy(), cmap="Blues")
    fig.colorbar(image, ax=ax, label="test images")
    ticks = range(len(CLASSES))
    ax.set_xticks(ticks, CLASSES, rotation=45, ha="right")
    ax.set_yticks(ticks, CLASSES)
    ax.set(xlabel="predicted class", ylabel="true class", title="Confusion matrix (test set)")
    threshold = confusion.max().item() / 2
    for (i, j), count in zip(torch.cartesian_prod(torch.arange(10), torch.arange(10)).tolist(), confusion.flatten()):
        ax.text(j, i, int(count), ha="center", va="center", fontsize=7, color="white" if count > threshold else "black")
    return save(fig, path)


def plot_per_class(per_class_accuracy: list[float], path=None) -> Figure:
    """Horizontal bars of each class's test accuracy (10 fractions, drawn in percent)."""
    fig = Figure(figsize=(6.4, 3.8))
    ax = fig.subplots()
    values = [100 * a for a in per_class_accuracy]
    ax.barh(CLASSES, values, color="steelblue")
    for y, v in enumerate(values):
        ax.text(v + 0.5, y, f"{v:.1f}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="top-1 accuracy (%)", xlim=(0, 105), title="Test accuracy per class")
    return save(fig, path)


def plot_batch_accuracy_histogram(accuracies, mean: float | None = None, marked: dict[str, float] | None = None,
                                  batch_size: int = 100, path=None, title: str | None = None) -> Figure:
    """Histogram of the accuracy of fixed test batches of ``batch_size`` images.

    ``accuracies``: fractions in [0, 1], one per batch (a float ``[B]`` tensor or a sequence),
    drawn in percent with one bar per achievable value (bins ``100 / batch_size`` points wide).
    Vertical lines: ``mean`` (a fraction; default the batches' mean) and each ``marked``
    ``{label: fraction}``, e.g. ``{"original report": 0.6926}``. Raises ValueError for no
    batches or a value outside [0, 1].
    """
    acc = torch.as_tensor(accuracies, dtype=torch.float64).flatten()
    if acc.numel() == 0 or acc.min() < 0 or acc.max() > 1:
        raise ValueError("accuracies must be one or more fractions between 0 and 1")
    mean = acc.mean().item() if mean is None else float(mean)
    step = 100 / batch_size
    low, high = (acc.min().item() * 100) // step * step, acc.max().item() * 100
    edges = torch.arange(low - step / 2, high + step, step).tolist()
    fig = Figure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    ax.hist((acc * 100).numpy(), bins=edges, color="steelblue", edgecolor="white")
    ax.axvline(mean * 100, color="black", linewidth=2, label=f"mean {mean:.2%}")
    for i, (label, value) in enumerate((marked or {}).items()):
        ax.axvline(value * 100, color=f"C{i + 1}", linestyle="--", linewidth=2, label=f"{label} {value:.2%}")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel=f"accuracy of a batch of {batch_size} test images (%)", ylabel="batches",
           title=title or f"Accuracy of {acc.numel()} test batches of {batch_size} images")
    ax.legend(fontsize=8)
    return save(fig, path)
