"""Every figure in the README's results and in the notebook's text comes from a committed run.

``results/<run>.json`` holds each reported run's per-epoch history (copied from its run folder),
``results/*-filters.json`` the filter counts of ``python -m labcnn filters``, and
``results/*.txt`` the output of ``python -m labcnn evaluate``. The README's and the notebook's
figures are re-derived from them with :mod:`labcnn.analysis`, or read from the notebook's own
committed cell outputs (the reference run's), so a stale number fails.
"""
import json
import re
from pathlib import Path

import pytest

from labcnn import analysis

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "lab1_cnn_cifar10.ipynb"
HISTORIES = {p.stem: json.loads(p.read_text()) for p in sorted((REPO / "results").glob("*.json"))
             if isinstance(json.loads(p.read_text()), list)}
# The original lab report's claims, quoted: test and training accuracy, its losses times 100.
ORIGINAL = {f"{analysis.ORIGINAL_ACCURACY:.2%}", "67.42%", "0.907", "0.946"}
# A figure: a percentage with two decimals, a loss with four, or a duration; in the notebook's
# text also a number with three decimals (the epoch lines print losses so).
FIGURE = re.compile(r"\b\d{1,3}\.\d\d%|\b\d\.\d{4}\b|\b\d+ min \d+ s\b")
NOTEBOOK_FIGURE = re.compile(FIGURE.pattern + r"|\b\d\.\d{3}\b")


def cells(kind: str) -> list[dict]:
    return [c for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == kind]


def notebook_markdown() -> str:
    return "\n".join("".join(c["source"]) for c in cells("markdown"))


def notebook_outputs() -> str:
    texts = [o.get("text", "") for c in cells("code") for o in c.get("outputs", [])]
    return "".join(t if isinstance(t, str) else "".join(t) for t in texts)


def seed_groups() -> dict[str, list[list[dict]]]:
    """Runs that differ only in their seed (``NAME-seedN``), grouped by ``NAME``, two or more."""
    groups = {}
    for name, history in HISTORIES.items():
        if re.fullmatch(r".+-seed\d+", name):
            groups.setdefault(name.rsplit("-seed", 1)[0], []).append(history)
    return {k: v for k, v in groups.items() if len(v) > 1}


def allowed() -> set:
    """Figures derived from results/, printed in results/*.txt, or printed by the notebook's cells."""
    values = set(ORIGINAL) | set(NOTEBOOK_FIGURE.findall(notebook_outputs()))
    for history in HISTORIES.values():
        values |= set(analysis.headline(history).values())
    for runs in seed_groups().values():
        values |= {f"{v:.2%}" for v in analysis.seed_spread(runs).values()}
    tta = time_to_accuracy()
    values.add(f"{tta['final_test_acc']:.2%}")
    for path in (REPO / "results").glob("*.txt"):
        values |= set(FIGURE.findall(path.read_text()))
    return values


def time_to_accuracy() -> dict:
    """The JSON line of ``python -m labcnn bench --time-to-accuracy``, saved in results/."""
    return json.loads((REPO / "results" / "time-to-accuracy.txt").read_text().strip().splitlines()[-1])


def results_section() -> str:
    text = (REPO / "README.md").read_text()
    return text.split("## Results", 1)[1].split("\n## ", 1)[0]


@pytest.mark.parametrize("name", HISTORIES)
def test_readme_row_matches_history(name):
    rows = [line for line in results_section().splitlines() if line.startswith("|") and line.endswith(f"`results/{name}.json` |")]
    assert len(rows) == 1, f"README's results table needs one row naming results/{name}.json"
    f = analysis.headline(HISTORIES[name])
    keys = ["final_acc", "final_loss", "best_val_epoch", "original_epoch", "original_seconds"]
    for key in (k for k in keys if k in f):
        assert f[key] in rows[0], f"{key} {f[key]} missing from the README row for {name}"


@pytest.mark.parametrize("text, figure", [(results_section, FIGURE), (notebook_markdown, NOTEBOOK_FIGURE)], ids=["README", "notebook"])
def test_every_figure_comes_from_a_committed_run(text, figure):
    stale = set(figure.findall(text())) - allowed()
    assert not stale, f"figures found neither in results/ nor in the notebook's outputs: {sorted(stale)}"


def test_the_check_can_fail():
    assert "12.34%" not in allowed() and "0.1234" not in allowed()


@pytest.mark.skipif("lab" not in HISTORIES, reason="no committed lab run yet")
def test_notebook_outputs_come_from_the_committed_lab_run():
    outputs = notebook_outputs()
    f = analysis.headline(HISTORIES["lab"])
    assert f"final test accuracy {f['final_acc']}, test loss {f['final_loss']}" in outputs
    assert f"training time {f['train_time']}; wall time with evaluation {f['wall_time']}" in outputs
    assert "run complete: 50 of 50 epochs restored" in outputs
    markdown = " ".join(notebook_markdown().split())
    assert f"{f['train_time']} of training, or {f['wall_time']} of wall time" in markdown


def speed_section() -> str:
    text = (REPO / "README.md").read_text()
    return text.split("## Speed", 1)[1].split("\n## ", 1)[0]


def test_time_to_accuracy_line_matches_the_committed_runs():
    """The speed table's time-to-accuracy row: the bench's figures, and the training seconds to
    80% and 85% read from the committed 50-epoch histories (long and improved recipes)."""
    rows = [line for line in speed_section().splitlines() if line.startswith("| time to accuracy")]
    assert len(rows) == 1, "the Speed section needs one '| time to accuracy' row"
    tta = time_to_accuracy()
    expected = [f"{tta['seconds_to_target']:.1f} s", f"{tta['img_s']:.0f} images/s", f"{tta['gflop_s']:.2f} GFLOP/s"]
    for name in sorted(n for n in HISTORIES if re.fullmatch(r"(long|improved-50ep-bf16(-all50k)?)-seed\d+", n)):
        for target in (0.80, 0.85):
            seconds = analysis.seconds_to(HISTORIES[name], target)
            expected.append(f"{target:.0%}: " + ("not reached" if seconds is None else f"{seconds:.0f} s"))
    assert len(expected) > 3, "no committed long-recipe history"
    for figure in expected:
        assert figure in rows[0], f"{figure} missing from the time-to-accuracy row"


def test_speed_table_matches_the_committed_bench_output():
    """The contenders' rows and ratios: the JSON line of ``python -m labcnn bench`` in results/."""
    result = json.loads((REPO / "results" / "bench.txt").read_text().strip().splitlines()[-1])
    section = speed_section()
    labels = {"baseline": "(a) baseline", "labcnn": "(b) labcnn", "ceiling": "(c) ceiling",
              "labcnn_bf16": "(b16) labcnn", "ceiling_bf16": "(c16) ceiling"}
    assert set(result["median_img_s"]) <= set(labels), "a contender the README's table does not name"
    for name in result["median_img_s"]:
        row = next(line for line in section.splitlines() if line.startswith(f"| {labels[name]}"))
        cells = [c.strip() for c in row.split("|")[2:5]]
        assert cells == [f"{result[f'{name}_img_s']:.0f}", f"{result['median_img_s'][name]:.0f}", f"{50_000 / result[f'{name}_img_s']:.1f}"]
    assert f"{result['speedup_vs_baseline']:.2f} times as fast" in section
    assert f"{result['fraction_of_ceiling']:.2f} of the ceiling" in section
    if "fraction_of_ceiling_bf16" in result:
        assert f"{result['fraction_of_ceiling_bf16']:.2f} of the bfloat16 ceiling" in section
        assert f"{result['fraction_of_fastest_ceiling']:.2f} of the faster ceiling" in section
