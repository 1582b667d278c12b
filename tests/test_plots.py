import errno
import json
import math
from pathlib import Path

import pytest
import torch
from matplotlib.colors import to_hex
from matplotlib.image import AxesImage

from labcnn import plots
from labcnn.data import CLASSES
from labcnn.errors import WriteError

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def history(epochs: int, val: bool = False) -> list[dict]:
    rows = []
    for e in range(1, epochs + 1):
        row = {"epoch": e, "train_loss": 2 / e, "train_acc": 0.3 + e / 100, "test_loss": 2.1 / e, "test_acc": 0.3 + e / 110}
        rows.append({**row, "val_loss": 2.05 / e, "val_acc": 0.3 + e / 105} if val else row)
    return rows


def errors_data(n=60, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    predictions = torch.where(torch.rand(n, generator=g) < 0.5, labels, (labels + 1) % 10)
    return images, labels, predictions


def tile_titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes if ax.images]


def test_every_figure_function_is_a_plot_function():
    public = [name for name in vars(plots) if callable(getattr(plots, name)) and not name.startswith("_")]
    assert not [name for name in public if name.startswith("show_")]
    for name in ("plot_images", "plot_examples", "plot_misclassified", "plot_filters", "plot_feature_maps"):
        assert callable(getattr(plots, name))


def test_save_writes_png_through_a_temporary_file(tmp_path):
    path = tmp_path / "new" / "loss.png"
    plots.plot_curves(history(2), "loss", path=path)
    assert path.read_bytes().startswith(PNG)
    assert [p.name for p in path.parent.iterdir()] == ["loss.png"]


def test_save_lets_write_errors_propagate(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(WriteError):
        plots.plot_curves(history(2), path=tmp_path / "file" / "loss.png")
    path = tmp_path / "loss.png"
    path.write_bytes(b"previous")
    fig = plots.plot_curves(history(2))

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fig, "savefig", full_disk)
    with pytest.raises(WriteError, match="No space left on device"):
        plots.save(fig, path)
    assert path.read_bytes() == b"previous"  # the previous file is kept, no temporary file is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "loss.png"]


@pytest.mark.parametrize("epochs", [1, 2, 3, 7])
def test_curve_ticks_are_whole_epochs(epochs):
    ax = plots.plot_curves(history(epochs), "accuracy").axes[0]
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_curve_labels_say_what_each_split_measures():
    ax = plots.plot_curves(history(3, val=True), "accuracy").axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["train (running mean over the epoch, train mode)", "validation (eval mode)", "test (eval mode)"]
    assert list(ax.lines[0].get_ydata()) == pytest.approx([100 * r["train_acc"] for r in history(3)])
    with pytest.raises(ValueError, match="unknown metric"):
        plots.plot_curves(history(3), "f1")


def test_compare_draws_committed_runs_side_by_side_or_overlaid():
    runs = {name: json.loads((REPO / "results" / f"{stem}.json").read_text())
            for name, stem in (("lab recipe", "lab"), ("improved recipe", "improved"))}
    side = plots.plot_compare(runs, "accuracy")
    assert [ax.get_title() for ax in side.axes] == list(runs)
    assert side.axes[0].get_ylim() == side.axes[1].get_ylim()  # one y scale for a fair comparison
    assert [len(ax.lines) for ax in side.axes] == [2, 3]  # the improved run also has validation
    overlay = plots.plot_compare(runs, "loss", overlay=True)
    (ax,) = overlay.axes
    assert len(ax.lines) == 5
    colors = {line.get_label().split(":")[0]: to_hex(line.get_color()) for line in ax.lines}
    assert set(colors) == set(runs) and len(set(colors.values())) == 2
    with pytest.raises(ValueError):
        plots.plot_compare({})


def test_filter_figure_has_one_symmetric_colour_scale_and_norms():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(10, 3, 2, 2, generator=g) * torch.linspace(0.1, 2, 10)[:, None, None, None]
    weight[[2, 7]] = 1e-4 * weight[[2, 7]]  # two collapsed filters
    fig = plots.plot_filters(weight, threshold=0.01, ncols=4)
    m = weight.abs().max().item()
    images = [im for ax in fig.axes for im in ax.get_children() if isinstance(im, AxesImage)]
    assert len(images) == 10
    for image in images:
        assert image.get_clim() == pytest.approx((-m, m))
        assert image.get_cmap().name.startswith("RdBu_r")
    assert len(fig.axes) == 4 * 3 + 1 and fig.axes[-1].get_ylabel() == "weight"  # the colour bar
    norms = torch.sqrt((weight ** 2).sum(dim=(1, 2, 3)))
    tiles = [ax for ax in fig.axes if ax.images]
    for i, ax in enumerate(tiles):
        (text,) = ax.texts
        assert text.get_text() == f"{norms[i]:.2g}"
        assert float(text.get_text()) == pytest.approx(norms[i].item(), rel=0.05)
        collapsed = to_hex(text.get_color()) == to_hex(plots.ERROR_COLOR)
        assert collapsed == (i in (2, 7)), i
    assert "collapsed (2 of 10)" in fig.get_suptitle()


def test_misclassified_sample_is_seeded_and_only_errors():
    images, labels, predictions = errors_data()
    errors = set((predictions != labels).nonzero().flatten().tolist())
    sample = plots.sample_errors(labels, predictions, count=8, seed=0)
    assert len(sample) == 8 and set(sample.tolist()) <= errors and sample.tolist() == sorted(sample.tolist())
    assert torch.equal(sample, plots.sample_errors(labels, predictions, count=8, seed=0))
    assert not torch.equal(sample, plots.sample_errors(labels, predictions, count=8, seed=1))
    assert sample.tolist() != sorted(errors)[:8]  # not simply the first errors
    assert set(plots.sample_errors(labels, predictions, count=1000).tolist()) == errors
    fig = plots.plot_misclassified(images, labels, predictions, count=8, seed=0)
    assert tile_titles(fig) == [f"{CLASSES[labels[i]]}\n-> {CLASSES[predictions[i]]}" for i in sample]
    assert "true -> predicted" in fig.get_suptitle() and "seed 0" in fig.get_suptitle()


def test_confident_errors_are_the_most_confident_ones():
    images, labels, predictions = errors_data()
    confidence = torch.rand(len(labels), generator=torch.Generator().manual_seed(2))
    chosen = plots.most_confident_errors(labels, predictions, confidence, count=5)
    wrong = [i for i in range(len(labels)) if predictions[i] != labels[i]]
    assert chosen.tolist() == sorted(wrong, key=lambda i: -confidence[i].item())[:5]
    fig = plots.plot_confident_errors(images, labels, predictions, confidence, count=5)
    assert tile_titles(fig) == [f"{CLASSES[labels[i]]}\n-> {CLASSES[predictions[i]]} ({confidence[i]:.1%})" for i in chosen]
    assert "true -> predicted" in fig.get_suptitle()


def test_feature_maps_start_with_the_input_image():
    image = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    maps = torch.rand(5, 33, 33)
    fig = plots.plot_feature_maps(maps, image=image, ncols=3)
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in panels] == ["input", "0", "1", "2", "3", "4"]
    assert (panels[0].images[0].get_array() == image.permute(1, 2, 0).numpy()).all()
    assert len([ax for ax in plots.plot_feature_maps(maps).axes if ax.images]) == 5
    with pytest.raises(ValueError):
        plots.plot_feature_maps(maps, image=image[0])


def test_batch_accuracy_histogram_in_percent_with_marked_lines():
    accuracies = torch.tensor([0.61, 0.64, 0.64, 0.66, 0.70, 0.70, 0.70, 0.73])
    fig = plots.plot_batch_accuracy_histogram(accuracies, mean=0.6616, marked={"original report": 0.6926})
    (ax,) = fig.axes
    bars = ax.patches
    assert sum(bar.get_height() for bar in bars) == len(accuracies)
    assert all(bar.get_width() == pytest.approx(1.0) for bar in bars)  # one bar per whole percent
    assert {round(bar.get_x() + 0.5) for bar in bars if bar.get_height()} == {61, 64, 66, 70, 73}
    lines = {line.get_label(): line.get_xdata()[0] for line in ax.lines}
    assert lines == {"mean 66.16%": pytest.approx(66.16), "original report 69.26%": pytest.approx(69.26)}
    assert "%" in ax.get_xlabel()
    assert math.isclose(plots.plot_batch_accuracy_histogram(accuracies).axes[0].lines[0].get_xdata()[0],
                        100 * accuracies.double().mean().item())
    with pytest.raises(ValueError):
        plots.plot_batch_accuracy_histogram([0.5, 61.0])  # percent instead of fractions
