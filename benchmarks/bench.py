"""Training images/s: (a) baseline, the PyTorch CIFAR-10 tutorial (PIL images, DataLoader, a
loss.item() per step); (b) labcnn, train_one_epoch as fit runs it; (c) ceiling, the step alone on
staged batches; (b16), (c16) in bfloat16; matmul peak GFLOP/s. Rounds alternate, fastest kept."""

import json
import statistics
import time
from itertools import chain, count, cycle, islice, repeat

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode
from torchvision import transforms
from torchvision.datasets import CIFAR10, VisionDataset

from labcnn import ConfigError
from labcnn.cli import DEVICE_HELP, Parser, load_split, path, ranged, say
from labcnn.device import describe_device, native_bf16, select_device, set_threads
from labcnn.lab import batches, epoch_generator, make_optimizer, train_one_epoch
from labcnn.model import LAB_MEAN, LAB_NORMALIZATION, LAB_STD, LabCNN
from labcnn.settings import RANGES, make_config

WARMUP_STEPS = 5  # untimed training steps per contender before the rounds
MATMUL_SIZE = 2048  # the peak's n x n @ n x n product: 2 n^3 FLOPs
NAMES = {
    "baseline": "(a) baseline",
    "labcnn": "(b) labcnn",
    "ceiling": "(c) ceiling",
    "labcnn_bf16": "(b16) labcnn bf16",
    "ceiling_bf16": "(c16) ceiling bf16",
}
RATIOS = {
    "speedup_vs_baseline": ("labcnn", "baseline"),  # a / b, of their fastest rounds
    "fraction_of_ceiling": ("labcnn", "ceiling"),
    "fraction_of_ceiling_bf16": ("labcnn_bf16", "ceiling_bf16"),
}


def random_data(n: int = 10_000, seed: int = 0):
    """Random uint8 ``[n, 3, 32, 32]`` images, int64 ``[n]`` labels (timings ignore pixels)."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
    return images, torch.randint(0, 10, (n,), generator=gen)


def timed(device: torch.device, work, *args, **kwargs) -> float:
    """Seconds of ``work(*args, **kwargs)``, between device syncs so that queued work counts."""
    sync = torch.accelerator.synchronize if device.type != "cpu" else lambda device: None
    sync(device)
    start = time.perf_counter()
    work(*args, **kwargs)
    sync(device)
    return time.perf_counter() - start


class TutorialCIFAR10(CIFAR10):
    """torchvision's CIFAR10 (a PIL image per sample) on in-memory images, as in the tutorial."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):  # not CIFAR10's: no files
        VisionDataset.__init__(
            self,
            None,
            transform=transforms.Compose(
                [transforms.ToTensor(), transforms.Normalize(LAB_MEAN, LAB_STD)]
            ),
        )
        self.data, self.targets = images.permute(0, 2, 3, 1).contiguous().numpy(), labels.tolist()


def contender(name: str, images, labels, config, device, seed: int, staged: int):
    """``train(n)``: contender ``name`` (a key of NAMES) trains a fresh LabCNN on ``n`` images
    (whole batches); the ceiling cycles over ``staged`` images' batches, staged on ``device``."""
    dtype, size = torch.bfloat16 if name.endswith("bf16") else None, config.batch_size
    torch.manual_seed(seed)
    fmt = torch.contiguous_format if name == "baseline" else torch.channels_last
    optimizer = make_optimizer(config, model := LabCNN().to(device, memory_format=fmt))
    if name == "baseline":  # num_workers=0: the tutorial's 2 would share a 2-core CPU
        loader = DataLoader(
            TutorialCIFAR10(images, labels),
            batch_size=size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
        )
        stream = chain.from_iterable(repeat(loader))  # reshuffled each pass
    else:  # one epoch's batches after another, as fit draws them
        images, labels = images.to(device), labels.to(device)
        stream = chain.from_iterable(
            batches(images, labels, size, epoch_generator(seed, epoch), LAB_NORMALIZATION)
            for epoch in count(1)
        )
        if name.startswith("labcnn"):
            criterion = torch.nn.CrossEntropyLoss()
            return lambda n: train_one_epoch(
                model, criterion, optimizer, islice(stream, n // size), dtype=dtype
            )
        stream = cycle(list(islice(stream, min(staged, len(labels)) // size)))

    def train(n: int) -> None:  # the model stays in train mode: nothing here evaluates
        for x, y in islice(stream, n // size):
            with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=bool(dtype)):
                loss = F.cross_entropy(model(x.to(device)).float(), y.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if name == "baseline":
                loss.item()  # the tutorial's running loss: a device sync every step

    return train


def matmul(device: torch.device, dtype: torch.dtype):
    """``measure()``: GFLOP/s of one MATMUL_SIZE-square product in ``dtype`` on ``device``."""
    a, b = torch.rand(2, MATMUL_SIZE, MATMUL_SIZE, dtype=dtype, device=device)
    out = torch.mm(a, b)  # untimed: the first product pays for kernel selection and caches
    return lambda: 2 * MATMUL_SIZE**3 / timed(device, torch.mm, a, b, out=out) / 1e9


def flops_per_image(batch_size: int = 100) -> float:
    """FLOPs (a multiply-add is 2) per image of one training step, by FlopCounterMode on meta."""
    model = LabCNN().to("meta", memory_format=torch.channels_last)
    x, y = torch.zeros(batch_size, 3, 32, 32, device="meta"), torch.zeros(batch_size).long()
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y.to("meta")).backward()
    return counter.get_total_flops() / batch_size


def run(
    images,
    labels,
    device="cpu",
    images_per_round: int = 10_000,
    rounds: int = 5,
    batch_size: int = 100,
    seed: int = 0,
    bf16: bool | None = None,
    log=print,
) -> dict:
    """:func:`report`'s dict, from uint8 [N, 3, 32, 32] images, int64 [N] labels (CPU), in whole
    batches; ``bf16`` None: where native (emulated, it is slower). ConfigError: N < batch_size."""
    native = native_bf16(device := torch.device(device))
    bf16 = native if bf16 is None else bf16
    config = make_config("lab", batch_size=batch_size, seed=seed)
    if (n := len(labels) // batch_size * batch_size) == 0:
        raise ConfigError(f"the bench needs a batch of {batch_size} images, got {len(labels)}")
    per_round = -(-images_per_round // batch_size) * batch_size
    log(
        f"bench: LabCNN, lab recipe, batch {batch_size}, {n} images, {describe_device(device)}; "
        f"{rounds} round(s) of {per_round} images per contender, fastest round reported"
    )
    contenders, warm = {}, {}
    for name in list(NAMES)[: 5 if bf16 else 3]:
        start = time.perf_counter()
        contenders[name] = contender(name, images[:n], labels[:n], config, device, seed, per_round)
        timed(device, contenders[name], batch_size * WARMUP_STEPS)
        warm[name] = round(time.perf_counter() - start, 2)
    log(
        f"warm-up ({WARMUP_STEPS} steps, with set-up): "
        + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in warm.items())
    )
    matmuls = {p: matmul(device, getattr(torch, p)) for p in ("float32", "bfloat16")[: 1 + bf16]}
    speeds, peaks = {name: [] for name in contenders}, {p: [] for p in matmuls}
    for r in range(1, rounds + 1):
        for name, train in contenders.items():
            speeds[name].append(per_round / timed(device, train, per_round))
        for p, measure in matmuls.items():
            peaks[p].append(max(measure() for _ in range(3)))  # the fastest of 3 products
        log(
            f"round {r}/{rounds}: images/s "
            + ", ".join(f"{k} {s[-1]:.0f}" for k, s in speeds.items())
            + "; matmul GFLOP/s "
            + ", ".join(f"{p} {s[-1]:.1f}" for p, s in peaks.items())
        )
    result = summarize(speeds, peaks, flops_per_image(batch_size))
    result.update(
        device=describe_device(device), images_per_round=per_round, rounds=rounds, warmup_s=warm
    )
    if not bf16:
        result["bf16_absent"] = "turned off (bf16=False)" if native else bf16_absence(device)
    elif not native:
        result["bf16_emulated"] = True
    return result


def summarize(speeds: dict, peaks: dict, flops: float) -> dict:
    """:func:`run`'s figures from per-round images/s, matmul GFLOP/s and ``flops`` per image."""
    best = {name: max(s) for name, s in speeds.items()}
    step = {p: best["labcnn_bf16" if p == "bfloat16" else "labcnn"] * flops / 1e9 for p in peaks}
    top = [max(v for k, v in best.items() if k.startswith(c)) for c in ("labcnn", "ceiling")]
    return {
        **{f"{name}_img_s": speed for name, speed in best.items()},
        **{key: round(best[a] / best[b], 4) for key, (a, b) in RATIOS.items() if a in best},
        "fraction_of_fastest_ceiling": round(top[0] / top[1], 4),
        "gflop_per_image": flops / 1e9,
        "matmul_peak_gflop_s": {p: round(max(s), 1) for p, s in peaks.items()},
        "step_gflop_s": {p: round(gflop_s, 1) for p, gflop_s in step.items()},
        "fraction_of_matmul_peak": {p: round(step[p] / max(peaks[p]), 4) for p in peaks},
        "median_img_s": {k: round(statistics.median(s), 1) for k, s in speeds.items()},
    }


def report(result: dict, log=print) -> None:
    """Log the table (images/s, s per 50,000-image epoch), ratios and peaks, then one JSON line."""
    log(f"{'contender':<20} {'best img/s':>10} {'median img/s':>12} {'s/epoch (50k)':>14}")
    for name, median in result["median_img_s"].items():
        log(
            f"{NAMES[name]:<20} {result[name + '_img_s']:>10.0f} {median:>12.0f} "
            f"{50_000 / result[name + '_img_s']:>14.1f}"
        )
    log(f"labcnn / baseline = {result['speedup_vs_baseline']:.2f}x (speedup over the tutorial)")
    log(f"labcnn / ceiling  = {result['fraction_of_ceiling']:.2f} (fraction of the step's limit)")
    log(
        f"no bfloat16 contenders: {result['bf16_absent']}"
        if "bf16_absent" in result
        else f"labcnn bf16 / ceiling bf16 = {result['fraction_of_ceiling_bf16']:.2f}; fastest path"
        f" / fastest ceiling = {result['fraction_of_fastest_ceiling']:.2f}"
    )
    log(f"training step: {result['gflop_per_image'] * 1e3:.1f} MFLOP per image (FlopCounterMode)")
    for p, peak in result["matmul_peak_gflop_s"].items():
        log(
            f"{p}: labcnn {result['step_gflop_s'][p]:.1f} GFLOP/s, {MATMUL_SIZE}-square matmul "
            f"{peak:.1f} GFLOP/s: {result['fraction_of_matmul_peak'][p]:.2f} of the peak"
        )
    log(json.dumps(result))


def bf16_absence(device: torch.device) -> str:
    """Why bfloat16 would be slow on ``device``, for the report."""
    if device.type == "cpu":
        return "this CPU has neither avx512_bf16 nor amx_bf16: bfloat16 would be emulated, slower"
    return f"{describe_device(device)} has no native bfloat16"


def build_parser() -> Parser:
    """The options of ``python -m labcnn bench``, read through the one range table."""
    parser = Parser(prog="python -m labcnn bench", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=path, help="time on CIFAR-10 from DIR (default: random)")
    for key, default in (("images_per_round", 10_000), ("rounds", 5)):
        option = f"--{key.replace('_', '-')}"
        help = f"{RANGES[key].help} (default: {default})"
        parser.add_argument(option, type=ranged(key), default=default, metavar="N", help=help)
    parser.add_argument("--device", help=DEVICE_HELP)
    return parser


def main(argv: list[str]) -> None:
    """``python -m labcnn bench [options]``: time the contenders and print the report."""
    args = build_parser().parse_args(argv)
    args.download, args.verify, args.download_url = False, True, None  # for load_split
    set_threads()
    device = select_device(args.device)
    if args.data_dir:
        images, labels = load_split(args, True)
        say(f"data: {len(labels)} CIFAR-10 training images from {args.data_dir}")
    else:
        images, labels = random_data()
        say(f"data: {len(labels)} random images (no --data-dir; timings do not depend on pixels)")
    report(run(images, labels, device, args.images_per_round, args.rounds, log=say), log=say)
