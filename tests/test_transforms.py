"""labcnn.transforms: normalization, the seeded subset and validation split, batched augmentation."""
import pytest
import torch
from synthetic import make_images

from labcnn.errors import ConfigError
from labcnn.transforms import (LAB_NORMALIZATION, Normalization, augment, channel_stats, cutout, epoch_generator, split_validation,
                               subset, training_batches)


def test_channel_stats_and_normalization():
    images = torch.stack([torch.full((3, 2, 2), 0, dtype=torch.uint8), torch.full((3, 2, 2), 255, dtype=torch.uint8)])
    mean, std = channel_stats(images)
    assert mean == pytest.approx((0.5,) * 3) and std == pytest.approx((0.5,) * 3)
    assert Normalization.measure(images) == Normalization((0.5,) * 3, (0.5,) * 3)
    x = LAB_NORMALIZATION(images)
    assert x.dtype == torch.float32
    assert x[1, 0, 0, 0].item() == pytest.approx((1 - LAB_NORMALIZATION.mean[0]) / LAB_NORMALIZATION.std[0])


def test_subset_is_seeded_and_checked():
    images, labels = make_images(3)
    a = subset(images, labels, 10, seed=1)
    b = subset(images, labels, 10, seed=1)
    assert torch.equal(a[1], b[1]) and len(a[1]) == 10
    with pytest.raises(ValueError, match="between 1 and 30"):
        subset(images, labels, 31)


def test_normalization_refuses_bad_statistics():
    for mean, std in [((0.5,) * 2, (0.2,) * 3), ((0.5,) * 3, (0.2, 0.0, 0.2)), ((float("nan"),) * 3, (0.2,) * 3)]:
        with pytest.raises(ConfigError, match="expected three finite numbers each, std > 0"):
            Normalization(mean, std)


def test_validation_split_is_seeded_disjoint_and_checked():
    images, labels = make_images(3)
    (train, train_labels), (val, val_labels) = split_validation(images, labels, 10, seed=0)
    assert len(train_labels) == 20 and len(val_labels) == 10
    rows = {tuple(x.flatten()[:64].tolist()) for x in torch.cat([train, val])}
    assert len(rows) == 30  # every image in exactly one part
    assert torch.equal(split_validation(images, labels, 10, seed=0)[1][1], val_labels)
    with pytest.raises(ConfigError, match="val_size 30 must be smaller than the 30 training images"):
        split_validation(images, labels, 30, seed=0)


def test_augment_crops_and_flips_like_torchvision():
    """Each output is a 32x32 window of the 4-pixel zero-padded image, maybe mirrored, and over a
    batch the windows and flips vary (an identity would fail)."""
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = augment(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    drawn = []
    for i in range(len(images)):
        found = [(r, c, flip) for r in range(9) for c in range(9) for flip in (False, True)
                 if torch.equal(out[i], padded[i, :, r : r + 32, c : c + 32].flip(2) if flip else padded[i, :, r : r + 32, c : c + 32])]
        assert found, f"image {i} is not a crop of its padded input"
        drawn.append(found[0])
    assert len({(r, c) for r, c, _ in drawn}) > 10 and 10 < sum(flip for _, _, flip in drawn) < 54
    assert sum((r, c) == (4, 4) and not flip for r, c, flip in drawn) < 5  # mostly not the identity


def test_training_batches_cover_the_epoch_once_in_a_seeded_order():
    images, labels = make_images(3)
    batches = list(training_batches(images, labels, 8, epoch_generator(0, 1), LAB_NORMALIZATION))
    assert [len(y) for _, y in batches] == [8, 8, 8, 6]
    assert sorted(torch.cat([y for _, y in batches]).tolist()) == sorted(labels.tolist())
    assert batches[0][0].dtype == torch.float32 and batches[0][0].is_contiguous(memory_format=torch.channels_last)
    again = list(training_batches(images, labels, 8, epoch_generator(0, 1), LAB_NORMALIZATION))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    other = torch.cat([y for _, y in training_batches(images, labels, 8, epoch_generator(0, 2), LAB_NORMALIZATION)])
    assert not torch.equal(other, torch.cat([y for _, y in batches]))  # another epoch, another order


def test_cutout_zeroes_one_square_per_image_clipped_at_the_border():
    x = torch.rand(200, 3, 32, 32) + 1  # no zero of its own
    out = cutout(x, 8, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.equal((out == 0).all(1), (out == 0).any(1))  # same pixels in every channel
    assert torch.equal(out[out != 0], x[out != 0])  # the rest untouched
    sizes = []
    for mask in (out[:, 0] == 0):
        rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
        assert mask.sum() == len(rows) * len(cols)  # one rectangle
        assert torch.equal(rows, torch.arange(rows[0], rows[-1] + 1)) and torch.equal(cols, torch.arange(cols[0], cols[-1] + 1))
        sizes.append((len(rows), len(cols)))
        assert all(n == 8 or (n < 8 and edge) for n, edge in ((len(rows), rows[0] == 0 or rows[-1] == 31),
                                                              (len(cols), cols[0] == 0 or cols[-1] == 31)))
    assert sum(s == (8, 8) for s in sizes) > 100 and any(s != (8, 8) for s in sizes)  # mostly whole, some clipped


def test_training_batches_with_cutout_keep_order_and_labels():
    images, labels = make_images(3)
    plain = list(training_batches(images, labels, 8, epoch_generator(0, 1), LAB_NORMALIZATION, True))
    cut = list(training_batches(images, labels, 8, epoch_generator(0, 1), LAB_NORMALIZATION, True, cutout_size=8))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(plain, cut))
    zeros = [(x == 0).all(1).sum((1, 2)) for x, _ in cut]
    assert all(((z >= 16) & (z <= 64)).all() for z in zeros)  # a square of 4x4 to 8x8 pixels per image
    assert cut[0][0].is_contiguous(memory_format=torch.channels_last)
