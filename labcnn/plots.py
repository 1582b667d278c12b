"""The report's figures (pyplot-free ``Figure`` objects), their display, the committed runs and
their statistics. Images are uint8 ``[N, 3, H, W]``, labels int64 ``[N]``, accuracies fractions."""
import io
import json
import math
import statistics
from pathlib import Path

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

import labcnn
from labcnn.data import CLASSES
from labcnn.fileio import atomic_write, make_dir
from labcnn.model import COLLAPSE_NORM, filter_norms

METRICS = {"loss": ("loss", "cross-entropy loss (nats per image)", 1.0),
           "accuracy": ("acc", "top-1 accuracy (%)", 100.0)}
SPLITS = {"train": "train (running mean over the epoch, train mode)",  # not an evaluation
          "val": "validation (eval mode)", "test": "test (eval mode)"}
RED = "firebrick"  # collapsed filters
# The original lab report's figures (value, what it measured): means over its 50 epochs.
ORIGINAL = {
    "test_acc": (0.6926, "mean over epochs of the last test batch's accuracy (100 images)"),
    "train_acc": (0.6742, "mean over epochs of the last training batch's accuracy"),
    "train_loss": (0.00907, "mean over epochs of summed batch-mean losses / images (loss / 100)"),
    "test_loss": (0.00946, "the same on the test set: about a per-image loss / 100"),
}
RESULTS_PLACES = "the imported labcnn's checkout, this folder and its parents, ./labcnn, ../labcnn"

def save(fig: Figure, path) -> None:
    """Write ``fig`` as PNG to ``path`` atomically, making its folder; WriteError names the path."""
    make_dir(Path(path).parent)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))

def save_curves(folder, history: list[dict]) -> None:
    """Write ``folder/loss.png`` and ``folder/accuracy.png`` (:func:`plot_curves`)."""
    for metric in ("loss", "accuracy"):
        save(plot_curves(history, metric), Path(folder) / f"{metric}.png")

def show(fig: Figure, alt: str) -> None:
    """Display ``fig`` in a notebook as a PNG output whose metadata carries ``alt`` text."""
    from IPython.display import Image, display
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    display(Image(data=buffer.getvalue(), format="png", metadata={"alt": alt}))

def plot_curves(history: list[dict], metric: str = "loss") -> Figure:
    """Train, validation (if present) and test ``metric`` per epoch of one run's history."""
    return plot_compare({f"{metric.capitalize()} per epoch": history}, metric)

def plot_compare(runs: dict[str, list[dict]], metric: str = "accuracy") -> Figure:
    """One panel per run (``{title: history}``, in order), one shared y axis. ``metric``: ``"loss"``
    (nats per image) or ``"accuracy"`` (in percent); ValueError for others or empty histories."""
    if metric not in METRICS or not runs or not all(runs.values()):
        raise ValueError(f"expected histories and metric 'loss' or 'accuracy', got {metric!r}")
    key, ylabel, scale = METRICS[metric]
    fig = Figure(figsize=(1.2 + 5.2 * len(runs), 4.2), layout="constrained")
    axes = fig.subplots(1, len(runs), sharey=True, squeeze=False)[0]
    for ax, (title, history) in zip(axes, runs.items()):
        epochs = [r["epoch"] for r in history]
        for split, label in SPLITS.items():
            if f"{split}_{key}" in history[0]:
                ax.plot(epochs, [r[f"{split}_{key}"] * scale for r in history], ".-", label=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # whole epochs
        ax.set(title=title, xlabel="epoch", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig

def _tiles(nrows: int, ncols: int, width: float, height: float) -> tuple[Figure, list]:
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, subplot_kw=dict(xticks=[], yticks=[]))
    for ax in axes.flat:
        ax.spines[:].set_visible(False)
    return fig, axes

def plot_examples(images: torch.Tensor, labels: torch.Tensor, per_class: int = 4) -> Figure:
    """One class per row (``CLASSES`` order, its name at the row's start), ``per_class`` columns:
    the class's first ``per_class`` images in stored order (blank tiles where it has fewer)."""
    fig, axes = _tiles(len(CLASSES), per_class, 1.1 * per_class + 1.2, 1.1 * len(CLASSES))
    for c, row in enumerate(axes):
        row[0].set_ylabel(CLASSES[c], rotation=0, ha="right", va="center")
        for ax, i in zip(row, (labels.cpu() == c).nonzero().flatten().tolist()):
            ax.imshow(images[i].permute(1, 2, 0).cpu().numpy())
    return fig

def plot_per_class(per_class_accuracy) -> Figure:
    """Horizontal bars of each class's test accuracy (10 fractions, drawn in percent)."""
    fig = Figure(figsize=(6.4, 3.8), layout="constrained")  # the layout keeps names uncut
    ax = fig.subplots()
    bars = ax.barh(CLASSES, [100 * float(a) for a in per_class_accuracy], color="steelblue")
    ax.bar_label(bars, fmt="%.1f", padding=2, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="top-1 accuracy (%)", xlim=(0, 108), title="Test accuracy per class")
    return fig

def plot_confusion(confusion: torch.Tensor) -> Figure:
    """The confusion matrix (int64 ``[10, 10]``, rows true class, columns predicted), counted."""
    fig = Figure(figsize=(7.5, 6.5), layout="constrained")
    ax = fig.subplots()
    fig.colorbar(ax.imshow(confusion.cpu().numpy(), cmap="Blues"), ax=ax, label="test images")
    ax.set_xticks(range(10), CLASSES, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(10), CLASSES)
    ax.set(xlabel="predicted class", ylabel="true class", title="Confusion matrix (test set)")
    for i, row in enumerate(confusion.tolist()):
        for j, n in enumerate(row):
            ax.text(j, i, n, ha="center", va="center", fontsize=7,
                    color="white" if n > confusion.max() / 2 else "black")
    return fig

def plot_confident_errors(images, labels, predictions, confidence, count: int = 16) -> Figure:
    """The ``count`` errors with the highest ``confidence`` (float ``[N]``, softmax probability of
    the prediction), most confident first (ties: lower index), titled ``true -> predicted (p)``."""
    wrong = (predictions != labels).nonzero().flatten()
    order = torch.sort(confidence.detach()[wrong], descending=True, stable=True).indices
    chosen = wrong[order[:count]].tolist()
    rows = max(1, -(-len(chosen) // 8))
    fig, axes = _tiles(rows, 8, 10.8, 1.6 * rows + 0.4)
    for ax, i in zip(axes.flat, chosen):
        ax.imshow(images[i].permute(1, 2, 0).cpu().numpy())
        ax.set_title(f"{CLASSES[labels[i]]}\n-> {CLASSES[predictions[i]]} ({confidence[i]:.1%})",
                     fontsize=8)
    fig.suptitle("Most confident errors, true -> predicted (probability of the prediction): "
                 f"{len(chosen)} of {len(wrong)}", fontsize=10)
    return fig

def plot_filters(weight: torch.Tensor, ncols: int = 8) -> Figure:
    """Each filter of ``weight`` (float ``[C_out, C_in, k, k]``): channels side by side, ONE colour
    scale for the layer, titled ``index: L2 norm``; collapsed ones (< COLLAPSE_NORM) in red."""
    norms = filter_norms(weight)  # ValueError unless 4-D
    w = weight.detach().float().cpu()
    gap = torch.full((len(w), w.shape[2], 1), float("nan"))  # a blank column between channels
    mosaics = torch.cat([torch.cat([w[:, c], gap], dim=2) for c in range(w.shape[1])], 2)[..., :-1]
    m = w.abs().max().item() or 1.0  # an all-zero layer still gets a symmetric scale
    nrows = -(-len(w) // ncols)
    fig, axes = _tiles(nrows, ncols, 1.45 * ncols + 1, nrows * (0.2 * w.shape[2] + 0.5) + 0.6)
    collapsed = norms < COLLAPSE_NORM
    for i, (ax, mosaic) in enumerate(zip(axes.flat, mosaics)):  # NaN gaps are left transparent
        image = ax.imshow(mosaic.numpy(), cmap="RdBu_r", vmin=-m, vmax=m)
        ax.set_title(f"{i}: {norms[i]:.2g}", fontsize=8, color=RED if collapsed[i] else "black")
        if collapsed[i]:
            ax.spines[:].set(visible=True, color=RED, linestyle="--", linewidth=2)
    fig.colorbar(image, ax=axes, label="weight", shrink=0.9)
    fig.suptitle(f"filter: L2 norm; channels left to right; one colour scale (±{m:.2g}); red: "
                 f"norm < {COLLAPSE_NORM:g}, collapsed ({int(collapsed.sum())} of {len(w)})")
    return fig

def best_epoch(history: list[dict], key: str = "test_acc") -> dict:
    """The record with the highest ``key`` (for information: never select on the test set)."""
    return max(history, key=lambda r: r[key])

def first_reaching(history: list[dict], accuracy: float) -> dict | None:
    """The first record whose ``test_acc`` is at least ``accuracy``, or None."""
    return next((r for r in history if r["test_acc"] >= accuracy), None)

def seconds_to(history: list[dict], accuracy: float) -> float | None:
    """Training seconds (evaluation excluded) until :func:`first_reaching` ``accuracy``, or None."""
    return (first_reaching(history, accuracy) or {}).get("elapsed_train_seconds")

def mean_over_epochs(history: list[dict], key: str) -> float:
    """The mean of ``key`` over all epochs, as the original report measured its figures."""
    return statistics.fmean(r[key] for r in history)

def headline(history: list[dict]) -> dict[str, str]:
    """``final_acc``, ``final_loss``, ``best_epoch``, ``best_acc``, ``wall_time``, ``train_time``;
    ``best_val_*`` and ``final_val_acc``; ``original_epoch``, ``original_seconds`` once reached."""
    from labcnn.train import format_duration  # here: train imports this module for its curves
    last, best = history[-1], best_epoch(history)
    figures = {"final_acc": f"{last['test_acc']:.2%}", "final_loss": f"{last['test_loss']:.4f}",
               "best_epoch": str(best["epoch"]), "best_acc": f"{best['test_acc']:.2%}",
               "wall_time": format_duration(sum(r["seconds"] for r in history)),
               "train_time": format_duration(last["elapsed_train_seconds"])}
    if "val_acc" in last:
        val = best_epoch(history, "val_acc")
        figures.update(best_val_epoch=str(val["epoch"]), best_val_acc=f"{val['val_acc']:.2%}",
                       final_val_acc=f"{last['val_acc']:.2%}")
    if (reached := first_reaching(history, ORIGINAL["test_acc"][0])) is not None:
        figures.update(original_epoch=str(reached["epoch"]),
                       original_seconds=f"{reached['elapsed_train_seconds']:.0f} s")
    return figures

def spread(values: list[float]) -> dict[str, float]:
    """``mean``, ``std`` (sample standard deviation; 0 for one value), ``min`` and ``max``."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "min": min(values), "max": max(values)}

def seed_spread(histories: list[list[dict]], key: str = "test_acc") -> dict[str, float]:
    """:func:`spread` of the last epoch's ``key`` over runs that differ only in their seed."""
    return spread([h[-1][key] for h in histories])

def epoch_swing(history: list[dict], after: int = 10, key: str = "test_acc") -> dict[str, float]:
    """:func:`spread` of ``key`` after epoch ``after``, its ``mean_change`` and ``max_change``."""
    values = [r[key] for r in history if r["epoch"] > after]
    changes = [abs(b - a) for a, b in zip(values, values[1:])]
    return {**spread(values), "mean_change": statistics.fmean(changes), "max_change": max(changes)}

def fixed_batch_accuracies(predictions, labels, batch_size: int = 100, seed: int = 0):
    """Accuracies (float64 ``[N // batch_size]``) of the batches of one seeded test-set order."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    order = order[:len(labels) // batch_size * batch_size]
    return (predictions.cpu()[order] == labels.cpu()[order]).double().view(-1, batch_size).mean(1)

def last_batch_accuracy(predictions, labels, batch_size: int = 100) -> float:
    """Accuracy of the last ``batch_size`` images: all the original script kept of an evaluation."""
    return (predictions[-batch_size:] == labels[-batch_size:]).double().mean().item()

def binomial_interval(accuracy: float, n: int, z: float = 1.96) -> float:
    """Half-width (fraction) of the normal-approximation interval of an accuracy on ``n`` images."""
    if not 0 <= accuracy <= 1 or n < 1:
        raise ValueError(f"expected an accuracy in [0, 1] and n >= 1, got {accuracy} and {n}")
    return z * math.sqrt(accuracy * (1 - accuracy) / n)

def results_dir() -> Path | None:
    """``results/`` of the first checkout (``pyproject.toml``, ``results/``) in RESULTS_PLACES."""
    cwd = Path.cwd().resolve()
    for root in (Path(labcnn.__file__).resolve().parents[1], cwd, *cwd.parents,
                 cwd / "labcnn", cwd.parent / "labcnn"):
        if (root / "pyproject.toml").is_file() and (root / "results").is_dir():
            return root / "results"
    return None

def committed(name: str):
    """The parsed ``results/<name>.json``, or None; ValueError names a file that is not JSON."""
    path = (folder := results_dir()) and folder / f"{name}.json"
    try:
        return json.loads(path.read_text()) if path and path.is_file() else None
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
