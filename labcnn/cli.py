"""``python -m labcnn COMMAND``. One error boundary (:func:`main`): a user, file-system or network
error is one line ``error: ...`` (status 2); a warning one ``warning: ...`` line; a failed
``verify`` status 1; Ctrl-C, SIGTERM or SIGHUP one line and status 128 + the signal's number."""

import argparse
import contextlib
import os
import re
import signal
import sys
import threading
import warnings
from pathlib import Path

from labcnn import LabcnnError, harness, lab
from labcnn.animations import make_gifs, refresh_notebook
from labcnn.checkpoint import CHECKPOINT, HISTORY, load_trained, provenance, read_file
from labcnn.data import CLASSES, load_cifar10
from labcnn.device import describe_device, precision_name, select_device, set_threads, tf32_emulated
from labcnn.fileio import read_json, read_notebook, write_json
from labcnn.model import COLLAPSE_NORM, Normalization, collapsed_filters
from labcnn.notebook import checkout_root
from labcnn.settings import RANGES, RECIPES, make_config

CHECKPOINT_HELP = "RUN/checkpoint.pt, or a file holding LabCNN's state_dict"
DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps (default: auto, the best available)"
DATA_HELP = "folder holding CIFAR-10 in any supported layout (default: data)"
NO_VERIFY_HELP = "skip the MD5 checks of official-layout files"
OUT_HELP = "run folder: checkpoint.pt, history.json, loss.png, accuracy.png"
AMP_HELP = "mixed precision; alone: auto, bfloat16 where native, else float16 on CUDA, else float32"
MEAN_HELP = "normalization mean per channel (default: the checkpoint's)"
RUN_HELP = "a run folder, or a weights file with its history NAME.json beside it"
NOTEBOOK = Path("notebooks/lab1_cnn_cifar10.ipynb")
REFRESH_HELP = "refresh the GIF outputs of this notebook, if it exists"
TRAIN_OPTIONS = ("epochs", "batch_size", "lr", "weight_decay", "label_smoothing", "seed")
TRAIN_OPTIONS += ("subset", "val_size")  # TrainConfig fields; the recipe's value when not given


class VerifyFailed(LabcnnError):
    """``verify`` found a figure or hash that differs: status 1."""


class Parser(argparse.ArgumentParser):
    """argparse with the project's one-line errors (status 2)."""

    def error(self, message):
        """Exit with ``error: ...`` in one line and status 2."""
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def ranged(key: str):
    """An argparse type reading an option through the one range table, ``RANGES[key]``."""

    def parse(text):
        try:
            return RANGES[key].parse(key, text)
        except LabcnnError:  # argparse names the option; the value may hold ": "
            raise argparse.ArgumentTypeError(
                f"expected {RANGES[key].expected()}, got {text!r}"
            ) from None

    return parse


def path(text: str) -> Path:
    """A path option, ``~`` expanded."""
    return Path(text).expanduser()


def say(*lines) -> None:
    """Print ``lines`` at once. When the reader of a pipe has gone (``| head``), output goes to
    the null device from then on and the command goes on: training is never stopped by it."""
    try:
        print(*lines, sep="\n", flush=True)
    except BrokenPipeError:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())  # Python's own flush at exit then succeeds too
        os.close(null)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; each option's range and help come from ``RANGES``."""
    parser = Parser(prog="python -m labcnn", description="The lab's simple CNN for CIFAR-10.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    train = commands.add_parser("train", help="train; resumes when --out holds a checkpoint")
    evaluate = commands.add_parser("evaluate", help="test loss, accuracy, per class, confusion")
    verify = commands.add_parser("verify", help="re-evaluate a run; check its figures and hashes")
    filters = commands.add_parser("filters", help="count each convolution's collapsed filters")
    gifs = commands.add_parser("gifs", help="write the convolution and max-pooling GIFs")
    commands.add_parser(
        "bench", add_help=False, help="training images/s: tutorial vs labcnn vs model step (-h)"
    )
    for sub in (train, evaluate, verify):
        sub.add_argument("--data-dir", type=path, default=Path("data"), help=DATA_HELP)
        sub.add_argument("--download", action="store_true", help="download it if none is found")
        sub.add_argument("--download-url", metavar="URL", help="download from this mirror")
        sub.add_argument("--no-verify", dest="verify", action="store_false", help=NO_VERIFY_HELP)
    train.add_argument("--out", required=True, type=path, help=OUT_HELP)
    train.add_argument("--recipe", default="lab", choices=RECIPES, help="named settings")
    for key in TRAIN_OPTIONS:
        help = f"{RANGES[key].help} (default: the recipe's)"
        train.add_argument(f"--{key.replace('_', '-')}", type=ranged(key), help=help)
    amp = dict(nargs="?", const="auto", choices=RANGES["amp"].choices, help=AMP_HELP)
    train.add_argument("--amp", **amp)
    evaluate.add_argument("--checkpoint", required=True, type=path, help=CHECKPOINT_HELP)
    evaluate.add_argument("--mean", type=float, nargs=3, metavar="M", help=MEAN_HELP)
    evaluate.add_argument("--std", type=float, nargs=3, metavar="S", help="with --mean")
    verify.add_argument("run", type=path, metavar="RUN_DIR", help=RUN_HELP)
    verify.add_argument("--notebook", type=path, help="also check the figures this notebook prints")
    filters.add_argument(
        "checkpoints", nargs="+", type=path, metavar="CHECKPOINT", help=CHECKPOINT_HELP
    )
    filters.add_argument("--json", type=path, metavar="PATH", help="also write the counts as JSON")
    gifs.add_argument("--out", default=Path("Images"), type=path, help="folder (default: Images)")
    gifs.add_argument("--notebook", default=NOTEBOOK, type=path, help=REFRESH_HELP)
    for sub in (train, evaluate):
        sub.add_argument("--device", help=DEVICE_HELP)
    return parser


def load_split(args, train: bool):
    """One split of the data the options name (``--data-dir``, ``--download``, ...)."""
    return load_cifar10(args.data_dir, train, args.download, args.verify, args.download_url)


def run_train(args) -> None:
    """``train``: the recipe with the options given, into ``--out``, resuming it."""
    config = make_config(args.recipe, **{k: getattr(args, k) for k in [*TRAIN_OPTIONS, "amp"]})
    set_threads()
    device = select_device(args.device)  # checked before any data is loaded
    train_data, test_data = load_split(args, True), load_split(args, False)
    sizes = f"{len(train_data[1])} training and {len(test_data[1])} test images"
    say(f"data: {sizes} from {args.data_dir}")
    last = harness.train(config, train_data, test_data, args.out, device, log=say).history[-1]
    say(
        f"final test accuracy {last['test_acc']:.2%}, test loss {last['test_loss']:.4f}; "
        f"results in {args.out}"
    )


def run_evaluate(args) -> None:
    """``evaluate``: a checkpoint or state dict on the test set, per class and confused."""
    if (args.mean is None) != (args.std is None):
        raise LabcnnError("--mean and --std go together: give three values for each")
    set_threads()
    given = Normalization(args.mean, args.std) if args.mean else None
    trained = load_trained(args.checkpoint, select_device(args.device), given)
    say(trained.note)
    images, labels = load_split(args, False)
    result = lab.evaluate(trained, images, labels)
    loss, accuracy = result["loss"], result["accuracy"]
    say(f"test images {len(labels)}  loss {loss:.4f}  top-1 accuracy {accuracy:.2%}")
    say(
        *(
            f"  {name:<10} {acc:7.2%}"
            for name, acc in zip(CLASSES, result["per_class_accuracy"], strict=False)
        )
    )
    say("confusion matrix (rows: true class, columns: predicted):")
    say("           " + " ".join(f"{c[:5]:>5}" for c in CLASSES))
    for name, row in zip(CLASSES, result["confusion"].tolist(), strict=False):
        say(f"{name:<10} " + " ".join(f"{v:5d}" for v in row))


def run_verify(args) -> None:
    """``verify``: re-evaluate a run's final weights on the test set and compare its history's
    last figures, within what evaluating on another device can move; VerifyFailed if not."""
    weights, history_path = (args.run / CHECKPOINT, args.run / HISTORY)
    if not args.run.is_dir():
        weights, history_path = args.run, args.run.with_suffix(".json")
    saved = read_file(weights)  # read once: the weights and an export's history SHA-256
    trained = load_trained(weights, state=saved)
    history = read_json(history_path, "a run's history")
    try:
        last = history[-1]
        recorded = {"accuracy": last["test_acc"], "loss": last["test_loss"]}
    except (LookupError, TypeError) as e:
        raise LabcnnError(
            f"{history_path} is not a run's history ({type(e).__name__}: {e}): "
            "expected a JSON list of epochs with test_acc and test_loss"
        ) from None
    facts = provenance(trained.model, history)
    problems = []
    saved_sha = (
        saved.get("history_sha256", facts["history sha256"]) if isinstance(saved, dict) else None
    )
    if (trained.history and history != trained.history) or saved_sha != facts["history sha256"]:
        problems.append(f"{history_path} differs from the history saved in {weights}")
    images, labels = load_split(args, False)
    result = lab.evaluate(trained, images, labels)
    device = next(trained.model.parameters()).device
    here = f"{describe_device(device)}, {precision_name(device, None)}"
    there = last.get("device", "a device not recorded")
    tolerance = {"accuracy": 0.00005, "loss": 0.00005}  # half of the last digit printed
    if there.split(" ")[0] != here.split(" ")[0]:  # another kind of device: TF32 on a GPU
        with tf32_emulated(trained.model):
            moved = lab.evaluate(trained, images, labels)
        for key in tolerance:  # twice what TF32's rounding moves here, as a margin
            tolerance[key] += 2 * abs(moved[key] - result[key])
    for key, unit, form in (("accuracy", 100, ".2f"), ("loss", 1, ".4f")):
        sign = "%" if key == "accuracy" else ""
        now, then = f"{result[key] * unit:{form}}{sign}", f"{recorded[key] * unit:{form}}{sign}"
        allowed = f"{tolerance[key] * unit:.5f}{' points' if sign else ''}"
        say(
            f"final test {key} {now}, recorded {then} at epoch {len(history)} (tolerance {allowed})"
        )
        if abs(result[key] - recorded[key]) > tolerance[key]:
            problems.append(f"the test {key} of the weights is {now}, the history says {then}")
    say(f"evaluated on {here}; recorded on {there}")
    if trained.config is not None and len(history) < trained.config.epochs:
        say(f"an unfinished run: {len(history)} of {trained.config.epochs} epochs")
    say(*(f"{name} {value}" for name, value in facts.items()))
    if args.notebook is not None:
        problems += notebook_mismatches(args.notebook, f"{recorded['accuracy']:.2%}", facts)
    if problems:
        say(*(f"MISMATCH: {p}" for p in problems))
        raise VerifyFailed(f"{len(problems)} mismatch(es)")
    say("verified")


def notebook_mismatches(notebook: Path, accuracy: str, facts: dict) -> list[str]:
    """What the notebook's outputs print that differs from the run's figures and hashes."""
    outputs = [o for cell in read_notebook(notebook)["cells"] for o in cell.get("outputs", [])]
    text = "".join("".join(o.get("text", "")) for o in outputs if isinstance(o, dict))
    printed = re.findall(r"final test accuracy (\d+\.\d\d%)", text)
    problems = []
    if not printed or any(p != accuracy for p in printed):
        problems.append(
            f"{notebook} prints final test accuracy {printed or 'nowhere'}, the run has {accuracy}"
        )
    for name, value in facts.items():
        found = re.findall(rf"{name} ([0-9a-f]+)", text)
        if found and any(f != value for f in found):
            problems.append(f"{notebook} prints {name} {found[0]}, the run has {value}")
    return problems


def run_filters(args) -> None:
    """``filters``: count each convolution's collapsed filters in each checkpoint."""
    counts = {}
    for checkpoint in args.checkpoints:
        found = collapsed_filters(load_trained(checkpoint).model)
        counts[str(checkpoint)] = {k: list(v) for k, v in found.items()}
        listed = ", ".join(f"{k} {c} of {n}" for k, (c, n) in found.items())
        say(f"{checkpoint}: {listed} filters with an L2 norm below {COLLAPSE_NORM}")
    if args.json:
        write_json(args.json, counts)


def run_gifs(args) -> None:
    """``gifs``: write the GIFs and refresh the notebook's copies of them."""
    gifs = make_gifs(args.out)
    say(*(f"wrote {gif} ({gif.stat().st_size / 1024:.0f} KiB)" for gif in gifs))
    if args.notebook.is_file() and refresh_notebook(args.notebook, gifs):
        say(f"refreshed the GIF outputs of {args.notebook}")


def run_bench(args) -> None:
    """``bench``: benchmarks/bench.py of the checkout (the benchmark is not in the package)."""
    root = checkout_root()
    if root is None or not (root / "benchmarks" / "bench.py").is_file():
        raise LabcnnError("bench runs from a checkout of the repository (benchmarks/bench.py)")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from benchmarks import bench

    bench.main(args.options)


COMMANDS = {
    "train": run_train,
    "evaluate": run_evaluate,
    "verify": run_verify,
    "filters": run_filters,
    "gifs": run_gifs,
    "bench": run_bench,
}


class Stopped(KeyboardInterrupt):
    """SIGTERM (Slurm preemption, ``docker stop``) or SIGHUP, raised where the process is, so
    that it ends as Ctrl-C does: every ``finally`` runs and no file is left half-written."""


def stop(signum, frame):
    """A signal handler: raise :class:`Stopped` where the process is."""
    raise Stopped(signum)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0, 1 for a failed verify, 2, 128 + N)."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":  # bench parses its own options (benchmarks/bench.py)
        args.options = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    with warnings.catch_warnings():  # restores the process's warning display afterwards
        warnings.showwarning = lambda message, *_: warn(f"warning: {message}")
        handlers = {}
        for name in ("SIGTERM", "SIGHUP"):  # Windows has no SIGHUP
            if hasattr(signal, name) and threading.current_thread() is threading.main_thread():
                handlers[name] = signal.signal(getattr(signal, name), stop)
        try:
            COMMANDS[args.command](args)
        except VerifyFailed as e:
            say(str(e))
            return 1
        except (LabcnnError, OSError) as e:  # an OSError (file system, network) names its path
            where = f"{e.filename}: " if isinstance(e, OSError) and e.filename else ""
            warn(f"error: {where}{getattr(e, 'strerror', None) or e}")
            return 2
        except KeyboardInterrupt as e:
            number = e.args[0] if isinstance(e, Stopped) else signal.SIGINT
            resume = ": completed epochs are saved in {}; run the same command to resume"
            what = (
                "interrupted"
                if number == signal.SIGINT
                else f"stopped by {signal.Signals(number).name}"
            )
            warn(f"\n{what}" + (resume.format(args.out) if args.command == "train" else ""))
            return 128 + number
        finally:
            for name, handler in handlers.items():
                signal.signal(getattr(signal, name), handler)
    return 0


def warn(line: str) -> None:
    """``line`` on stderr, if the process has one (pythonw and ``2>&-`` have none)."""
    if sys.stderr is not None:
        with contextlib.suppress(OSError):  # a closed descriptor
            print(line, file=sys.stderr, flush=True)
