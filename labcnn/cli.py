"""Command line: ``python -m labcnn {train,evaluate,summary,gifs,bench} ...``; ``--help`` on each.

A user error (missing data, a bad value, a damaged checkpoint) ends with one line
``error: ...`` on stderr and exit status 2; Ctrl-C during training ends with status 130 and a
line saying how to resume.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from labcnn.errors import LabcnnError


def add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default="data", help="folder holding CIFAR-10 in any supported layout (default: data)")
    parser.add_argument("--download", action="store_true", help="download the official archive if none is found (needs internet)")
    parser.add_argument("--no-verify", dest="verify", action="store_false", help="skip MD5 checks of official-layout files")


def positive(kind):
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m labcnn", description="The lab's simple CNN for CIFAR-10.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train the lab's CNN; resumes when --out holds a checkpoint")
    add_data_args(train)
    train.add_argument("--out", required=True, type=Path, help="run folder: checkpoint.pt, history.json, loss.png, accuracy.png")
    train.add_argument("--recipe", default="lab", choices=["lab", "improved"], help="named settings (default: the lab's)")
    train.add_argument("--epochs", type=positive(int))
    train.add_argument("--batch-size", type=positive(int))
    train.add_argument("--optimizer", choices=["adam", "adamw", "sgd"], help="default: the recipe's")
    train.add_argument("--lr", type=positive(float))
    train.add_argument("--weight-decay", type=float)
    train.add_argument("--seed", type=int)
    train.add_argument("--subset", type=positive(int), help="train on N training images (the test set stays whole)")
    train.add_argument("--val-size", type=int, help="hold N training images out for validation")
    train.add_argument("--device", help="cpu, cuda or mps (default: the best available)")
    train.add_argument("--amp", action="store_true", help="bfloat16 autocast on CUDA")
    train.add_argument("--compile", action="store_true", help="train through torch.compile (measure with bench first)")

    evaluate = commands.add_parser("evaluate", help="test loss, accuracy, per-class accuracy and confusion matrix")
    add_data_args(evaluate)
    evaluate.add_argument("--checkpoint", required=True, type=Path)
    evaluate.add_argument("--flip-tta", action="store_true", help="average each image with its mirror image")
    evaluate.add_argument("--device")

    commands.add_parser("summary", help="print the model's per-layer table (torchinfo)")

    gifs = commands.add_parser("gifs", help="write the convolution and max-pooling GIFs")
    gifs.add_argument("--out", default="Images", type=Path)

    bench = commands.add_parser("bench", help="training images/s: tutorial pipeline vs labcnn's vs the model step alone")
    bench.add_argument("--data-dir", type=Path, metavar="DIR", help="time on CIFAR-10's training split from DIR (default: 10,000 random images)")
    bench.add_argument("--images-per-round", type=positive(int), default=10_000, metavar="N", help="images per contender per round (default: 10000)")
    bench.add_argument("--rounds", type=positive(int), default=5, metavar="N", help="alternating rounds; each contender's fastest is reported (default: 5)")
    bench.add_argument("--device", help="cpu, cuda or mps (default: the best available)")
    bench.add_argument("--threads", type=positive(int), metavar="N", help="torch CPU threads (default: one per physical core)")
    bench.add_argument("--compile", action="store_true", help="add labcnn's path under torch.compile as contender (d)")
    return parser


def run_train(args) -> None:
    from labcnn.data import load_cifar10
    from labcnn.train import fit, make_config, use_physical_cores

    use_physical_cores()
    config = make_config(
        args.recipe, epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
        seed=args.seed, subset=args.subset, val_size=args.val_size, amp=args.amp or None,
        compile=args.compile or None,
    )
    train_data = load_cifar10(args.data_dir, train=True, download=args.download, verify=args.verify)
    test_data = load_cifar10(args.data_dir, train=False, download=args.download, verify=args.verify)
    used = f"; training on a seeded subset of {config.subset}" if config.subset else ""
    print(f"data: {len(train_data[1])} training and {len(test_data[1])} test images from {args.data_dir}{used}")
    try:
        _, history = fit(config, train_data, test_data, run_dir=args.out, device=args.device, log=lambda s: print(s, flush=True))
    except KeyboardInterrupt:
        print(f"\ninterrupted: completed epochs are saved in {args.out}; run the same command to resume", file=sys.stderr)
        raise SystemExit(130) from None
    from labcnn import plots  # matplotlib: imported only when needed, so starting (and resuming) is quicker

    for metric in ("loss", "accuracy"):
        plots.plot_curves(history, metric, path=args.out / f"{metric}.png")
    last = history[-1]
    print(f"final test accuracy {last['test_acc']:.2%}, test loss {last['test_loss']:.4f}; results in {args.out}")


def run_evaluate(args) -> None:
    from labcnn.data import CLASSES, load_cifar10
    from labcnn.train import evaluate, load_checkpoint, model_from_state, select_device

    state = load_checkpoint(args.checkpoint)
    model = model_from_state(args.checkpoint, state, select_device(args.device))
    norm = state["normalization"]
    images, labels = load_cifar10(args.data_dir, train=False, download=args.download, verify=args.verify)
    result = evaluate(model, images, labels, norm["mean"], norm["std"], flip_tta=args.flip_tta)
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


def run_gifs(args) -> None:
    from labcnn.animations import make_gifs

    for path in make_gifs(args.out):
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


def run_bench(args) -> None:
    from labcnn import bench
    from labcnn.data import load_cifar10
    from labcnn.train import select_device, use_physical_cores

    use_physical_cores(args.threads)
    if args.data_dir:
        images, labels = load_cifar10(args.data_dir, train=True)
        print(f"data: {len(labels)} CIFAR-10 training images from {args.data_dir}")
    else:
        images, labels = bench.random_data()
        print(f"data: {len(labels)} random uint8 images with random labels (no --data-dir; timings do not depend on pixel values)")
    result = bench.run(images, labels, select_device(args.device), args.images_per_round, args.rounds,
                       compile=args.compile, log=lambda s: print(s, flush=True))
    bench.report(result)


COMMANDS = {"train": run_train, "evaluate": run_evaluate, "summary": run_summary, "gifs": run_gifs, "bench": run_bench}


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    warnings.formatwarning = lambda message, category, *rest: f"warning: {message}\n"
    try:
        COMMANDS[args.command](args)
    except LabcnnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside training (run_train reports where to resume)
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0
