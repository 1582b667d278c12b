"""A training run's settings: :class:`TrainConfig`, the named recipes, and :data:`RANGES`, the one
table of what each setting accepts and what it means, read by ``TrainConfig``, the command line
and the notebook's ``LABCNN_*`` variables alike."""

import math
import operator
from contextlib import suppress
from dataclasses import dataclass, fields

from labcnn import ConfigError
from labcnn.model import LAB_MEAN, LAB_STD, Normalization

TRUE = ("1", "true", "yes", "on", "y")
FALSE = ("0", "false", "no", "off", "n")
COMPARE = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


class Range:
    """What a setting accepts: a ``kind`` within ``bounds`` such as ``(">=", 1)``, or one of
    ``choices``; ``None`` only if ``optional``. ``help`` says what the setting means."""

    def __init__(self, kind: type, *bounds: tuple, choices=(), optional=False, help=""):
        self.kind = kind
        self.bounds = bounds
        self.choices = choices
        self.optional = optional
        self.help = help

    def expected(self) -> str:
        """The accepted values in words: ``"an integer >= 1"``, ``"one of off, auto"``."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.kind is bool:
            return f"a boolean ({'/'.join(TRUE)} or {'/'.join(FALSE)}, any case)"
        number = "an integer" if self.kind is int else "a finite number"
        return number + " and".join(f" {op} {bound}" for op, bound in self.bounds)

    def holds(self, value) -> bool:
        """Whether ``value`` is accepted (a bool is not a number, nor a number a bool)."""
        if value is None:
            return self.optional
        if self.choices:
            return value in self.choices
        kinds = (int, float) if self.kind is float else self.kind
        if not isinstance(value, kinds) or isinstance(value, bool) != (self.kind is bool):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        return all(COMPARE[op](value, bound) for op, bound in self.bounds)

    def parse(self, name: str, text: str):
        """``text`` as this setting's value; ConfigError naming ``name`` and what is expected."""
        word = text.strip()
        value = None
        if self.kind is bool:
            value = True if word.lower() in TRUE else False if word.lower() in FALSE else None
        else:
            with suppress(ValueError):  # not a number: refused below
                value = self.kind(word)
        if value is None or not self.holds(value):
            raise ConfigError(f"{name}={text!r}: expected {self.expected()}")
        return value


# Named recipes: overrides of the TrainConfig defaults, which are the lab's (results/README.md
# has their runs). The improved recipe was chosen on 5,000 held-out images, never the test set.
RECIPES = {
    "lab": {},
    "improved": dict(
        epochs=40,
        batch_size=128,
        optimizer="sgd",
        lr=0.1,
        weight_decay=5e-4,
        schedule="onecycle",
        label_smoothing=0.1,
        augment=True,
        mean=None,
        std=None,
        val_size=5000,
        amp="auto",
    ),
}
# The improved recipe for a 2-epoch budget: no augmentation, batch 64 (results/README.md).
RECIPES["fast"] = {**RECIPES["improved"], "epochs": 2, "augment": False, "batch_size": 64}

RANGES = {
    "recipe": Range(str, choices=tuple(RECIPES), help="named settings"),
    "optimizer": Range(str, choices=("adam", "adamw", "sgd")),
    "schedule": Range(str, choices=("constant", "onecycle")),
    "amp": Range(str, choices=("off", "auto", "bf16", "fp16"), help="mixed precision"),
    "epochs": Range(int, (">=", 1), help="passes over the training set"),
    "batch_size": Range(int, (">=", 1), help="images per step"),
    "eval_batch_size": Range(int, (">=", 1)),
    "rounds": Range(int, (">=", 1), help="alternating rounds; each contender's fastest counts"),
    "images_per_round": Range(int, (">=", 1), help="images per contender per round"),
    "momentum": Range(float, (">=", 0), ("<", 1)),
    "label_smoothing": Range(float, (">=", 0), ("<", 1), help="cross-entropy label smoothing"),
    "lr": Range(float, (">", 0), help="learning rate (the peak of a one-cycle schedule)"),
    "weight_decay": Range(float, (">=", 0), help="L2 penalty (decoupled for AdamW)"),
    "val_size": Range(int, (">=", 0), help="hold N training images out for validation"),
    "subset": Range(int, (">=", 1), optional=True, help="train on N training images"),
    # What torch.manual_seed accepts.
    "seed": Range(int, (">=", 0), ("<=", 2**64 - 1), help="initialization, order, subset, split"),
    "augment": Range(bool),
    "download": Range(bool),
    "verify": Range(bool),
}
# Fields of earlier versions, read from their checkpoints while at these (unused) values.
REMOVED = {"cutout": 0, "ema": 0.0, "whiten": False, "compile": False}


@dataclass(frozen=True)
class TrainConfig:
    """A training run's settings, by default the lab's; each checked against :data:`RANGES`.

    ``schedule``: a constant learning rate, or OneCycleLR stepped per batch and peaking at
    ``lr`` (Smith and Topin, 2017). ``mean``, ``std``: the normalization, fractions of 255 per
    channel, or None to measure it on the training images. Raises ConfigError.
    """

    recipe: str = "lab"
    epochs: int = 50
    batch_size: int = 100
    optimizer: str = "adam"
    lr: float = 0.01
    weight_decay: float = 0.001
    momentum: float = 0.9
    schedule: str = "constant"
    label_smoothing: float = 0.0
    augment: bool = False
    mean: tuple | None = LAB_MEAN
    std: tuple | None = LAB_STD
    seed: int = 0
    subset: int | None = None
    val_size: int = 0
    eval_batch_size: int = 1000
    amp: str = "off"

    def __post_init__(self):
        bad = []
        for name, allowed in RANGES.items():
            if name in self.__dataclass_fields__ and not allowed.holds(getattr(self, name)):
                bad.append(f"{name}={getattr(self, name)!r} (expected {allowed.expected()})")
        if (self.mean is None) != (self.std is None):
            bad.append(
                f"mean={self.mean!r}, std={self.std!r} (give both, or neither to measure them)"
            )
        elif self.mean is not None:
            try:  # stored as tuples of floats, whatever sequences are given
                normalization = Normalization(self.mean, self.std)
                object.__setattr__(self, "mean", normalization.mean)
                object.__setattr__(self, "std", normalization.std)
            except ConfigError as e:
                bad.append(str(e))
        if bad:
            raise ConfigError(f"invalid TrainConfig {'; '.join(bad)}")


def make_config(recipe: str = "lab", **overrides) -> TrainConfig:
    """The named recipe, with the ``overrides`` that are not ``None``. Raises ConfigError."""
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}: expected one of {', '.join(RECIPES)}")
    unknown = set(overrides) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise ConfigError(f"unknown TrainConfig fields {sorted(unknown)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    return TrainConfig(**{**RECIPES[recipe], "recipe": recipe, **given})


def config_from_dict(saved: dict) -> TrainConfig:
    """A checkpoint's config: fields it predates take their defaults, removed ones are dropped
    while unused. Raises ConfigError for a removed feature in use or an unknown field."""
    saved = dict(saved)
    # The first checkpoints stored amp as a flag, and "native" was the name of "auto".
    amp = saved.get("amp", "off")
    saved["amp"] = {True: "auto", False: "off", "native": "auto"}.get(amp, amp)
    used = [k for k, off in REMOVED.items() if saved.pop(k, off) not in (off, None)]
    if used:
        raise ConfigError(
            f"uses {', '.join(used)}, which this labcnn no longer has (see results/README.md)"
        )
    unknown = sorted(set(saved) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise ConfigError(
            f"holds settings this labcnn does not know ({', '.join(unknown)}): "
            "it comes from a newer labcnn; update labcnn"
        )
    return TrainConfig(**saved)
