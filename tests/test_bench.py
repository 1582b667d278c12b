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


def test_bf16_contenders_are_compared_with_the_bf16_ceiling(monkeypatch):
    monkeypatch.setattr(bench, "WARMUP_STEPS", 1)
    images, labels = bench.random_data(200)
    lines = []
    result = bench.run(images, labels, images_per_round=100, rounds=1, bf16=True, log=lines.append)  # emulated here
    bench.report(result, log=lines.append)
    assert result["labcnn_bf16_img_s"] > 0 and result["ceiling_bf16_img_s"] > 0
    assert result["fraction_of_ceiling_bf16"] == pytest.approx(result["labcnn_bf16_img_s"] / result["ceiling_bf16_img_s"], rel=1e-3)
    assert result["fraction_of_ceiling"] == pytest.approx(result["labcnn_img_s"] / result["ceiling_img_s"], rel=1e-3)
    fastest = max(result["labcnn_img_s"], result["labcnn_bf16_img_s"]) / max(result["ceiling_img_s"], result["ceiling_bf16_img_s"])
    assert result["fraction_of_fastest_ceiling"] == pytest.approx(fastest, rel=1e-3)
    assert "bf16_absent" not in result and any("(c16) ceiling bf16" in line for line in lines)


def test_bf16_is_absent_without_native_support_and_says_why(capsys, monkeypatch):
    monkeypatch.setattr(bench, "native_bf16", lambda device: False)
    printed, result = run_bench(capsys, monkeypatch)
    assert "labcnn_bf16_img_s" not in result and "avx512_bf16" in result["bf16_absent"]
    assert f"no bfloat16 contenders: {result['bf16_absent']}" in printed
    assert result["fraction_of_fastest_ceiling"] == result["fraction_of_ceiling"]


def test_summary_compares_the_fastest_path_with_the_fastest_ceiling():
    speeds = {"baseline": [100], "labcnn": [180, 200], "ceiling": [210], "labcnn_bf16": [290], "ceiling_bf16": [300]}
    result = bench.summarize(speeds, "cpu", 100, 2, compile=False)
    assert (result["fraction_of_ceiling"], result["fraction_of_ceiling_bf16"], result["fraction_of_fastest_ceiling"]) == (
        round(200 / 210, 4), round(290 / 300, 4), round(290 / 300, 4))
    assert result["speedup_vs_baseline"] == 2.0
