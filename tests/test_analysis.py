"""labcnn.analysis: the derived figures the README and the notebook print."""
import pytest
import torch

from labcnn import analysis


def history(accuracies):
    return [{"epoch": i + 1, "test_acc": a, "test_loss": 1 - a, "seconds": 10.0, "elapsed_train_seconds": 8.0 * (i + 1)}
            for i, a in enumerate(accuracies)]


def test_headline_and_times():
    h = analysis.headline(history([0.5, 0.7, 0.65]))
    assert (h["final_acc"], h["best_epoch"], h["original_epoch"], h["wall_time"], h["train_time"]) == ("65.00%", "2", "2", "0 min 30 s", "0 min 24 s")


def test_epoch_swing_and_seed_spread():
    swing = analysis.epoch_swing(history([0.1] * 10 + [0.60, 0.62, 0.59]), after=10)
    assert swing["min"] == 0.59 and swing["max"] == 0.62
    assert swing["max_change"] == pytest.approx(0.03) and swing["mean_change"] == pytest.approx(0.025)
    spread = analysis.seed_spread([history([0.6]), history([0.62]), history([0.64])])
    assert spread["mean"] == pytest.approx(0.62) and spread["std"] == pytest.approx(0.02)


def test_fixed_batches_and_the_last_stored_batch():
    labels = torch.arange(1000) % 10
    predictions = labels.clone()
    predictions[-100:] = (predictions[-100:] + 1) % 10  # the last 100 are all wrong
    accuracies = analysis.fixed_batch_accuracies(predictions, labels, batch_size=100, seed=0)
    assert accuracies.shape == (10,) and accuracies.mean().item() == pytest.approx(0.9)
    assert accuracies.min() < 1 and accuracies.max() <= 1  # the wrong images are spread over the batches
    assert analysis.last_batch_accuracy(predictions, labels) == 0.0


def test_std_ratio():
    assert analysis.std_ratio((0.25,), (0.2,)) == [(pytest.approx(1.25), pytest.approx(1.5625))]
