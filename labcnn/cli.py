"""Command line: ``python -m labcnn {train,evaluate,summary,filters,gifs,bench} ...``; ``--help`` on each.

A user error (missing data, a bad value or device, a damaged checkpoint, an unwritable folder)
ends with one line ``error: ...`` on stderr and exit status 2, before anything is written;
Ctrl-C during training ends with status 130 and a line saying how to resume. Every path option
expands ``~``.
"""
from __future__ import annotations

import argparse
import math
import sys
import warnings
from pathlib import Path

from labcnn.config import RECIPES, SEED_MAX
from labcnn.device import AMP_CHOICES, DEVICE_CHOICES
from labcnn.errors import LabcnnError


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as the project's one line ``error: ...`` and status 2."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def path(text: str) -> Path:
    """A path option: ``~`` expanded, relative to the working directory."""
    return Path(text).expanduser()


def number(kind, low, high=math.inf, low_open=False):
    """An argparse type for a finite ``kind`` (int or float) in ``[low, high]`` (``(low, high]``
    with ``low_open``); the error gives the range."""
    expected = f"{'an integer' if kind is int else 'a finite number'} {'>' if low_open else '>='} {low}"
    expected += f" and <= {high}" if high != math.inf else ""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not (math.isfinite(value) and (value > low if low_open else value >= low) and value <= high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


def add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=path, default=Path("data"), help="folder holding CIFAR-10 in any supported layout (default: data)")
    parser.add_argument("--download", action="store_true", help="download the official archive if no data is found (needs internet)")
    parser.add_argument("--download-url", metavar="URL", help="download from this mirror instead of torchvision's official source")
    parser.add_argument("--no-verify", dest="verify", action="store_false", help="skip MD5 checks of official-layout files")


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help=f"{DEVICE_CHOICES} (default: auto, the best available)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m labcnn", description="The lab's simple CNN for CIFAR-10.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    train = commands.add_parser("train", help="train the lab's CNN; resumes when --out holds a checkpoint")
    add_data_args(train)
    train.add_argument("--out", required=True, type=path, help="run folder: checkpoint.pt, history.json, loss.png, accuracy.png")
    train.add_argument("--recipe", default="lab", choices=sorted(RECIPES), help="named settings (default: the lab's)")
    train.add_argument("--epochs", type=number(int, 1))
    train.add_argument("--batch-size", type=number(int, 1))
    train.add_argument("--optimizer", choices=["adam", "adamw", "sgd"], help="default: the recipe's")
    train.add_argument("--lr", type=number(float, 0, low_open=True))
    train.add_argument("--weight-decay", type=number(float, 0))
    train.add_argument("--label-smoothing", type=number(float, 0, 0.999), metavar="EPS", help="cross-entropy label smoothing, 0 to < 1")
    train.add_argument("--cutout", type=number(int, 0, 32), metavar="PIXELS", help="side of the Cutout square, 0 for none")
    train.add_argument("--ema", type=number(float, 0, 0.999999), metavar="DECAY", help="decay per step of the weights' moving average, 0 for none")
    train.add_argument("--whiten", action="store_true", help="start conv1 from whitening filters of the training patches (airbench)")
    train.add_argument("--seed", type=number(int, 0, SEED_MAX), help="0 to 2**64 - 1 (default: 0)")
    train.add_argument("--subset", type=number(int, 1), help="train on N training images (the test set stays whole)")
    train.add_argument("--val-size", type=number(int, 0), help="hold N training images out for validation")
    add_device_arg(train)
    train.add_argument("--amp", nargs="?", const="auto", choices=AMP_CHOICES,
                       help="mixed precision. auto (the flag alone): bf16 where native (Ampere+ GPUs, AVX512-BF16/AMX "
                            "CPUs), else fp16 with a gradient scaler on CUDA; native: bf16 where native, else fp32; "
                            "'bf16' or 'fp16' force one; off: fp32 (default: the recipe's: off for lab, native for the others)")
    train.add_argument("--compile", action="store_true", help="train through torch.compile (measure with bench first)")

    evaluate = commands.add_parser("evaluate", help="test loss, accuracy, per-class accuracy and confusion matrix")
    add_data_args(evaluate)
    evaluate.add_argument("--checkpoint", required=True, type=path, help="RUN/checkpoint.pt, or a file holding LabCNN's state_dict")
    evaluate.add_argument("--mean", type=float, nargs=3, metavar="M", help="normalization mean per channel (default: the checkpoint's; the lab's for a state dict)")
    evaluate.add_argument("--std", type=float, nargs=3, metavar="S", help="normalization std per channel (with --mean)")
    evaluate.add_argument("--flip-tta", action="store_true", help="average each image with its mirror image")
    add_device_arg(evaluate)

    commands.add_parser("summary", help="print the model's per-layer table (torchinfo)")

    filters = commands.add_parser("filters", help="count each convolution's collapsed filters (L2 norm below 0.01)")
    filters.add_argument("checkpoints", nargs="+", type=path, metavar="CHECKPOINT")
    filters.add_argument("--json", type=path, metavar="PATH", help="also write the counts as JSON: {checkpoint: {conv: [collapsed, filters]}}")

    gifs = commands.add_parser("gifs", help="write the convolution and max-pooling GIFs")
    gifs.add_argument("--out", default=Path("Images"), type=path, help="folder for the GIFs (default: Images)")
    gifs.add_argument("--notebook", default=Path("notebooks/lab1_cnn_cifar10.ipynb"), type=path,
                      help="refresh the GIFs embedded in this notebook, if it exists (default: the lab report)")

    bench = commands.add_parser("bench", help="training images/s: tutorial pipeline vs labcnn's vs the model step alone")
    bench.add_argument("--data-dir", type=path, metavar="DIR", help="time on CIFAR-10's training split from DIR (default: 10,000 random images)")
    bench.add_argument("--images-per-round", type=number(int, 1), default=10_000, metavar="N", help="images per contender per round (default: 10000)")
    bench.add_argument("--rounds", type=number(int, 1), default=5, metavar="N", help="alternating rounds; each contender's fastest is reported (default: 5)")
    add_device_arg(bench)
    bench.add_argument("--threads", type=number(int, 1), metavar="N", help="torch CPU threads (default: one per physical core)")
    bench.add_argument("--compile", action="store_true", help="add labcnn's path under torch.compile as contender (d)")
    bench.add_argument("--time-to-accuracy", action="store_true",
                       help="instead, train --recipe on the real data (--data-dir) and report the training seconds to "
                            "69.26%% test accuracy, images/s and GFLOP/s")
    bench.add_argument("--recipe", default="fast", choices=sorted(RECIPES), help="with --time-to-accuracy (default: fast)")
    bench.add_argument("--seed", type=number(int, 0, SEED_MAX), default=0, help="with --time-to-accuracy (default: 0)")
    return parser


def load_split(args, train: bool):
    from labcnn.data import load_cifar10

    return load_cifar10(args.data_dir, train=train, download=args.download, verify=args.verify, url=args.download_url)


def run_train(args) -> None:
    from labcnn.config import make_config
    from labcnn.device import select_device, use_physical_cores
    from labcnn.train import fit

    use_physical_cores()
    config = make_config(
        args.recipe, epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
        weight_decay=args.weight_decay, label_smoothing=args.label_smoothing, cutout=args.cutout, ema=args.ema,
        whiten=args.whiten or None, seed=args.seed, subset=args.subset, val_size=args.val_size, amp=args.amp,
        compile=args.compile or None,
    )
    device = select_device(args.device)  # checked before any data is loaded
    train_data, test_data = load_split(args, True), load_split(args, False)
    used = f"; training on a seeded subset of {config.subset}" if config.subset else ""
    print(f"data: {len(train_data[1])} training and {len(test_data[1])} test images from {args.data_dir}{used}")
    try:
        trained = fit(config, train_data, test_data, run_dir=args.out, device=device, log=lambda s: print(s, flush=True))
    except KeyboardInterrupt:
        print(f"\ninterrupted: completed epochs are saved in {args.out}; run the same command to resume", file=sys.stderr)
        raise SystemExit(130) from None
    last = trained.history[-1]
    print(f"final test accuracy {last['test_acc']:.2%}, test loss {last['test_loss']:.4f}; results in {args.out}")


def run_evaluate(args) -> None:
    from labcnn.checkpoint import load_trained
    from labcnn.data import CLASSES
    from labcnn.device import select_device
    from labcnn.evaluate import evaluate
    from labcnn.transforms import Normalization

    if (args.mean is None) != (args.std is None):
        raise LabcnnError("--mean and --std go together: give three values for each")
    device = select_device(args.device)
    normalization = Normalization(args.mean, args.std) if args.mean else None
    trained = load_trained(args.checkpoint, device, normalization)
    print(trained.note)
    images, labels = load_split(args, False)
    result = evaluate(trained, images, labels, flip_tta=args.flip_tta)
    print(f"test images {len(labels)}  loss {result['loss']:.4f}  top-1 accuracy {result['accuracy']:.2%}")
    for name, acc in zip(CLASSES, result["per_class_accuracy"]):
        print(f"  {name:<10} {acc:7.2%}")
    print("confusion matrix (rows: true class, columns: predicted):")
    print("           " + " ".join(f"{c[:5]:>5}" for c in CLASSES))
    for name, row in zip(CLASSES, result["confusion"].tolist()):
        print(f"{name:<10} " + " ".join(f"{v:5d}" for v in row))


def run_summary(args) -> None:
    from labcnn.model import LabCNN, summary

    print(summary(LabCNN()))


def run_filters(args) -> None:
    from labcnn.checkpoint import load_trained
    from labcnn.fileio import write_json
    from labcnn.model import COLLAPSE_NORM, collapsed_filters

    counts = {}
    for checkpoint in args.checkpoints:
        counts[str(checkpoint)] = {k: list(v) for k, v in collapsed_filters(load_trained(checkpoint).model).items()}
        print(f"{checkpoint}: " + ", ".join(f"{k} {c} of {n}" for k, (c, n) in counts[str(checkpoint)].items())
              + f" filters with an L2 norm below {COLLAPSE_NORM}")
    if args.json:
        write_json(args.json, counts)


def run_gifs(args) -> None:
    from labcnn.animations import attach_gifs, make_gifs

    gifs = make_gifs(args.out)
    for gif in gifs:
        print(f"wrote {gif} ({gif.stat().st_size / 1024:.0f} KiB)")
    if args.notebook.is_file() and attach_gifs(args.notebook, gifs):
        print(f"refreshed the GIFs embedded in {args.notebook}")


def run_bench(args) -> None:
    from labcnn import bench
    from labcnn.data import load_cifar10
    from labcnn.device import select_device, use_physical_cores

    device = select_device(args.device)
    use_physical_cores(args.threads)
    if args.time_to_accuracy:
        return run_time_to_accuracy(args, device)
    if args.data_dir:
        images, labels = load_cifar10(args.data_dir, train=True)
        print(f"data: {len(labels)} CIFAR-10 training images from {args.data_dir}")
    else:
        images, labels = bench.random_data()
        print(f"data: {len(labels)} random uint8 images with random labels (no --data-dir; timings do not depend on pixel values)")
    result = bench.run(images, labels, device, args.images_per_round, args.rounds,
                       compile=args.compile, log=lambda s: print(s, flush=True))
    bench.report(result)


def run_time_to_accuracy(args, device) -> None:
    from labcnn import time_to_accuracy
    from labcnn.config import make_config
    from labcnn.data import load_cifar10
    from labcnn.errors import ConfigError

    if not args.data_dir:
        raise ConfigError("--time-to-accuracy trains on real CIFAR-10: give --data-dir DIR (random images never reach an accuracy)")
    train_data, test_data = load_cifar10(args.data_dir, train=True), load_cifar10(args.data_dir, train=False)
    print(f"data: {len(train_data[1])} training and {len(test_data[1])} test images from {args.data_dir}")
    config = make_config(args.recipe, seed=args.seed)
    result = time_to_accuracy.time_to_accuracy(config, train_data, test_data, device=device, log=lambda s: print(s, flush=True))
    time_to_accuracy.report(result)


COMMANDS = {"train": run_train, "evaluate": run_evaluate, "summary": run_summary, "filters": run_filters, "gifs": run_gifs,
            "bench": run_bench}


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one ``warning: ...`` line on stderr (no source line), for the command line only."""
    print(f"warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():  # restores the process's warning display afterwards
        warnings.showwarning = show_warning
        try:
            COMMANDS[args.command](args)
        except LabcnnError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:  # outside training (run_train reports where to resume)
            print("\ninterrupted", file=sys.stderr)
            return 130
    return 0
