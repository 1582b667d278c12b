"""labcnn.bench on tiny sizes: the contenders' work, the result's keys and arithmetic, the bfloat16
gating and the FLOP count. No speed is ever asserted."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import bench
from labcnn import ConfigError
from labcnn.model import LabCNN
from labcnn.settings import make_config

KEYS = {
    "baseline_img_s",
    "labcnn_img_s",
    "ceiling_img_s",
    "speedup_vs_baseline",
    "fraction_of_ceiling",
    "fraction_of_fastest_ceiling",
    "device",
    "images_per_round",
    "rounds",
    "median_img_s",
    "warmup_s",
    "gflop_per_image",
    "matmul_peak_gflop_s",
    "step_gflop_s",
    "fraction_of_matmul_peak",
}
BF16_KEYS = {"labcnn_bf16_img_s", "ceiling_bf16_img_s", "fraction_of_ceiling_bf16"}


@pytest.fixture
def small(monkeypatch):
    """A 64-square matmul and one warm-up step, so that a run takes a second."""
    monkeypatch.setattr(bench, "MATMUL_SIZE", 64)
    monkeypatch.setattr(bench, "WARMUP_STEPS", 1)


def test_random_data_is_uint8_images_and_labels_repeatable_by_seed():
    images, labels = bench.random_data(30, seed=3)
    assert images.shape == (30, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.shape == (30,) and labels.dtype == torch.int64 and 0 <= labels.min() <= 9
    assert torch.equal(images, bench.random_data(30, seed=3)[0])
    assert not torch.equal(images, bench.random_data(30, seed=4)[0])


def test_every_contender_trains_the_same_fresh_model_one_step_per_batch(monkeypatch, one_thread):
    made = []

    def counting_optimizer(config, model):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        made.append({"start": {k: v.clone() for k, v in model.state_dict().items()}, "steps": 0})
        optimizer.register_step_post_hook(
            lambda *args: made[-1].update(steps=made[-1]["steps"] + 1)
        )
        return optimizer

    monkeypatch.setattr(bench, "make_optimizer", counting_optimizer)
    images, labels = bench.random_data(40)
    config = make_config("lab", batch_size=10, seed=0)
    for name in bench.NAMES:  # bfloat16 too, emulated or not: batches of 10 keep it quick
        bench.contender(name, images, labels, config, torch.device("cpu"), 0, staged=20)(30)
        assert made[-1]["steps"] == 3, name
    first = made[0]["start"]
    assert all(torch.equal(m["start"][k], first[k]) for m in made for k in first)


def test_a_tiny_run_reports_every_figure_and_its_arithmetic(monkeypatch, small, one_thread):
    monkeypatch.setattr(bench, "native_bf16", lambda device: False)
    images, labels = bench.random_data(130)  # cut to 100: whole batches of 50
    lines = []
    result = bench.run(
        images, labels, images_per_round=60, rounds=2, batch_size=50, log=lines.append
    )
    assert set(result) == KEYS | {"bf16_absent"}
    assert result["images_per_round"] == 100 and result["rounds"] == 2
    assert result["device"].startswith("cpu") and "100 images" in lines[0]
    assert (
        set(result["median_img_s"]) == set(result["warmup_s"]) == {"baseline", "labcnn", "ceiling"}
    )
    assert all(result[k] > 0 for k in ("baseline_img_s", "labcnn_img_s", "ceiling_img_s"))
    assert result["speedup_vs_baseline"] == pytest.approx(
        result["labcnn_img_s"] / result["baseline_img_s"], abs=1e-4
    )
    assert result["fraction_of_ceiling"] == pytest.approx(
        result["labcnn_img_s"] / result["ceiling_img_s"], abs=1e-4
    )
    assert result["fraction_of_fastest_ceiling"] == result["fraction_of_ceiling"]
    assert result["gflop_per_image"] == bench.flops_per_image(50) / 1e9
    assert (
        set(result["matmul_peak_gflop_s"]) == {"float32"}
        and result["matmul_peak_gflop_s"]["float32"] > 0
    )
    step = result["labcnn_img_s"] * result["gflop_per_image"]
    assert result["step_gflop_s"]["float32"] == pytest.approx(step, abs=0.05)
    assert result["fraction_of_matmul_peak"]["float32"] == pytest.approx(
        step / result["matmul_peak_gflop_s"]["float32"], rel=0.01, abs=1e-4
    )
    assert sum(line.startswith("round ") for line in lines) == 2
    lines.clear()
    bench.report(result, log=lines.append)
    assert json.loads(lines[-1]) == result
    printed = "\n".join(lines)
    assert "(b) labcnn" in printed and "s/epoch (50k)" in printed and "of the peak" in printed
    assert f"no bfloat16 contenders: {result['bf16_absent']}" in printed


@pytest.mark.parametrize(
    "native, bf16", [(True, None), (False, None), (False, True), (True, False)]
)
def test_bf16_contenders_and_peak_run_only_where_native_or_asked(monkeypatch, small, native, bf16):
    """The gating alone: contenders are stubs, the matmuls are real (64-square)."""
    built, dtypes, real_matmul = [], [], bench.matmul
    monkeypatch.setattr(bench, "native_bf16", lambda device: native)
    monkeypatch.setattr(
        bench, "contender", lambda name, *args: built.append(name) or (lambda n: None)
    )
    monkeypatch.setattr(
        bench, "matmul", lambda device, dtype: dtypes.append(dtype) or real_matmul(device, dtype)
    )
    images, labels = bench.random_data(100)
    lines = []
    result = bench.run(images, labels, images_per_round=100, rounds=1, bf16=bf16, log=lines.append)
    bench.report(result, log=lines.append)
    ran = native if bf16 is None else bf16
    assert built == list(bench.NAMES)[: 5 if ran else 3]
    assert dtypes == [torch.float32, torch.bfloat16][: 2 if ran else 1]
    precisions = {"float32", "bfloat16"} if ran else {"float32"}
    assert set(result["matmul_peak_gflop_s"]) == set(result["step_gflop_s"]) == precisions
    assert set(result["fraction_of_matmul_peak"]) == precisions
    assert (set(result) >= BF16_KEYS) == ran and ("bf16_absent" in result) == (not ran)
    assert result.get("bf16_emulated", False) == (ran and not native)
    if ran:
        assert any("(c16) ceiling bf16" in line for line in lines)
    else:
        assert result["bf16_absent"] == (
            "turned off (bf16=False)" if native else bench.bf16_absence(torch.device("cpu"))
        )
        assert any(f"no bfloat16 contenders: {result['bf16_absent']}" in line for line in lines)


def test_summarize_compares_each_path_with_its_ceiling_and_its_peak():
    speeds = {
        "baseline": [100, 90],
        "labcnn": [180, 200],
        "ceiling": [250, 210],
        "labcnn_bf16": [290, 280],
        "ceiling_bf16": [300],
    }
    peaks = {"float32": [150.0, 200.0], "bfloat16": [800.0]}
    result = bench.summarize(speeds, peaks, 40e6)  # 0.04 GFLOP per image
    assert result["speedup_vs_baseline"] == 2.0
    assert (
        result["fraction_of_ceiling"],
        result["fraction_of_ceiling_bf16"],
        result["fraction_of_fastest_ceiling"],
    ) == (0.8, 0.9667, 0.9667)
    assert result["matmul_peak_gflop_s"] == {"float32": 200.0, "bfloat16": 800.0}
    assert result["step_gflop_s"] == {"float32": 8.0, "bfloat16": 11.6}
    assert result["fraction_of_matmul_peak"] == {"float32": 0.04, "bfloat16": 0.0145}
    assert result["median_img_s"]["labcnn"] == 190.0 and result["gflop_per_image"] == 0.04


def test_too_few_images_is_a_one_line_error():
    images, labels = bench.random_data(50)
    with pytest.raises(ConfigError, match="needs a batch of 100 images, got 50"):
        bench.run(images, labels, images_per_round=100, rounds=1, log=lambda line: None)


def test_flops_per_image_counts_forward_and_backward_once_per_image():
    per_image = bench.flops_per_image(100)
    assert per_image > 0 and per_image == bench.flops_per_image(100) == bench.flops_per_image(10)
    model, x = LabCNN(), torch.zeros(10, 3, 32, 32)
    with FlopCounterMode(display=False) as forward:
        model(x)
    with FlopCounterMode(display=False) as step:  # real tensors: the meta count is the same
        F.cross_entropy(model(x), torch.zeros(10, dtype=torch.int64)).backward()
    assert per_image == step.get_total_flops() / 10
    # backward costs twice the forward, less the input gradient that conv1 does not need
    assert 2 < step.get_total_flops() / forward.get_total_flops() < 3


def test_matmul_peak_is_2n3_flops_over_the_product_time(monkeypatch):
    monkeypatch.setattr(bench, "MATMUL_SIZE", 8)
    seen = []

    def fake_timed(device, work, *args, **kwargs):
        work(*args, **kwargs)
        seen.append(torch.allclose(kwargs["out"], args[0] @ args[1]))
        return 0.5

    measure = bench.matmul(torch.device("cpu"), torch.float32)
    monkeypatch.setattr(bench, "timed", fake_timed)
    assert measure() == 2 * 8**3 / 0.5 / 1e9 and seen == [True]
