"""``python -m labcnn COMMAND``. One error boundary (:func:`main`): a user, file-system or network
error is one line ``error: ...``, status 2; a warning one ``warning: ...`` line; Ctrl-C: 130."""
import argparse
import functools
import json
import re
import sys
import warnings
from pathlib import Path

from labcnn import LabcnnError
from labcnn.checkpoint import CHECKPOINT, HISTORY, load_trained, provenance, read_file
from labcnn.config import DEVICE_CHOICES, RANGES, RECIPES, make_config, select_device, set_threads
from labcnn.fileio import write_json
from labcnn.model import COLLAPSE_NORM, Normalization, collapsed_filters

log = functools.partial(print, flush=True)  # progress lines appear as they come
CHECKPOINT_HELP = "RUN/checkpoint.pt, or a file holding LabCNN's state_dict"
TRAIN_OPTIONS = {  # TrainConfig fields read through RANGES; the recipe's value when not given
    "epochs": "passes over the training set", "batch_size": "images per step",
    "lr": "learning rate (the peak of a one-cycle schedule)",
    "weight_decay": "L2 penalty (decoupled for AdamW)",
    "label_smoothing": "cross-entropy label smoothing, 0 to < 1",
    "seed": "0 to 2**64 - 1: initialization, order, subset, split",
    "subset": "train on N training images (the test set stays whole)",
    "val_size": "hold N training images out for validation"}

class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's errors as the project's one line, status 2
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")

def ranged(key: str):  # an argparse type reading the option through RANGES: one range table
    def parse(text):
        try:
            return RANGES[key].parse(key, text)
        except LabcnnError:  # the value may hold ": ", so the message is built anew
            raise argparse.ArgumentTypeError(f"expected {RANGES[key].expected()}, "
                                             f"got {text!r}") from None
    return parse

def path(text: str) -> Path:
    return Path(text).expanduser()

def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m labcnn", description="The lab's simple CNN for CIFAR-10.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    train = commands.add_parser("train", help="train; resumes when --out holds a checkpoint")
    evaluate = commands.add_parser("evaluate", help="test loss, accuracy, per class, confusion")
    verify = commands.add_parser("verify", help="re-evaluate a run; check its figures and hashes")
    filters = commands.add_parser("filters", help="count each convolution's collapsed filters")
    gifs = commands.add_parser("gifs", help="write the convolution and max-pooling GIFs")
    bench = commands.add_parser("bench", help="training images/s: tutorial vs labcnn vs model step")
    for sub in (train, evaluate, verify):
        sub.add_argument("--data-dir", type=path, default=Path("data"),
                         help="folder holding CIFAR-10 in any supported layout (default: data)")
        sub.add_argument("--download", action="store_true",
                         help="download the official archive if no data is found (needs internet)")
        sub.add_argument("--download-url", metavar="URL",
                         help="download from this mirror instead of torchvision's official source")
        sub.add_argument("--no-verify", dest="verify", action="store_false",
                         help="skip the MD5 checks of official-layout files")
    train.add_argument("--out", required=True, type=path,
                       help="run folder: checkpoint.pt, history.json, loss.png, accuracy.png")
    train.add_argument("--recipe", default="lab", choices=RECIPES,
                       help="named settings (default: lab)")
    for key, text in TRAIN_OPTIONS.items():
        train.add_argument(f"--{key.replace('_', '-')}", type=ranged(key),
                           help=f"{text} (default: the recipe's)")
    train.add_argument("--amp", nargs="?", const="auto", choices=RANGES["amp"].choices,
                       help="mixed precision; the flag alone: auto, bfloat16 where native, else "
                            "float16 on CUDA, else float32 (default: the recipe's)")
    evaluate.add_argument("--checkpoint", required=True, type=path, help=CHECKPOINT_HELP)
    evaluate.add_argument("--mean", type=float, nargs=3, metavar="M",
                          help="normalization mean per channel (default: the checkpoint's)")
    evaluate.add_argument("--std", type=float, nargs=3, metavar="S", help="with --mean")
    verify.add_argument("run", type=path, metavar="RUN_DIR",
                        help="a run folder, or a weights file with its history NAME.json beside it")
    verify.add_argument("--notebook", type=path, help="also check the figures this notebook prints")
    filters.add_argument("checkpoints", nargs="+", type=path, metavar="CHECKPOINT",
                         help=CHECKPOINT_HELP)
    filters.add_argument("--json", type=path, metavar="PATH", help="also write the counts as JSON")
    gifs.add_argument("--out", default=Path("Images"), type=path, help="folder (default: Images)")
    gifs.add_argument("--notebook", default=Path("notebooks/lab1_cnn_cifar10.ipynb"), type=path,
                      help="refresh the GIF outputs of this notebook, if it exists")
    bench.add_argument("--data-dir", type=path, help="time on CIFAR-10 from DIR (default: random)")
    bench.add_argument("--images-per-round", type=ranged("images_per_round"), default=10_000,
                       metavar="N", help="images per contender per round (default: 10000)")
    bench.add_argument("--rounds", type=ranged("rounds"), default=5, metavar="N",
                       help="alternating rounds; each contender's fastest counts (default: 5)")
    bench.set_defaults(download=False, verify=True, download_url=None)  # for load_split
    for sub in (train, evaluate, bench):
        sub.add_argument("--device", help=f"{DEVICE_CHOICES} (default: auto, the best available)")
    return parser

def load_split(args, train: bool):
    from labcnn.data import load_cifar10
    return load_cifar10(args.data_dir, train=train, download=args.download, verify=args.verify,
                        url=args.download_url)

def run_train(args) -> None:
    from labcnn.train import fit
    config = make_config(args.recipe, **{k: getattr(args, k) for k in [*TRAIN_OPTIONS, "amp"]})
    set_threads()
    device = select_device(args.device)  # checked before any data is loaded
    train_data, test_data = load_split(args, True), load_split(args, False)
    print(f"data: {len(train_data[1])} training and {len(test_data[1])} test images "
          f"from {args.data_dir}")
    last = fit(config, train_data, test_data, args.out, device, log=log).history[-1]
    print(f"final test accuracy {last['test_acc']:.2%}, test loss {last['test_loss']:.4f}; "
          f"results in {args.out}")

def run_evaluate(args) -> None:
    from labcnn.data import CLASSES
    from labcnn.train import evaluate
    if (args.mean is None) != (args.std is None):
        raise LabcnnError("--mean and --std go together: give three values for each")
    set_threads()
    trained = load_trained(args.checkpoint, select_device(args.device),
                           Normalization(args.mean, args.std) if args.mean else None)
    print(trained.note)
    images, labels = load_split(args, False)
    result = evaluate(trained, images, labels)
    print(f"test images {len(labels)}  loss {result['loss']:.4f}  "
          f"top-1 accuracy {result['accuracy']:.2%}")
    for name, acc in zip(CLASSES, result["per_class_accuracy"]):
        print(f"  {name:<10} {acc:7.2%}")
    print("confusion matrix (rows: true class, columns: predicted):")
    print("           " + " ".join(f"{c[:5]:>5}" for c in CLASSES))
    for name, row in zip(CLASSES, result["confusion"].tolist()):
        print(f"{name:<10} " + " ".join(f"{v:5d}" for v in row))

def run_verify(args) -> None:
    from labcnn.train import evaluate
    weights, history_path = ((args.run / CHECKPOINT, args.run / HISTORY) if args.run.is_dir()
                             else (args.run, args.run.with_suffix(".json")))
    trained, saved = load_trained(weights), read_file(weights)
    checks = (("accuracy", "test_acc", ".2%"), ("loss", "test_loss", ".4f"))
    try:
        history = json.loads(history_path.read_text())
        recorded = {key: format(history[-1][field], form) for key, field, form in checks}
    except (ValueError, LookupError, TypeError) as e:
        raise LabcnnError(f"{history_path} is not a run's history ({type(e).__name__}: {e}): "
                          "expected a JSON list of epochs with test_acc and test_loss") from None
    facts = provenance(trained.model, history)
    problems = [f"{history_path} differs from the history saved in {weights}"] * (
        bool(trained.history) and history != trained.history
        or saved.get("history_sha256", facts["history sha256"]) != facts["history sha256"])
    result = evaluate(trained, *load_split(args, False))
    for key, _, form in checks:
        now = format(result[key], form)
        print(f"final test {key} {now} (recorded at epoch {len(history)}: {recorded[key]})")
        problems += [f"the test {key} of the weights is {now}, the history says "
                     f"{recorded[key]}"] * (now != recorded[key])
    print("\n".join(f"{name} {value}" for name, value in facts.items()))
    if args.notebook is not None:
        problems += notebook_mismatches(args.notebook, f"{result['accuracy']:.2%}", facts)
    if problems:
        print(*(f"MISMATCH: {p}" for p in problems), f"{len(problems)} mismatch(es)", sep="\n")
        raise SystemExit(1)
    print("verified")

def notebook_mismatches(notebook: Path, accuracy: str, facts: dict) -> list[str]:
    """What the notebook's outputs print that differs from the run's figures and hashes."""
    try:
        cells = json.loads(notebook.read_text())["cells"]
        text = "".join("".join(o.get("text", "")) for c in cells for o in c.get("outputs", []))
    except (ValueError, LookupError, TypeError, AttributeError) as e:
        raise LabcnnError(f"{notebook} is not a Jupyter notebook ({type(e).__name__})") from None
    printed = re.findall(r"final test accuracy (\d+\.\d\d%)", text)
    problems = [f"{notebook} prints final test accuracy {printed or 'nowhere'}, the run has "
                f"{accuracy}"] * (not printed or any(p != accuracy for p in printed))
    for name, value in facts.items():
        found = re.findall(rf"{name} ([0-9a-f]+)", text)
        if found and any(f != value for f in found):
            problems.append(f"{notebook} prints {name} {found[0]}, the run has {value}")
    return problems

def run_filters(args) -> None:
    counts = {}
    for checkpoint in args.checkpoints:
        found = collapsed_filters(load_trained(checkpoint).model)
        counts[str(checkpoint)] = {k: list(v) for k, v in found.items()}
        print(f"{checkpoint}: " + ", ".join(f"{k} {c} of {n}" for k, (c, n) in found.items())
              + f" filters with an L2 norm below {COLLAPSE_NORM}")
    if args.json:
        write_json(args.json, counts)

def run_gifs(args) -> None:
    from labcnn.animations import make_gifs, refresh_notebook
    gifs = make_gifs(args.out)
    print(*(f"wrote {gif} ({gif.stat().st_size / 1024:.0f} KiB)" for gif in gifs), sep="\n")
    try:
        if args.notebook.is_file() and refresh_notebook(args.notebook, gifs):
            print(f"refreshed the GIF outputs of {args.notebook}")
    except ValueError as e:  # not a notebook, or none of its cells shows a GIF
        raise LabcnnError(str(e)) from None

def run_bench(args) -> None:
    from labcnn import bench
    set_threads()
    device = select_device(args.device)
    if args.data_dir:
        images, labels = load_split(args, True)
        print(f"data: {len(labels)} CIFAR-10 training images from {args.data_dir}")
    else:
        images, labels = bench.random_data()
        print(f"data: {len(labels)} random images (no --data-dir; timings do not depend on pixels)")
    bench.report(bench.run(images, labels, device, args.images_per_round, args.rounds, log=log))

COMMANDS = {"train": run_train, "evaluate": run_evaluate, "verify": run_verify,
            "filters": run_filters, "gifs": run_gifs, "bench": run_bench}

def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, 1 for a failed verify, 2, 130)."""
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():  # restores the process's warning display afterwards
        warnings.showwarning = lambda message, *_: print(f"warning: {message}", file=sys.stderr)
        try:
            COMMANDS[args.command](args)
        except (LabcnnError, OSError) as e:  # an OSError (file system, network) names its path
            where = f"{e.filename}: " if isinstance(e, OSError) and e.filename else ""
            print(f"error: {where}{getattr(e, 'strerror', None) or e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            resume = ": completed epochs are saved in {}; run the same command to resume"
            print("\ninterrupted" + (resume.format(args.out) if args.command == "train" else ""),
                  file=sys.stderr)
            return 130
    return 0
