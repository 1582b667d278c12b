"""Every figure in README.md, results/README.md and the notebooks' text comes from a committed run.

``results/<run>.json`` holds each reported run's per-epoch history, ``results/*-filters.json``
the counts of ``python -m labcnn filters``, ``results/*.txt`` printed outputs (evaluate, bench,
the removed ``bench --time-to-accuracy``). A figure (a percentage with two decimals, a loss with
four, a duration as :func:`labcnn.harness.format_duration` or minutes and seconds write it) must
be derived from a history, printed in ``results/*.txt`` or by a notebook's cells, or quoted from
the original report (``ORIGINAL`` in the notebook), so a stale number fails. Nothing here names a
figure: the documents may quote whichever runs they like.
"""

import contextlib
import functools
import io
import itertools
import json
import re
import shlex
import statistics
from pathlib import Path

import pytest
import torch
from helpers import report_code

from labcnn.harness import format_duration
from labcnn.model import LAB_MEAN, LAB_STD
from labcnn.settings import make_config

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results"
REPORT = report_code()  # the notebook's readings code: ORIGINAL, spread
DOCS = ("README.md", "results/README.md")
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
HISTORIES = {
    p.stem: json.loads(p.read_text())
    for p in sorted(RESULTS.glob("*.json"))
    if isinstance(json.loads(p.read_text()), list)
}
# A figure: a percentage with two decimals, a loss with four, or a duration; in a notebook's text
# also a number with three decimals (its epoch lines print losses so).
FIGURE = re.compile(r"\b\d{1,3}\.\d\d%|\b\d\.\d{4}\b|\b\d+ min \d+ s\b|\b\d+ h \d\d min\b")
NOTEBOOK_FIGURE = re.compile(FIGURE.pattern + r"|\b\d\.\d{3}\b")
HISTORY_NAME = re.compile(r"results/([\w.{},-]+)\.json")
RELATIVE_TIME = re.compile(
    r"\b(latest|(earlier|previous|this|last) session|sessions? ago"
    r"|session after)\b",
    re.IGNORECASE,
)
CONTENDERS = {
    "baseline": "(a) baseline",
    "labcnn": "(b) labcnn",
    "ceiling": "(c) ceiling",
    "labcnn_bf16": "(b16) labcnn",
    "ceiling_bf16": "(c16) ceiling",
}


# How the README and results/README.md print a run's figures (derived here, checked below).


def best_epoch(history: list[dict], key: str = "test_acc") -> dict:
    return max(history, key=lambda r: r[key])  # for information: never select on the test set


def first_reaching(history: list[dict], accuracy: float) -> dict | None:
    return next((r for r in history if r["test_acc"] >= accuracy), None)


def seconds_to(history: list[dict], accuracy: float) -> float | None:
    return (first_reaching(history, accuracy) or {}).get("elapsed_train_seconds")


def headline(history: list[dict]) -> dict[str, str]:
    """A run's figures as printed; ``best_val_*``: with validation; ``original_*``: once reached."""
    last, best = history[-1], best_epoch(history)
    figures = {
        "final_acc": f"{last['test_acc']:.2%}",
        "final_loss": f"{last['test_loss']:.4f}",
        "best_epoch": str(best["epoch"]),
        "best_acc": f"{best['test_acc']:.2%}",
        "wall_time": format_duration(sum(r["seconds"] for r in history)),
        "train_time": format_duration(last["elapsed_train_seconds"]),
    }
    if val := "val_acc" in last and best_epoch(history, "val_acc"):
        figures.update(
            best_val_epoch=str(val["epoch"]),
            best_val_acc=f"{val['val_acc']:.2%}",
            final_val_acc=f"{last['val_acc']:.2%}",
        )
    if reached := first_reaching(history, REPORT.ORIGINAL["test_acc"][0]):
        figures.update(
            original_epoch=str(reached["epoch"]),
            original_seconds=f"{reached['elapsed_train_seconds']:.0f} s",
        )
    return figures


def seed_spread(histories: list[list[dict]], key: str = "test_acc") -> dict[str, float]:
    return REPORT.spread([h[-1][key] for h in histories])


def doc(name: str) -> str:
    return (REPO / name).read_text()


def notebook_cells(path: Path, kind: str) -> list[dict]:
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == kind]


def notebook_markdown(path: Path) -> str:
    return "\n".join("".join(c["source"]) for c in notebook_cells(path, "markdown"))


@functools.cache
def notebook_outputs() -> str:
    """The text every notebook's cells printed (streams and plain-text results)."""
    texts = []
    for path in NOTEBOOKS:
        for output in (o for c in notebook_cells(path, "code") for o in c.get("outputs", [])):
            texts += [output.get("text", ""), output.get("data", {}).get("text/plain", "")]
    return "\n".join(t if isinstance(t, str) else "".join(t) for t in texts)


def printed() -> str:
    return "\n".join(p.read_text() for p in sorted(RESULTS.glob("*.txt")))


def seed_groups() -> dict[str, list[list[dict]]]:
    """Runs that differ only in their seed (``NAME-seedN``), grouped by ``NAME``, two or more."""
    groups = {}
    for name, history in HISTORIES.items():
        if re.fullmatch(r".+-seed\d+", name):
            groups.setdefault(name.rsplit("-seed", 1)[0], []).append(history)
    return {k: v for k, v in groups.items() if len(v) > 1}


def original() -> set[str]:
    """The original report's figures as quoted: accuracies in percent, losses times 100."""
    return {
        f"{v:.2%}" if "acc" in key else f"{100 * v:.3f}" for key, (v, _) in REPORT.ORIGINAL.items()
    }


def derived(history: list[dict]) -> set[str]:
    """One run's figures: :func:`headline` and the means over its epochs."""
    values = set(headline(history).values())
    for key in (k for k in history[-1] if k.endswith(("_acc", "_loss"))):
        mean = statistics.fmean(r[key] for r in history)
        values |= {f"{mean:.2%}"} if key.endswith("_acc") else {f"{mean:.4f}", f"{mean:.3f}"}
    return values


def spread_figures(histories: list[list[dict]]) -> set[str]:
    return {f"{v:.2%}" for v in seed_spread(histories).values()}


@functools.cache
def allowed() -> frozenset[str]:
    """Figures derived from results/, printed in results/*.txt or by the notebooks' cells, quoted
    from the original report, or the lab recipe's normalization constants (labcnn.model)."""
    values = original() | set(NOTEBOOK_FIGURE.findall(notebook_outputs()))
    values |= set(FIGURE.findall(printed())) | {f"{v:.4f}" for v in LAB_MEAN + LAB_STD}
    # the lab's recipe and Adam's defaults, which the notebook's update rule names
    adam = torch.optim.Adam([torch.zeros(1, requires_grad=True)]).defaults
    lab = make_config()
    values |= {f"{v:g}" for v in (lab.lr, lab.weight_decay, *adam["betas"], adam["eps"])}
    for history in HISTORIES.values():
        values |= derived(history)
    for runs in seed_groups().values():
        values |= spread_figures(runs)
    return frozenset(values)


def expand(names: str) -> list[str]:
    """``fast-seed{1,2,3}`` -> ``fast-seed1``, ``fast-seed2``, ``fast-seed3``."""
    parts = re.split(r"\{([^}]*)\}", names)
    choices = [[p] if i % 2 == 0 else p.split(",") for i, p in enumerate(parts)]
    return ["".join(c) for c in itertools.product(*choices)]


def table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


def named(row: str) -> list[str]:
    return [n for match in HISTORY_NAME.findall(row) for n in expand(match)]


def row_problems(row: str) -> list[str]:
    """What in a table row naming histories does not match them: a missing history, a figure
    none of them gives, a final accuracy left out, a wrong best or first-reaching epoch."""
    names = named(row)
    if missing := [n for n in names if n not in HISTORIES]:
        return [f"names results/{n}.json, which is not committed" for n in missing]
    histories = [HISTORIES[n] for n in names]
    figures = original() | set().union(*map(derived, histories))
    if len(histories) > 1:
        figures |= spread_figures(histories)
    problems = [f"{f} is not a figure of {names}" for f in FIGURE.findall(row) if f not in figures]
    if len(histories) > 1:
        return problems
    f = headline(histories[0])
    if f["final_acc"] not in row:
        problems.append(f"the final test accuracy {f['final_acc']} is missing")
    pairs = {(f["best_epoch"], f["best_acc"]), (f.get("best_val_epoch"), f.get("best_val_acc"))}
    problems += [
        f"epoch {e} ({a}) is neither the best test nor the best validation epoch"
        for e, a in re.findall(r"\b(\d+) \((\d{1,3}\.\d\d%)\)", row)
        if (e, a) not in pairs
    ]
    problems += [
        f"best test epoch {e}, not {f['best_epoch']}"
        for e in re.findall(r"\btest: (\d+)\b", row)
        if e != f["best_epoch"]
    ]
    reached = (f.get("original_epoch"), f.get("original_seconds"))
    problems += [
        f"69.26% first reached at epoch {e}, {s}, not {reached}"
        for e, s in re.findall(r"\bepoch (\d+), (\d+ s)\b", row)
        if (e, s) != reached
    ]
    return problems


@pytest.mark.parametrize("name", DOCS)
def test_table_rows_match_the_histories_they_name(name):
    problems = {
        row[:60]: p for row in table_rows(doc(name)) if named(row) for p in [row_problems(row)] if p
    }
    assert not problems, f"{name}: rows that do not match their histories: {problems}"


def test_every_history_has_a_table_row():
    rows = "\n".join(table_rows(doc("README.md")) + table_rows(doc("results/README.md")))
    missing = sorted(set(HISTORIES) - set(named(rows)))
    assert not missing, f"histories no table row names (README.md, results/README.md): {missing}"


@pytest.mark.parametrize("name", DOCS + tuple(str(p.relative_to(REPO)) for p in NOTEBOOKS))
def test_every_figure_comes_from_a_committed_run(name):
    if name.endswith(".ipynb"):
        found = NOTEBOOK_FIGURE.findall(notebook_markdown(REPO / name))
    else:
        found = FIGURE.findall(doc(name))
    stale = set(found) - allowed()
    assert not stale, f"{name}: figures neither derived from results/ nor printed: {sorted(stale)}"


@pytest.mark.parametrize("name", DOCS)
def test_times_to_accuracy_come_from_the_histories(name):
    """``80%: 2060 s``: the training seconds some committed history took to reach 80%."""
    for target, seconds in re.findall(r"\b(\d\d)%: (\d+) s\b", doc(name)):
        reached = {seconds_to(h, int(target) / 100) for h in HISTORIES.values()}
        assert f"{seconds} s" in {f"{s:.0f} s" for s in reached if s is not None}, (
            f"{name}: no committed history reached {target}% after {seconds} s"
        )


def filter_counts(text: str) -> set[tuple[str, str, str]]:
    return set(re.findall(r"\b(conv\d) (\d+)(?:/| of )(\d+)\b", text))


@pytest.mark.parametrize("name", DOCS)
def test_collapsed_filter_counts_come_from_the_committed_counts(name):
    known = filter_counts(printed() + notebook_outputs())
    for path in RESULTS.glob("*-filters.json"):
        known |= {
            (conv, str(n), str(total))
            for counts in json.loads(path.read_text()).values()
            for conv, (n, total) in counts.items()
        }
    stale = filter_counts(doc(name)) - known
    assert not stale, f"{name}: filter counts found in no committed output: {sorted(stale)}"


def bench_result(path: Path) -> dict:
    """The JSON line that ``python -m labcnn bench`` printed last into ``path``."""
    return json.loads(path.read_text().strip().splitlines()[-1])


@pytest.mark.parametrize("name", DOCS)
def test_speed_tables_match_the_committed_bench_output(name):
    """A contenders table holds the figures of the ``results/bench*.txt`` named last before it."""
    text = doc(name)
    for table in re.finditer(r"(?m)^\| \(a\) baseline.*(?:\n\|.*)*", text):
        source = re.findall(r"results/bench[\w.-]*\.txt", text[: table.start()])
        assert source, f"{name}: a contenders table with no results/bench*.txt named before it"
        result = bench_result(REPO / source[-1])
        rows = table_rows(table.group())
        for key, label in CONTENDERS.items():
            row = [r for r in rows if r.startswith(f"| {label}")]
            assert bool(row) == (key in result["median_img_s"]), f"{name}: row {label}"
            if row:
                cells = [c.strip() for c in row[0].split("|")[2:5]]
                img_s = result[f"{key}_img_s"]
                assert cells == [
                    f"{img_s:.0f}",
                    f"{result['median_img_s'][key]:.0f}",
                    f"{50_000 / img_s:.1f}",
                ], f"{name}: {source[-1]}, {label}"


@pytest.mark.parametrize("name", DOCS)
def test_bench_ratios_come_from_a_committed_bench_output(name):
    results = [bench_result(p) for p in sorted(RESULTS.glob("bench*.txt"))]
    phrases = {
        "speedup_vs_baseline": r"times as fast as the tutorial",
        "fraction_of_ceiling": r"of the ceiling",
        "fraction_of_ceiling_bf16": r"of the bfloat16 ceiling",
        "fraction_of_fastest_ceiling": r"of the faster ceiling",
    }
    text = " ".join(doc(name).split())
    for key, phrase in phrases.items():
        for value in re.findall(rf"\b(\d\.\d\d) {phrase}", text):
            assert value in {f"{r[key]:.2f}" for r in results if key in r}, (
                f"{name}: '{value} {phrase}' is in no committed bench output"
            )


def command_units(text: str) -> list[str]:
    """Table rows, bullets and paragraphs: the context that says "an earlier labcnn"."""
    units, current = [], []
    for line in text.splitlines() + [""]:
        if not line.strip() or line.startswith("|") or line.lstrip().startswith("- "):
            units.append(" ".join(current))
            current = [line] if line.strip() else []
        else:
            current.append(line.strip())
    return [u for u in units if u]


def parse_error(command: str) -> str | None:
    """Why the command line refuses ``command`` (``python -m labcnn ...``), or None."""
    from benchmarks import bench
    from labcnn.cli import build_parser

    argv = shlex.split(command)[3:]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            if argv[:1] == ["bench"]:  # bench parses its own options
                bench.build_parser().parse_args(argv[1:])
            else:
                build_parser().parse_args(argv)
        except SystemExit:
            return stderr.getvalue().strip() or "refused"
    return None


def test_results_commands_use_options_that_exist():
    """Every ``python -m labcnn ...`` in results/README.md parses, unless it says it was run with
    an earlier labcnn; then it needs an option since removed, so the remark stays true."""
    units = [
        (u, re.findall(r"`(python -m labcnn [^`]*)`", u))
        for u in command_units(doc("results/README.md"))
    ]
    assert any(commands for _, commands in units), "results/README.md shows no command"
    for unit, commands in (u for u in units if u[1]):
        errors = [parse_error(c) for c in commands]
        if "earlier labcnn" in unit:
            assert any(errors), f"all of {commands} run today: drop 'an earlier labcnn'"
        else:
            assert not any(errors), (
                f"{[(c, e) for c, e in zip(commands, errors, strict=False) if e]}"
            )


@pytest.mark.parametrize("name", DOCS)
def test_no_relative_time(name):
    """Each figure names its CPU, never a session counted from now."""
    found = sorted({m.group() for m in RELATIVE_TIME.finditer(doc(name))})
    assert not found, f"{name} says {found}: name the CPU instead"


def test_the_checks_can_fail():
    values = allowed()
    assert not {"12.34%", "0.1234", "12 min 34 s", "9 h 59 min"} & values  # no run took these
    name, history = next(iter(HISTORIES.items()))
    f = headline(history)
    good = f"| a run | {f['final_acc']} | {f['final_loss']} | `results/{name}.json` |"
    assert row_problems(good) == []
    assert row_problems(good.replace(f["final_acc"], "12.34%"))
    assert row_problems(good.replace(name, "no-such-run"))
    assert RELATIVE_TIME.search("measured in the Latest session") and not RELATIVE_TIME.search(
        "on the AVX2 CPU"
    )
    assert expand("fast-seed{1,2}") == ["fast-seed1", "fast-seed2"]


@pytest.mark.skipif("lab" not in HISTORIES, reason="no committed reference run")
def test_notebook_prints_the_committed_reference_run():
    """The notebook's committed outputs come from ``results/lab.json``'s run."""
    f = headline(HISTORIES["lab"])
    assert f"final test accuracy {f['final_acc']}" in notebook_outputs()
