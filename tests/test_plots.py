"""labcnn.plots: figures, saving and display, committed results, run statistics."""

import errno
import json
from pathlib import Path

import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex
from test_results import REPORT, best_epoch, first_reaching, headline, seconds_to, seed_spread

import labcnn
from labcnn import WriteError, notebook, plots
from labcnn.data import CLASSES

PNG = b"\x89PNG\r\n\x1a\n"


def history(epochs: int, val: bool = False, seconds: float = 10.0) -> list[dict]:
    rows = []
    for e in range(1, epochs + 1):
        row = {
            "epoch": e,
            "train_loss": 2 / e,
            "train_acc": 0.3 + e / 100,
            "test_loss": 2.1 / e,
            "test_acc": 0.3 + e / 110,
            "seconds": seconds,
            "elapsed_train_seconds": 8.0 * e,
        }
        rows.append({**row, "val_loss": 2.05 / e, "val_acc": 0.3 + e / 105} if val else row)
    return rows


def errors_data(n=60, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    predictions = torch.where(torch.rand(n, generator=g) < 0.5, labels, (labels + 1) % 10)
    return images, labels, predictions


def drawn(fig):
    """``fig`` laid out and drawn with Agg; returns the renderer."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def clipped_texts(fig) -> list[str]:
    """Drawn tick labels, axis labels and titles of ``fig`` whose box leaves the figure."""
    renderer, box = drawn(fig), fig.bbox
    texts = [t for ax in fig.axes for t in (ax.xaxis.label, ax.yaxis.label, ax.title)]
    for axis in (a for ax in fig.axes for a in (ax.xaxis, ax.yaxis)):
        low, high = sorted(axis.get_view_interval())  # ticks outside the view are not drawn
        ticks = zip(axis.get_ticklabels(), axis.get_ticklocs(), strict=False)
        texts += [t for t, at in ticks if low <= at <= high]
    return [
        t.get_text()
        for t in texts
        if t.get_text()
        and not (
            (e := t.get_window_extent(renderer)).x0 >= box.x0
            and e.y0 >= box.y0
            and e.x1 <= box.x1
            and e.y1 <= box.y1
        )
    ]


def all_figures():
    images, labels, predictions = errors_data()
    g = torch.Generator().manual_seed(0)
    confusion = torch.randint(0, 1000, (10, 10), generator=g)
    return {
        "curves": plots.plot_curves(history(3, val=True), "loss"),
        "compare": plots.plot_compare({"a": history(2), "b": history(3, val=True)}),
        "examples": plots.plot_examples(images, labels, per_class=2),
        "per_class": plots.plot_per_class([0.1 * c for c in range(10)]),
        "confusion": plots.plot_confusion(confusion),
        "confident_errors": plots.plot_confident_errors(
            images, labels, predictions, torch.rand(len(labels), generator=g), count=5
        ),
        "filters": plots.plot_filters(torch.randn(6, 3, 2, 2, generator=g), ncols=4),
    }


def test_every_figure_renders_and_keeps_its_labels_inside():
    for name, fig in all_figures().items():
        assert not clipped_texts(fig), name


def test_class_names_in_per_class_and_confusion_are_not_clipped():
    per_class = plots.plot_per_class([0.5] * 10)
    confusion = plots.plot_confusion(torch.full((10, 10), 100, dtype=torch.int64))
    for fig in (per_class, confusion):
        assert not clipped_texts(fig)
        names = [t.get_text() for t in fig.axes[0].get_yticklabels()]
        assert names == list(CLASSES)  # whole names, "automobile" included
    assert [t.get_text() for t in confusion.axes[0].get_xticklabels()] == list(CLASSES)


def test_clipping_check_can_fail():
    fig = plots.plot_per_class([0.5] * 10)
    fig.set_layout_engine(None)  # matplotlib's default margins, as before: "utomobile"
    assert "automobile" in clipped_texts(fig)


def test_save_writes_png_atomically(tmp_path, monkeypatch):
    path = tmp_path / "new" / "loss.png"
    plots.save(plots.plot_curves(history(2)), path)
    assert path.read_bytes().startswith(PNG)
    assert [p.name for p in path.parent.iterdir()] == ["loss.png"]  # no temporary file left
    fig = plots.plot_curves(history(2))

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fig, "savefig", full_disk)
    with pytest.raises(WriteError, match="No space left on device"):
        plots.save(fig, path)
    assert path.read_bytes().startswith(PNG)  # the previous file is kept
    assert [p.name for p in path.parent.iterdir()] == ["loss.png"]
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(WriteError):
        plots.save(fig, tmp_path / "file" / "loss.png")


def test_save_curves_writes_both_figures(tmp_path):
    plots.save_curves(tmp_path / "run", history(2))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["accuracy.png", "loss.png"]
    assert all(p.read_bytes().startswith(PNG) for p in (tmp_path / "run").iterdir())


def test_show_displays_png_with_alt_text(monkeypatch):
    import IPython.display

    shown = []
    monkeypatch.setattr(IPython.display, "display", shown.append)
    plots.show(plots.plot_curves(history(2)), alt="Loss per epoch")
    (image,) = shown
    assert image.format == "png" and image.data.startswith(PNG)
    assert image.metadata == {"alt": "Loss per epoch"}
    assert image._repr_png_()[1] == {"alt": "Loss per epoch"}


@pytest.mark.parametrize("epochs", [1, 2, 7])
def test_curve_ticks_are_whole_epochs(epochs):
    ax = plots.plot_curves(history(epochs), "accuracy").axes[0]
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    assert ticks and all(float(t).is_integer() for t in ticks)


def test_curve_labels_say_what_each_split_measures():
    ax = plots.plot_curves(history(3, val=True), "accuracy").axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [
        "train (running mean over the epoch, train mode)",
        "validation (eval mode)",
        "test (eval mode)",
    ]
    h = history(3)
    assert list(ax.lines[0].get_ydata()) == pytest.approx([100 * r["train_acc"] for r in h])
    assert list(ax.lines[2].get_ydata()) == pytest.approx([100 * r["test_acc"] for r in h])
    loss = plots.plot_curves(history(3), "loss").axes[0]
    assert list(loss.lines[1].get_ydata()) == pytest.approx([r["test_loss"] for r in history(3)])
    for bad in ((history(3), "f1"), ([], "loss")):
        with pytest.raises(ValueError):
            plots.plot_curves(*bad)


def test_compare_draws_runs_side_by_side_on_one_scale():
    runs = {"lab recipe": history(3), "improved recipe": history(5, val=True)}
    fig = plots.plot_compare(runs, "accuracy")
    assert [ax.get_title() for ax in fig.axes] == list(runs)
    assert fig.axes[0].get_ylim() == fig.axes[1].get_ylim()  # one y scale for a fair comparison
    assert [len(ax.lines) for ax in fig.axes] == [2, 3]  # the improved run also has validation
    with pytest.raises(ValueError):
        plots.plot_compare({})


@pytest.mark.parametrize("per_class", [1, 3])
def test_examples_show_one_class_per_row(per_class):
    images, labels, _ = errors_data(n=40)
    fig = plots.plot_examples(images, labels, per_class=per_class)
    assert len(fig.axes) == 10 * per_class
    for ax in fig.axes:
        spec = ax.get_subplotspec()
        row, col = spec.rowspan.start, spec.colspan.start
        assert ax.get_ylabel() == (CLASSES[row] if col == 0 else "")
        of_class = (labels == row).nonzero().flatten().tolist()
        if col < len(of_class):  # the class's images in stored order, along its row
            (image,) = ax.images
            assert (image.get_array() == images[of_class[col]].permute(1, 2, 0).numpy()).all()
        else:
            assert not ax.images


def test_confusion_counts_every_cell():
    confusion = torch.arange(100, dtype=torch.int64).view(10, 10)
    ax = plots.plot_confusion(confusion).axes[0]
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t for t in ax.texts}
    assert {k: int(t.get_text()) for k, t in cells.items()} == {
        (i, j): 10 * i + j for i in range(10) for j in range(10)
    }
    assert to_hex(cells[9, 9].get_color()) == "#ffffff"  # white on the darkest cells
    assert to_hex(cells[0, 0].get_color()) == "#000000"


def test_confident_errors_are_the_most_confident_ones():
    images, labels, predictions = errors_data()
    confidence = torch.rand(len(labels), generator=torch.Generator().manual_seed(2))
    wrong = [i for i in range(len(labels)) if predictions[i] != labels[i]]
    confidence[wrong[3]] = confidence[wrong[1]]  # a tie: the lower index comes first
    chosen = sorted(wrong, key=lambda i: (-confidence[i].item(), i))[:5]
    fig = plots.plot_confident_errors(images, labels, predictions, confidence, count=5)
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert titles == [
        f"{CLASSES[labels[i]]}\n-> {CLASSES[predictions[i]]} ({confidence[i]:.1%})" for i in chosen
    ]
    assert fig.get_suptitle().endswith(f"5 of {len(wrong)}")


def test_filter_figure_has_one_symmetric_colour_scale_and_marks_collapsed_filters():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(10, 3, 2, 2, generator=g) * torch.linspace(0.1, 2, 10)[:, None, None, None]
    weight[[2, 7]] = 1e-4 * weight[[2, 7]]  # two collapsed filters
    fig = plots.plot_filters(weight, ncols=4)
    m = weight.abs().max().item()
    tiles = [ax for ax in fig.axes if ax.images]
    assert len(tiles) == 10 and len(fig.axes) == 4 * 3 + 1  # 12 tiles and the colour bar
    assert fig.axes[-1].get_ylabel() == "weight"
    norms = weight.flatten(1).norm(dim=1)
    for i, ax in enumerate(tiles):
        assert ax.images[0].get_clim() == pytest.approx((-m, m))
        assert ax.images[0].get_cmap().name.startswith("RdBu_r")
        index, norm = ax.get_title().split(": ")
        assert int(index) == i and float(norm) == pytest.approx(norms[i].item(), rel=0.05)
        red = to_hex(ax.title.get_color()) == to_hex(plots.RED)
        framed = ax.get_frame_on() and to_hex(ax.spines["top"].get_edgecolor()) == to_hex(plots.RED)
        assert red == framed == (i in (2, 7)), i
    assert "collapsed (2 of 10)" in fig.get_suptitle()
    with pytest.raises(ValueError):
        plots.plot_filters(weight[0])


def test_headline_formats_a_run_as_printed():
    records = history(3, val=True, seconds=824.0)  # 2,472 s of wall time
    for r, acc in zip(records, (0.5, 0.7, 0.65), strict=False):
        r["test_acc"] = acc
    h = headline(records)
    assert h == {
        "final_acc": "65.00%",
        "final_loss": f"{2.1 / 3:.4f}",
        "best_epoch": "2",
        "best_acc": "70.00%",
        "wall_time": "41 min 12 s",
        "train_time": "24 s",
        "best_val_epoch": "3",
        "best_val_acc": f"{0.3 + 3 / 105:.2%}",
        "final_val_acc": f"{0.3 + 3 / 105:.2%}",
        "original_epoch": "2",
        "original_seconds": "16 s",
    }
    assert "original_epoch" not in headline(history(2))  # never reached 69.26%


def test_epoch_statistics():
    h = history(5)
    for r, acc in zip(h, (0.5, 0.7, 0.69, 0.72, 0.6), strict=False):
        r["test_acc"] = acc
    assert best_epoch(h)["epoch"] == 4
    assert first_reaching(h, 0.69)["epoch"] == 2 and first_reaching(h, 0.8) is None
    assert seconds_to(h, 0.71) == 32.0 and seconds_to(h, 0.8) is None
    spread = seed_spread([history(1), history(2), history(3)])
    assert spread["mean"] == pytest.approx(0.3 + 2 / 110)
    assert spread["std"] == pytest.approx(1 / 110)
    assert REPORT.spread([0.5])["std"] == 0.0


def test_fixed_batches_mix_the_stored_order():
    labels = torch.arange(1000) % 10
    predictions = labels.clone()
    predictions[-100:] = (predictions[-100:] + 1) % 10  # the last 100 are all wrong
    accuracies = REPORT.fixed_batch_accuracies(predictions, labels, batch_size=100, seed=0)
    assert accuracies.shape == (10,) and accuracies.dtype == torch.float64
    assert accuracies.mean().item() == pytest.approx(0.9)
    assert accuracies.min() < 1 and accuracies.max() < 1  # the errors are spread over the batches
    assert torch.equal(accuracies, REPORT.fixed_batch_accuracies(predictions, labels, 100, seed=0))
    assert REPORT.fixed_batch_accuracies(predictions, labels, batch_size=300).shape == (3,)
    assert len(REPORT.fixed_batch_accuracies(predictions[:99], labels[:99])) == 0  # none whole


def test_binomial_interval_and_the_original_figures():
    assert REPORT.binomial_interval(0.66, 10_000) == pytest.approx(0.00928, abs=5e-5)
    assert REPORT.binomial_interval(0.5, 100, z=1.0) == pytest.approx(0.05)
    assert REPORT.binomial_interval(1.0, 10) == 0.0
    for accuracy, n in ((1.2, 100), (66.0, 100), (0.5, 0)):
        with pytest.raises(ValueError):
            REPORT.binomial_interval(accuracy, n)
    assert {k: v for k, (v, _) in REPORT.ORIGINAL.items()} == {
        "test_acc": 0.6926,
        "train_acc": 0.6742,
        "train_loss": 0.00907,
        "test_loss": 0.00946,
    }
    assert all(meaning for _, meaning in REPORT.ORIGINAL.values())


def checkout(root: Path, runs=("lab",)) -> Path:
    (root / "results").mkdir(parents=True)
    (root / "pyproject.toml").write_text('[project]\nname = "labcnn"\n')
    for name in runs:
        (root / "results" / f"{name}.json").write_text(json.dumps(history(2)))
    return root


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """labcnn as if installed in site-packages: no checkout around the package."""
    monkeypatch.setattr(labcnn, "__file__", str(tmp_path / "site-packages/labcnn/__init__.py"))
    return tmp_path


def test_committed_reads_the_checkout_labcnn_is_imported_from(tmp_path, monkeypatch):
    assert notebook.results_dir() == Path(labcnn.__file__).resolve().parents[1] / "results"
    root = checkout(tmp_path / "repo")
    monkeypatch.setattr(labcnn, "__file__", str(root / "labcnn" / "__init__.py"))
    monkeypatch.chdir(checkout(tmp_path / "other", runs=()))  # the imported checkout comes first
    assert notebook.results_dir() == root / "results"
    assert notebook.committed("lab") == history(2) and notebook.committed("absent") is None


@pytest.mark.parametrize("where", [".", "notebooks", "notebooks/deeper"])
def test_committed_reads_a_checkout_around_the_working_folder(installed, monkeypatch, where):
    root = checkout(installed / "repo")
    (root / where).mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(root / where)
    assert notebook.results_dir() == root / "results" and notebook.committed("lab") == history(2)


@pytest.mark.parametrize("cwd", ["colab", "colab/notebooks"])
def test_committed_reads_a_clone_next_to_the_notebook(installed, monkeypatch, cwd):
    root = checkout(installed / "colab" / "labcnn")  # ./labcnn, then ../labcnn from notebooks/
    (installed / cwd).mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(installed / cwd)
    assert notebook.results_dir() == root / "results" and notebook.committed("lab") == history(2)


def test_committed_is_none_without_a_checkout(installed, monkeypatch):
    (installed / "alone" / "results").mkdir(parents=True)  # results/ alone is not a checkout
    (installed / "alone" / "results" / "lab.json").write_text("[]")
    monkeypatch.chdir(installed / "alone")
    assert notebook.results_dir() is None and notebook.committed("lab") is None
    assert "../labcnn" in notebook.RESULTS_PLACES


def test_committed_names_a_file_that_is_not_json(installed, monkeypatch):
    root = checkout(installed / "repo", runs=())
    (root / "results" / "lab.json").write_text('[{"epoch": 1,')
    monkeypatch.chdir(root)
    with pytest.raises(labcnn.LabcnnError, match=r"lab\.json is not JSON"):
        notebook.committed("lab")


def test_readings_of_a_run_on_fewer_than_100_test_images(tree_data):
    """A re-packed copy with a small test set: every reading computes, the batch figures say
    there is no whole batch of 100 (issue 26, case 1)."""
    from labcnn.harness import train as fit
    from labcnn.lab import evaluate
    from labcnn.settings import make_config

    _, train, test = tree_data  # 5 test images per class: 50
    trained = fit(make_config(epochs=1, batch_size=32, lr=0.001), train, test, log=lambda _: None)
    found = REPORT.readings(trained, train, test, evaluate(trained, *test))
    assert found["fixed_batches"] is None and found["epochs"] == 1
    assert found["mean_over_epochs"] == trained.history[0]["test_acc"]  # the mean of one epoch
    assert sum(found["predicted"].values()) == len(test[1])
    assert set(found["dead_units"]) == {"conv1", "conv2", "conv3", "fc1", "fc2"}
    json.dumps(found)  # plain numbers: results/lab-readings.json holds them
    result = evaluate(trained, *test)
    predictions = test[1].clone()
    predictions[0] = (predictions[0] + 1) % 10  # the only error is image 0, a falsy index
    result.update(predictions=predictions, confidence=torch.full((len(predictions),), 0.5))
    top_error = REPORT.readings(trained, train, test, result)["top_error"]
    assert top_error == [CLASSES[test[1][0]], CLASSES[predictions[0]], 0.5]
