"""Figures derived from a run's history and predictions, as the README and the notebook print them.

Accuracies are fractions unless a function formats them; times are seconds.
"""
from __future__ import annotations

import statistics

import torch

ORIGINAL_ACCURACY = 0.6926  # the original lab report's claimed test accuracy (labcnn.report.ORIGINAL)


def best_epoch(history: list[dict], key: str = "test_acc") -> dict:
    """The epoch record with the highest ``key`` (for information: selecting on test data is not allowed)."""
    return max(history, key=lambda r: r[key])


def first_reaching(history: list[dict], accuracy: float) -> dict | None:
    """The first epoch record whose test accuracy is at least ``accuracy`` (a fraction), or ``None``."""
    return next((r for r in history if r["test_acc"] >= accuracy), None)


def seconds_to(history: list[dict], accuracy: float) -> float | None:
    """Training seconds (``elapsed_train_seconds``, evaluation excluded) at the end of the first
    epoch whose test accuracy is at least ``accuracy`` (a fraction); ``None`` if none reached it."""
    reached = first_reaching(history, accuracy)
    return reached["elapsed_train_seconds"] if reached else None


def format_minutes(seconds: float) -> str:
    """``"41 min 12 s"``."""
    seconds = round(seconds)
    return f"{seconds // 60} min {seconds % 60} s"


def times(history: list[dict]) -> dict[str, str]:
    """``wall``: the epochs' wall time, training and evaluation (sum of ``seconds``); ``train``:
    training alone (the last ``elapsed_train_seconds``, the sum of the epochs' training times)."""
    return {"wall": format_minutes(sum(r["seconds"] for r in history)), "train": format_minutes(history[-1]["elapsed_train_seconds"])}


def headline(history: list[dict]) -> dict[str, str]:
    """A run's figures as the README and the notebook print them (percent with two decimals).

    Keys: ``final_acc``, ``final_loss``, ``best_epoch``, ``best_acc`` (best test accuracy, for
    information), ``wall_time``, ``train_time``; with a validation split ``best_val_epoch``,
    ``best_val_acc``, ``final_val_acc``; and once the test accuracy reached the original report's 69.26%,
    ``original_epoch`` and ``original_seconds`` (training seconds until then).
    """
    last, best = history[-1], best_epoch(history)
    figures = {
        "final_acc": f"{last['test_acc']:.2%}",
        "final_loss": f"{last['test_loss']:.4f}",
        "best_epoch": str(best["epoch"]),
        "best_acc": f"{best['test_acc']:.2%}",
        "wall_time": times(history)["wall"],
        "train_time": times(history)["train"],
    }
    if "val_acc" in last:
        best_val = best_epoch(history, "val_acc")
        figures.update(best_val_epoch=str(best_val["epoch"]), best_val_acc=f"{best_val['val_acc']:.2%}",
                       final_val_acc=f"{last['val_acc']:.2%}")
    reached = first_reaching(history, ORIGINAL_ACCURACY)
    if reached is not None:
        figures.update(original_epoch=str(reached["epoch"]), original_seconds=f"{reached['elapsed_train_seconds']:.0f} s")
    return figures


def spread(values: list[float]) -> dict[str, float]:
    """``mean``, ``std`` (sample standard deviation; 0 for one value), ``min`` and ``max``."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def seed_spread(histories: list[list[dict]], key: str = "test_acc") -> dict[str, float]:
    """:func:`spread` of the last epoch's ``key`` over runs that differ only in their seed."""
    return spread([h[-1][key] for h in histories])


def epoch_swing(history: list[dict], after: int = 10, key: str = "test_acc") -> dict[str, float]:
    """How much ``key`` moves from one epoch to the next after epoch ``after``: the :func:`spread`
    of its values there, plus ``mean_change`` and ``max_change`` (absolute, between consecutive epochs)."""
    values = [r[key] for r in history if r["epoch"] > after]
    changes = [abs(b - a) for a, b in zip(values, values[1:])]
    return {**spread(values), "mean_change": statistics.fmean(changes), "max_change": max(changes)}


def fixed_batch_accuracies(predictions: torch.Tensor, labels: torch.Tensor, batch_size: int = 100, seed: int = 0) -> torch.Tensor:
    """Accuracy of each of the ``N // batch_size`` fixed batches of one seeded order of the test
    set: float64 ``[N // batch_size]`` fractions. ``predictions``, ``labels``: int64 ``[N]``."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n = len(labels) // batch_size * batch_size
    correct = (predictions[order[:n]] == labels[order[:n]]).double()
    return correct.view(-1, batch_size).mean(1)


def last_batch_accuracy(predictions: torch.Tensor, labels: torch.Tensor, batch_size: int = 100) -> float:
    """Accuracy on the last ``batch_size`` images in stored order: what the original script
    reported each epoch, since its test loader did not shuffle and kept only the last batch's figure."""
    return (predictions[-batch_size:] == labels[-batch_size:]).double().mean().item()


def std_ratio(measured: tuple[float, ...], lab: tuple[float, ...]) -> list[tuple[float, float]]:
    """Per channel ``(measured std / lab std, its square)``: the normalized inputs' std and variance
    when the lab's std is used in place of the measured one."""
    return [(m / s, (m / s) ** 2) for m, s in zip(measured, lab)]
