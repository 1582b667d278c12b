"""Every figure in the README's results and in the notebook's text matches the committed runs.

``results/<run>.json`` holds each reported run's per-epoch history (copied from its run folder);
the figures are re-derived from it with :func:`labcnn.analysis.headline`, so a stale number fails.
"""
import json
import re
from pathlib import Path

import pytest

from labcnn import analysis

REPO = Path(__file__).resolve().parents[1]
RESULTS = sorted((REPO / "results").glob("*.json"))
ORIGINAL_REPORT = f"{analysis.ORIGINAL_ACCURACY:.2%}"  # the original lab report's claim, quoted for comparison
PERCENT = re.compile(r"\b\d{1,3}\.\d\d%")


def figures(path) -> dict:
    return analysis.headline(json.loads(path.read_text()))


def allowed() -> set:
    """Figures derived from results/*.json, printed in results/*.txt (evaluate's output), and 69.26%."""
    values = {ORIGINAL_REPORT}
    for path in RESULTS:
        values |= set(figures(path).values())
    for path in (REPO / "results").glob("*.txt"):
        values |= set(PERCENT.findall(path.read_text()))
    return values


def results_section() -> str:
    text = (REPO / "README.md").read_text()
    return text.split("## Results", 1)[1].split("\n## ", 1)[0]


def notebook_markdown() -> str:
    cells = json.loads((REPO / "notebooks" / "lab1_cnn_cifar10.ipynb").read_text())["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")


@pytest.mark.skipif(not RESULTS, reason="no committed results yet")
@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.stem)
def test_readme_row_matches_history(path):
    rows = [line for line in results_section().splitlines() if line.startswith("|") and f"results/{path.name}" in line]
    assert len(rows) == 1, f"README's results table needs one row naming results/{path.name}"
    f = figures(path)
    keys = ["final_acc", "final_loss", "best_epoch", "best_val_epoch", "original_epoch", "original_seconds"]
    for key in (k for k in keys if k in f):
        assert f[key] in rows[0], f"{key} {f[key]} missing from the README row for {path.name}"


@pytest.mark.parametrize("text", [results_section, notebook_markdown], ids=["README", "notebook"])
def test_every_percentage_comes_from_a_committed_run(text):
    stale = set(PERCENT.findall(text())) - allowed()
    assert not stale, f"figures not found in results/: {sorted(stale)}"


@pytest.mark.skipif(not (REPO / "results" / "lab.json").exists(), reason="no committed lab run yet")
def test_notebook_outputs_come_from_the_committed_lab_run():
    cells = json.loads((REPO / "notebooks" / "lab1_cnn_cifar10.ipynb").read_text())["cells"]
    outputs = "".join(o.get("text", "") if isinstance(o.get("text", ""), str) else "".join(o["text"])
                      for c in cells if c["cell_type"] == "code" for o in c.get("outputs", []))
    f = figures(REPO / "results" / "lab.json")
    assert f"final test accuracy {f['final_acc']}, test loss {f['final_loss']}" in outputs
    assert f"training wall time  {f['wall_time']}" in outputs
    assert "run complete: 50 of 50 epochs restored" in outputs
    assert f"Total training wall time: {f['wall_time']}" in " ".join(notebook_markdown().split())
