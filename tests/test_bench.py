"""``python -m labcnn bench`` on tiny sizes: the report's shape and arithmetic, never a speed."""
import json

import pytest
import torch

from labcnn import bench
from labcnn.cli import main

KEYS = {"baseline_img_s", "labcnn_img_s", "ceiling_img_s", "speedup_vs_baseline", "fraction_of_ceiling", "device"}


def run_bench(capsys, monkeypatch, *extra):
    """Run the bench command on 200 images per round, one round, one warm-up step; return
    (printed text, the JSON line as a dict)."""
    monkeypatch.setattr(bench, "WARMUP_STEPS", 1)
    assert main(["bench", "--images-per-round", "200", "--rounds", "1", "--device", "cpu", *extra]) == 0
    printed = capsys.readouterr().out
    return printed, json.loads(printed.strip().splitlines()[-1])


def test_bench_reports_positive_speeds_and_their_ratios(capsys, monkeypatch):
    printed, result = run_bench(capsys, monkeypatch)
    assert KEYS <= set(result)
    assert "random uint8 images" in printed and "s/epoch (50k)" in printed
    assert all(result[k] > 0 for k in ("baseline_img_s", "labcnn_img_s", "ceiling_img_s"))
    assert result["speedup_vs_baseline"] == pytest.approx(result["labcnn_img_s"] / result["baseline_img_s"], rel=1e-3)
    assert result["fraction_of_ceiling"] == pytest.approx(result["labcnn_img_s"] / result["ceiling_img_s"], rel=1e-3)
    assert result["device"].startswith("cpu") and result["images_per_round"] == 200


def test_compile_contender_is_reported(capsys, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda model: model)  # the reporting path, without compiling
    printed, result = run_bench(capsys, monkeypatch, "--compile")
    assert "(d) labcnn+compile" in printed
    assert result["compile_vs_labcnn"] == pytest.approx(result["compile_img_s"] / result["labcnn_img_s"], rel=1e-3)


def test_failing_compile_is_left_out_with_a_message(capsys, monkeypatch):
    def broken(model):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    printed, result = run_bench(capsys, monkeypatch, "--compile")
    assert "torch.compile failed, left out (RuntimeError: no compiler here)" in printed
    assert result["compile_img_s"] is None and result["labcnn_img_s"] > 0


def test_too_few_images_is_a_one_line_error():
    images, labels = bench.random_data(50)
    with pytest.raises(bench.ConfigError, match="at least one batch of 100 images"):
        bench.run(images, labels, images_per_round=100, rounds=1, log=lambda s: None)
