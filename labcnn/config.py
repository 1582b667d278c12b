"""Every setting of a training run in one dataclass, and the named recipes.

Like nanoGPT's ``train.py``, the defaults are in one visible place: :class:`TrainConfig`'s
defaults are the lab's recipe, and :data:`RECIPES` holds the other recipes as overrides.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from labcnn.device import AMP_CHOICES
from labcnn.errors import ConfigError
from labcnn.transforms import LAB_MEAN, LAB_STD

SEED_MAX = 2**64 - 1  # torch.manual_seed accepts 0 .. 2**64 - 1


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run. The defaults are the lab's recipe.

    Attributes:
        recipe: name of the recipe the settings came from (see :data:`RECIPES`).
        epochs: passes over the training set.
        batch_size: training images per step; the last batch of an epoch may be smaller,
            down to one image. That trains without error: every BatchNorm is a BatchNorm2d,
            which averages each channel over its 33x33, 17x17 or 9x9 map, never over one value.
        optimizer: ``"adam"`` (torch.optim.Adam, L2 ``weight_decay`` added to the gradient),
            ``"adamw"`` (torch.optim.AdamW, decoupled weight decay; Loshchilov and Hutter, 2019)
            or ``"sgd"`` (torch.optim.SGD with Nesterov momentum).
        lr: learning rate; the peak rate for the ``"onecycle"`` schedule.
        weight_decay: L2 penalty coefficient (decoupled decay factor for AdamW).
        momentum: SGD momentum (used by ``"sgd"`` only).
        schedule: ``"constant"`` or ``"onecycle"`` (torch.optim.lr_scheduler.OneCycleLR, stepped
            per batch; Smith and Topin, 2017, "Super-Convergence").
        label_smoothing: CrossEntropyLoss label smoothing (Szegedy et al., 2016), 0 for none.
        augment: random crop with 4-pixel zero padding and horizontal flip, per batch.
        cutout: side in pixels of one square zeroed at a random centre of each normalized
            training image, clipped at the border (Cutout: DeVries and Taylor, 2017); 0 for none.
        ema: decay per step of an exponential moving average of the weights and BatchNorm
            statistics, which is then the model evaluated and saved (``torch.optim.swa_utils.
            AveragedModel`` with ``get_ema_multi_avg_fn``, as torchvision's classification
            reference uses it); 0 for none.
        whiten: start conv1 from the whitening filters of the training images' 2x2 patches
            (airbench's initialisation, :func:`labcnn.whitening.whiten_conv`); the layer still trains.
        mean, std: per-channel normalization as fractions of 255; ``None`` measures them on the
            training images (:meth:`labcnn.transforms.Normalization.measure`).
        seed: seeds the initialization, the subset, the validation split and every shuffle;
            0 to 2**64 - 1, as ``torch.manual_seed`` accepts.
        subset: train on this many training images (``None``: all).
        val_size: hold this many training images out as a validation set (0: none).
        eval_batch_size: images per evaluation batch; results do not depend on it.
        amp: mixed precision, one of ``"off"``, ``"auto"``, ``"native"``, ``"bf16"``, ``"fp16"``
            (see :func:`labcnn.device.amp_dtype`); ``True`` and ``False`` read as auto and off.
            The lab's recipe is float32; the others use bfloat16 where it is native.
            Evaluation always runs in float32.
        compile: run the training steps through ``torch.compile`` (see ``python -m labcnn bench``).
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
    cutout: int = 0
    ema: float = 0.0
    whiten: bool = False
    mean: tuple | None = LAB_MEAN
    std: tuple | None = LAB_STD
    seed: int = 0
    subset: int | None = None
    val_size: int = 0
    eval_batch_size: int = 1000
    amp: str = "off"
    compile: bool = False

    def __post_init__(self):
        if isinstance(self.amp, bool):  # checkpoints before the amp modes stored a flag
            object.__setattr__(self, "amp", "auto" if self.amp else "off")
        for name in ("mean", "std"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(getattr(self, name)))
        bad = [f"{name}={getattr(self, name)!r} (expected {rule})" for name, (ok, rule) in RULES.items() if not _holds(ok, getattr(self, name))]
        if bad:
            raise ConfigError(f"invalid TrainConfig {'; '.join(bad)}")


def _holds(ok, value) -> bool:
    try:
        return bool(ok(value))
    except TypeError:
        return False


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int_in(low: int, high: float = math.inf):
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _three(ok):
    return lambda v: v is None or (len(v) == 3 and all(map(ok, v)))


# Each field's check and the range its error message gives.
RULES = {
    "recipe": (lambda v: v in RECIPES, "a name in RECIPES"),
    "epochs": (_int_in(1), "an integer >= 1"),
    "batch_size": (_int_in(1), "an integer >= 1"),
    "optimizer": (lambda v: v in ("adam", "adamw", "sgd"), "adam, adamw or sgd"),
    "lr": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "weight_decay": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "momentum": (lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    "schedule": (lambda v: v in ("constant", "onecycle"), "constant or onecycle"),
    "label_smoothing": (lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    "cutout": (_int_in(0, 32), "an integer from 0 to 32"),
    "ema": (lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    "whiten": (lambda v: isinstance(v, bool), "True or False"),
    "mean": (_three(_finite), "three finite numbers"),
    "std": (_three(lambda s: _finite(s) and s > 0), "three finite numbers > 0"),
    "seed": (_int_in(0, SEED_MAX), f"an integer from 0 to 2**64 - 1 = {SEED_MAX}"),
    "subset": (lambda v: v is None or _int_in(1)(v), "an integer >= 1"),
    "val_size": (_int_in(0), "an integer >= 0"),
    "eval_batch_size": (_int_in(1), "an integer >= 1"),
    "amp": (lambda v: v in AMP_CHOICES, f"one of {', '.join(AMP_CHOICES)}"),
}


# Named recipes: overrides of the TrainConfig defaults.
RECIPES = {
    "lab": {},
    # Choices made on 5,000 held-out training images (val_size), never on the test set.
    "improved": dict(
        epochs=40, batch_size=128, optimizer="sgd", lr=0.1, weight_decay=5e-4, momentum=0.9,
        schedule="onecycle", label_smoothing=0.1, augment=True, mean=None, std=None, val_size=5000,
        amp="native",  # bfloat16 where native: no accuracy cost measured (README, Results); --amp off for float32
    ),
}
# The improved recipe, longer, with Cutout and a moving average of the weights (README, Results).
RECIPES["long"] = {**RECIPES["improved"], "epochs": 50, "cutout": 8, "ema": 0.999}
# The improved recipe for a 2-epoch budget: no augmentation, batch 64 (README, Results).
RECIPES["fast"] = {**RECIPES["improved"], "epochs": 2, "augment": False, "batch_size": 64}


def make_config(recipe: str = "lab", **overrides) -> TrainConfig:
    """The named recipe's :class:`TrainConfig`, with ``overrides`` that are not ``None`` applied.

    Raises:
        ConfigError: unknown recipe or field, or an invalid value (the message gives the range).
    """
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; choose one of {sorted(RECIPES)}")
    unknown = set(overrides) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise ConfigError(f"unknown TrainConfig fields {sorted(unknown)}")
    set_fields = {k: v for k, v in overrides.items() if v is not None}
    return TrainConfig(**{**RECIPES[recipe], "recipe": recipe, **set_fields})


def config_from_dict(saved: dict) -> TrainConfig:
    """The :class:`TrainConfig` a checkpoint stored with ``asdict``. A field the checkpoint
    lacks (it predates the field) reads as its default, which is the old behaviour.

    Raises:
        ConfigError: the dict holds unknown fields or invalid values.
    """
    return TrainConfig(**saved)


def config_dict(config: TrainConfig) -> dict:
    """``config`` as plain values (lists for tuples) that ``torch.load(weights_only=True)`` reads."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def applied_settings(config: TrainConfig) -> dict:
    """The settings that act on this run, for printing: no ``momentum`` for Adam, no ``mean``
    and ``std`` when they are measured, no ``val_size``, ``subset``, ``cutout``, ``ema`` or ``whiten`` when unused."""
    unused = {"momentum"} if config.optimizer != "sgd" else set()
    unused |= {name for name in ("subset", "mean", "std") if getattr(config, name) is None}
    unused |= {name for name in ("val_size", "cutout", "ema", "whiten") if not getattr(config, name)}
    return {k: v for k, v in asdict(config).items() if k not in unused}
