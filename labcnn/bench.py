"""Training throughput of LabCNN through three input pipelines, in one process: ``python -m labcnn bench``.

Every contender trains its own freshly initialised :class:`~labcnn.model.LabCNN` (same seed)
with the lab's recipe (Adam, lr 0.01, L2 weight decay 0.001, batch 100, cross-entropy) on the
same images, so they do identical work; only the way batches reach the model differs:

(a) ``baseline``: what a user writes from the PyTorch CIFAR-10 tutorial: a dataset that, like
    ``torchvision.datasets.CIFAR10``, returns one PIL image per sample (``Image.fromarray``),
    a per-sample ``ToTensor()`` + ``Normalize(LAB_MEAN, LAB_STD)``, ``DataLoader(batch_size,
    shuffle=True)``, the default (contiguous) memory format, and ``loss.item()`` every step.
(b) ``labcnn``: the project's own path, :func:`labcnn.train.train_one_epoch` on in-memory
    uint8 tensors with a channels_last model, exactly what :func:`labcnn.train.fit` runs.
(c) ``ceiling``: the model step alone on pre-staged, already normalized float32 channels_last
    batches: the limit for any input pipeline.
(d) ``compile`` (``--compile``): (b) with ``torch.compile(model)``, as ``fit`` does when
    ``TrainConfig.compile`` is set.
(b16), (c16) ``labcnn_bf16`` and ``ceiling_bf16``: (b) and (c) under bfloat16 autocast
    (``torch.autocast``; the loss in float32), only where the device computes bfloat16 natively
    (:func:`labcnn.device.native_bf16`: AVX512-BF16 or AMX CPUs, Ampere and newer GPUs).
    Elsewhere bfloat16 is emulated, slower than float32, and the result says why they are absent.
    Each path is compared with the ceiling of its own precision.

All contenders are warmed up first, then timed in alternating rounds (a, b, c, a, b, c, ...),
each round a fixed number of images per contender, with ``time.perf_counter`` (and
``torch.cuda.synchronize`` around each round on CUDA). Each contender's figure is its fastest
round (its shortest time, as ``timeit`` advises: slower rounds measure the shared machine's
other load, not the code); the medians are printed beside it.
Throughputs are in images per second; times in seconds.
"""
from __future__ import annotations

import itertools
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from labcnn.config import TrainConfig, make_config
from labcnn.device import bf16_absence, describe_device, grad_scaler, native_bf16
from labcnn.errors import ConfigError
from labcnn.model import LabCNN
from labcnn.train import make_optimizer, train_one_epoch
from labcnn.transforms import LAB_MEAN, LAB_STD, Normalization, epoch_generator, training_batches

EPOCH_IMAGES = 50_000  # one pass over the CIFAR-10 training split
WARMUP_STEPS = 5  # untimed training steps per contender before the rounds
NAMES = {"baseline": "(a) baseline", "labcnn": "(b) labcnn", "ceiling": "(c) ceiling", "compile": "(d) labcnn+compile",
         "labcnn_bf16": "(b16) labcnn bf16", "ceiling_bf16": "(c16) ceiling bf16"}


def random_data(n: int = 10_000, seed: int = 0):
    """``n`` random uint8 ``[n, 3, 32, 32]`` images with random int64 labels in ``0..9``.

    Timings do not depend on pixel values, so these stand in for CIFAR-10 when no data is given.
    """
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=gen)
    return images, torch.randint(0, 10, (n,), generator=gen)


def fresh_model(config: TrainConfig, device, memory_format, seed: int):
    """A newly initialised LabCNN (seeded by ``seed``) on ``device`` and its optimizer."""
    torch.manual_seed(seed)
    model = LabCNN().to(device, memory_format=memory_format)
    return model, make_optimizer(config, model)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock time covers it (CUDA, MPS; no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


class TutorialCIFAR10(Dataset):
    """In-memory CIFAR-10 served like ``torchvision.datasets.CIFAR10``: HWC uint8 numpy images,
    each returned as ``transform(Image.fromarray(image))`` with an int label."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.data = images.permute(0, 2, 3, 1).contiguous().numpy()  # [N, 32, 32, 3], as CIFAR10.data
        self.targets = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.data[index])), self.targets[index]


def endless(loader):
    """The loader's batches, epoch after epoch (each epoch reshuffled, as in a training loop)."""
    while True:
        yield from loader


def baseline_contender(images, labels, config: TrainConfig, device, seed: int):
    """(a) The tutorial pipeline. Returns ``train(n)``, which trains on ``n`` images and returns
    the number trained on (whole batches; the loader restarts, reshuffled, at each epoch end)."""
    model, optimizer = fresh_model(config, device, torch.contiguous_format, seed)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(LAB_MEAN, LAB_STD)])
    dataset = TutorialCIFAR10(images, labels, transform)
    # num_workers=0 (DataLoader's default); the tutorial's num_workers=2 would share this 2-core CPU
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    batches = endless(loader)
    criterion = nn.CrossEntropyLoss()

    def train(n: int) -> int:
        model.train()
        done, running_loss = 0, 0.0
        while done < n:
            inputs, targets = next(batches)
            inputs, targets = inputs.to(device), targets.to(device)
            optimizer.zero_grad()
            loss = criterion(model(inputs), targets)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
            done += len(targets)
        return done

    return train


def labcnn_contender(images, labels, config: TrainConfig, device, seed: int, compile: bool = False, dtype=None):
    """(b) ``train_one_epoch`` on device-resident uint8 tensors, as ``fit`` runs it; (d) with
    ``torch.compile`` when ``compile``; (b16) with ``dtype=torch.bfloat16`` autocast. Returns
    ``train(n)``: whole passes over the data, then one pass over its first ``n % len(labels)``
    images; returns the number trained on."""
    model, optimizer = fresh_model(config, device, torch.channels_last, seed)
    step_model = torch.compile(model) if compile else model
    normalization = Normalization(config.mean, config.std)
    scaler = grad_scaler(device, dtype)
    images, labels = images.to(device), labels.to(device)
    epochs = itertools.count(1)

    def train(n: int) -> int:
        sizes = [len(labels)] * (n // len(labels)) + [n % len(labels)]
        for size in filter(None, sizes):
            generator = epoch_generator(config.seed, next(epochs))
            batches = training_batches(images[:size], labels[:size], config.batch_size, generator, normalization)
            train_one_epoch(step_model, optimizer, None, scaler, batches, math.ceil(size / config.batch_size), dtype=dtype)
        return n

    return train


def ceiling_contender(images, labels, config: TrainConfig, device, seed: int, staged: int, dtype=None):
    """(c) The model step alone, cycling over ``staged`` images pre-staged on ``device`` as
    normalized float32 channels_last batches; (c16) under ``dtype`` autocast. Returns
    ``train(n)`` (``n`` rounded up to whole batches); returns the number trained on."""
    model, optimizer = fresh_model(config, device, torch.channels_last, seed)
    normalization = Normalization(config.mean, config.std)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:staged]
    batches = [
        (normalization(images[i].to(device)).contiguous(memory_format=torch.channels_last), labels[i].to(device))
        for i in order.split(config.batch_size)
    ]
    stream = itertools.cycle(batches)

    def train(n: int) -> int:
        model.train()
        done = 0
        while done < n:
            x, y = next(stream)
            with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += len(y)
        return done

    return train


def throughput(train, n: int, device) -> float:
    """Images per second of ``train(n)``, timed with ``perf_counter`` between device syncs."""
    synchronize(device)
    start = time.perf_counter()
    done = train(n)
    synchronize(device)
    return done / (time.perf_counter() - start)


def make_contenders(images, labels, config, device, seed, staged, compile, bf16, log):
    """``({name: train}, {name: warm-up seconds})`` for the contenders, each warmed up and logged.

    A failing ``torch.compile`` contender is left out, with a log line saying why.
    """
    builders = {
        "baseline": lambda: baseline_contender(images, labels, config, device, seed),
        "labcnn": lambda: labcnn_contender(images, labels, config, device, seed),
        "ceiling": lambda: ceiling_contender(images, labels, config, device, seed, staged),
    }
    if bf16:
        builders["labcnn_bf16"] = lambda: labcnn_contender(images, labels, config, device, seed, dtype=torch.bfloat16)
        builders["ceiling_bf16"] = lambda: ceiling_contender(images, labels, config, device, seed, staged, dtype=torch.bfloat16)
    if compile:
        builders["compile"] = lambda: labcnn_contender(images, labels, config, device, seed, compile=True)
    contenders, warm = {}, {}
    for name, build in builders.items():
        start = time.perf_counter()
        try:
            train = build()
            train(config.batch_size * WARMUP_STEPS)
            synchronize(device)
        except Exception as e:  # torch.compile fails in many ways (no compiler, unsupported op...)
            if name != "compile":
                raise
            log(f"{NAMES[name]}: torch.compile failed, left out ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})")
            continue
        contenders[name] = train
        warm[name] = time.perf_counter() - start
    steps = f"warm-up ({WARMUP_STEPS} steps, including set-up{' and compilation' if compile else ''})"
    log(f"{steps}: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in warm.items()))
    return contenders, warm


def run(images, labels, device="cpu", images_per_round: int = 10_000, rounds: int = 5, batch_size: int = 100,
        compile: bool = False, seed: int = 0, bf16: bool | None = None, log=print) -> dict:
    """Time every contender in ``rounds`` alternating rounds of ``images_per_round`` images each.

    Args:
        images, labels: uint8 ``[N, 3, 32, 32]`` and int64 ``[N]`` on the CPU; ``N`` is cut to
            whole batches. ``images_per_round`` is rounded up to whole batches.
        device: the training device; the baseline's dataset stays on the CPU, as a tutorial's does.
        compile: add contender (d), ``torch.compile``.
        bf16: add the bfloat16 contenders; ``None``: where the device computes bfloat16 natively.
        log: receives the progress and report lines.

    Returns:
        dict with ``baseline_img_s``, ``labcnn_img_s``, ``ceiling_img_s`` (fastest round's images per
        second over the rounds), ``speedup_vs_baseline`` (labcnn / baseline),
        ``fraction_of_ceiling`` (labcnn / ceiling), ``device``, ``images_per_round``,
        ``rounds``, ``median_img_s`` and ``warmup_s`` (per contender), and with ``compile``
        ``compile_img_s`` and ``compile_vs_labcnn`` (``None`` if compilation failed).
        ``fraction_of_fastest_ceiling``: the fastest labcnn path over the fastest ceiling. With
        bfloat16, ``labcnn_bf16_img_s``, ``ceiling_bf16_img_s`` and ``fraction_of_ceiling_bf16``
        (bf16 over bf16); without, ``bf16_absent``, the reason.
    """
    device = torch.device(device)
    native = native_bf16(device)
    bf16 = native if bf16 is None else bf16
    config = make_config("lab", batch_size=batch_size, seed=seed)
    n = len(labels) - len(labels) % batch_size
    if n == 0:
        raise ConfigError(f"the bench needs at least one batch of {batch_size} images, got {len(labels)}")
    images, labels = images[:n], labels[:n]
    per_round = math.ceil(images_per_round / batch_size) * batch_size
    log(f"bench: LabCNN, Adam lr {config.lr} weight decay {config.weight_decay}, batch {batch_size}, "
        f"cross-entropy, {n} images, device {describe_device(device)}")
    log(f"{rounds} round(s) of {per_round} images per contender, contenders alternating; fastest round reported")
    contenders, warm = make_contenders(images, labels, config, device, seed, min(per_round, n), compile, bf16, log)
    speeds = {name: [] for name in contenders}
    for r in range(1, rounds + 1):
        for name, train in contenders.items():
            speeds[name].append(throughput(train, per_round, device))
        log(f"round {r}/{rounds}: " + "  ".join(f"{name} {s[-1]:.0f}" for name, s in speeds.items()) + " images/s")
    result = summarize(speeds, describe_device(device), per_round, rounds, compile)
    if not bf16:
        result["bf16_absent"] = bf16_absence(device)
    elif not native:
        result["bf16_emulated"] = True
    result["warmup_s"] = {name: round(seconds, 2) for name, seconds in warm.items()}
    return result


def summarize(speeds: dict, device: str, per_round: int, rounds: int, compile: bool) -> dict:
    """The result dict of :func:`run` from the per-round images/s of each contender."""
    best = {name: max(s) for name, s in speeds.items()}
    result = {f"{name}_img_s": best[name] for name in ("baseline", "labcnn", "ceiling")}
    result["speedup_vs_baseline"] = round(best["labcnn"] / best["baseline"], 4)
    result["fraction_of_ceiling"] = round(best["labcnn"] / best["ceiling"], 4)
    if "labcnn_bf16" in best:
        result.update(labcnn_bf16_img_s=best["labcnn_bf16"], ceiling_bf16_img_s=best["ceiling_bf16"],
                      fraction_of_ceiling_bf16=round(best["labcnn_bf16"] / best["ceiling_bf16"], 4))
    fastest = max(best[name] for name in ("labcnn", "labcnn_bf16") if name in best)
    result["fraction_of_fastest_ceiling"] = round(fastest / max(best[name] for name in ("ceiling", "ceiling_bf16") if name in best), 4)
    if compile:
        result["compile_img_s"] = best.get("compile")
        result["compile_vs_labcnn"] = round(best["compile"] / best["labcnn"], 4) if "compile" in best else None
    result.update(device=device, images_per_round=per_round, rounds=rounds)
    result["median_img_s"] = {name: round(statistics.median(s), 1) for name, s in speeds.items()}
    return result


def compile_break_even(result: dict) -> str:
    """One line: the compilation time (seconds) against the time it saves per 50,000-image epoch."""
    extra = result["warmup_s"]["compile"] - result["warmup_s"]["labcnn"]
    saved = EPOCH_IMAGES / result["labcnn_img_s"] - EPOCH_IMAGES / result["compile_img_s"]
    if saved <= 0:
        return f"torch.compile costs {extra:.0f} s to compile and saves nothing per epoch here"
    return f"torch.compile costs {extra:.0f} s to compile, saves {saved:.1f} s per epoch: pays off after {extra / saved:.1f} epochs"


def report(result: dict, log=print) -> None:
    """Log the table (images/s, seconds per 50,000-image epoch), the ratios, then the JSON line."""
    log(f"{'contender':<20} {'best img/s':>10} {'median img/s':>12} {'s/epoch (50k)':>14}")
    for name, median in result["median_img_s"].items():
        speed = result[f"{name}_img_s"]
        log(f"{NAMES[name]:<20} {speed:>10.0f} {median:>12.0f} {EPOCH_IMAGES / speed:>14.1f}")
    log(f"labcnn / baseline = {result['speedup_vs_baseline']:.2f}x (speedup over the tutorial pipeline)")
    log(f"labcnn / ceiling  = {result['fraction_of_ceiling']:.2f} (fraction of the model-step limit)")
    if "fraction_of_ceiling_bf16" in result:
        log(f"labcnn bf16 / ceiling bf16 = {result['fraction_of_ceiling_bf16']:.2f}; fastest path / fastest ceiling = "
            f"{result['fraction_of_fastest_ceiling']:.2f}")
    else:
        log(f"no bfloat16 contenders: {result['bf16_absent']}")
    if result.get("compile_vs_labcnn") is not None:
        log(f"compile / labcnn  = {result['compile_vs_labcnn']:.2f}x (torch.compile's gain on labcnn's path)")
        log(compile_break_even(result))
    log(json.dumps(result))
