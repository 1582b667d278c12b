"""Figures for the report, drawn with matplotlib's object API (no display needed).

Each function returns a ``matplotlib.figure.Figure``; pass ``path`` to also save it as PNG.
"""
from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure

from labcnn.data import CLASSES

METRICS = {"loss": ("loss", "cross-entropy loss (nats per image)"), "accuracy": ("acc", "top-1 accuracy (%)")}


def save(fig: Figure, path) -> Figure:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100, bbox_inches="tight")
    return fig


def plot_curves(history: list[dict], metric: str = "loss", path=None, title: str | None = None) -> Figure:
    """Train and test ``metric`` (``"loss"`` or ``"accuracy"``) per epoch, from :func:`labcnn.train.fit`'s history.

    Accuracy is drawn in percent; validation curves are added when the history has them.
    """
    key, ylabel = METRICS[metric]
    scale = 100 if metric == "accuracy" else 1
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    epochs = [r["epoch"] for r in history]
    for split in ("train", "val", "test"):
        if f"{split}_{key}" in history[0]:
            ax.plot(epochs, [r[f"{split}_{key}"] * scale for r in history], marker=".", label=split)
    ax.set(xlabel="epoch", ylabel=ylabel, title=title or f"{metric.capitalize()} per epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    return save(fig, path)


def show_images(images: torch.Tensor, titles: list[str], ncols: int = 8, path=None, colors=None) -> Figure:
    """A grid of uint8 ``[N, 3, H, W]`` images with one title each (optionally coloured)."""
    nrows = -(-len(images) // ncols)
    fig = Figure(figsize=(1.35 * ncols, 1.5 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i < len(images):
            ax.imshow(images[i].permute(1, 2, 0).cpu().numpy())
            ax.set_title(titles[i], fontsize=8, color=colors[i] if colors else "black")
    fig.tight_layout()
    return save(fig, path)


def show_examples(images, labels, per_class: int = 4, path=None) -> Figure:
    """The first ``per_class`` images of each class, one row per class, labelled with its name."""
    index = torch.cat([(labels == c).nonzero().flatten()[:per_class] for c in range(len(CLASSES))])
    return show_images(images[index], [CLASSES[i] for i in labels[index]], ncols=per_class * 2, path=path)


def show_misclassified(images, labels, predictions, count: int = 16, path=None) -> Figure:
    """The first ``count`` test images whose prediction is wrong, titled ``true -> predicted``."""
    wrong = (predictions != labels).nonzero().flatten()[:count]
    titles = [f"{CLASSES[labels[i]]}\n-> {CLASSES[predictions[i]]}" for i in wrong]
    return show_images(images[wrong], titles, path=path, colors=["firebrick"] * len(wrong))


def plot_confusion(confusion: torch.Tensor, path=None) -> Figure:
    """The 10x10 confusion matrix (rows true class, columns predicted), counts in each cell."""
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
    """Horizontal bars of each class's test accuracy, in percent."""
    fig = Figure(figsize=(6.4, 3.8))
    ax = fig.subplots()
    values = [100 * a for a in per_class_accuracy]
    ax.barh(CLASSES, values, color="steelblue")
    for y, v in enumerate(values):
        ax.text(v + 0.5, y, f"{v:.1f}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="top-1 accuracy (%)", xlim=(0, 105), title="Test accuracy per class")
    return save(fig, path)


def show_filters(weight: torch.Tensor, path=None) -> Figure:
    """First-layer kernels ``[C_out, 3, k, k]`` as small RGB tiles, each scaled to its own range."""
    w = weight.detach().float().cpu()
    lo, hi = w.amin(dim=(1, 2, 3), keepdim=True), w.amax(dim=(1, 2, 3), keepdim=True)
    tiles = ((w - lo) / (hi - lo).clamp(min=1e-12) * 255).round().to(torch.uint8)
    return show_images(tiles, [str(i) for i in range(len(tiles))], ncols=8, path=path)


def show_feature_maps(maps: torch.Tensor, path=None, ncols: int = 8) -> Figure:
    """Feature maps ``[C, H, W]`` of one image, one grey tile per channel."""
    nrows = -(-len(maps) // ncols)
    fig = Figure(figsize=(1.35 * ncols, 1.45 * nrows))
    for i, ax in enumerate(fig.subplots(nrows, ncols, squeeze=False).flat):
        ax.set_axis_off()
        if i < len(maps):
            ax.imshow(maps[i].detach().float().cpu().numpy(), cmap="gray")
            ax.set_title(str(i), fontsize=8)
    fig.tight_layout()
    return save(fig, path)
