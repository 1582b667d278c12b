"""Image-folder trees (labcnn.image_tree): class folders, the decode cache, every image mode."""
import random
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic import assert_well_formed, corrupt, load, make_dataset, make_images, write_png, write_tree

from labcnn import image_tree
from labcnn.data import CLASSES
from labcnn.errors import DataError


def test_image_tree_cache_is_used_and_refreshed(tmp_path, monkeypatch):
    train, _ = make_dataset(tmp_path, "tree")
    load(tmp_path)
    caches = list(tmp_path.glob(".labcnn-train-*.pt"))
    assert len(caches) == 1
    monkeypatch.setattr(image_tree, "decode", lambda p: pytest.fail("decoded although cached"))
    assert torch.equal(load(tmp_path)[0], train[0])
    monkeypatch.undo()
    changed = train[0][0].clone()
    changed[:] = 7
    write_png(changed, tmp_path / "train" / "airplane" / "0000.png")
    images, _ = load(tmp_path)
    assert torch.equal(images[0], changed)
    assert list(tmp_path.glob(".labcnn-train-*.pt")) != caches and len(list(tmp_path.glob(".labcnn-train-*.pt"))) == 1
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".labcnn-")) == ["test", "train"]  # no temp files


def test_image_tree_aliases_and_litter(tmp_path):
    names = ["plane", "car", *CLASSES[2:]]
    train, test = make_images(2), make_images(1, seed=1)
    write_tree(tmp_path, train, test, names=names)
    (tmp_path / "train" / "cat" / ".DS_Store").write_bytes(b"x")
    (tmp_path / "train" / "__MACOSX").mkdir()
    (tmp_path / "train" / "cat" / "Thumbs.db").write_bytes(b"x")
    images, labels = load(tmp_path)
    assert torch.equal(labels, train[1]) and torch.equal(images, train[0])


def test_image_tree_ignores_hidden_files_folders_and_litter(tmp_path):
    train, test = make_images(2), make_images(1, seed=1)
    write_tree(tmp_path, train, test)
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()  # would be an 11th class folder
    (tmp_path / "train" / "lost+found").mkdir()
    (tmp_path / "train" / "cat" / "._0000.png").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # would not decode
    (tmp_path / "train" / "cat" / "desktop.ini").write_text("[.ShellClassInfo]")  # not an image
    (tmp_path / "train" / "dog" / ".thumbnails").mkdir()
    images, labels = load(tmp_path)
    assert torch.equal(images, train[0]) and torch.equal(labels, train[1])


def alias_beside_name(root):
    (root / "test" / "airplane").rename(root / "test" / "plane")
    (root / "test" / "airplane").mkdir()


TREE_FAULTS = {
    "missing class": (lambda r: shutil.rmtree(r / "test" / "frog"), r"test: missing class folders \['frog'\]; expected all of \['airplane'"),
    "missing split": (lambda r: shutil.rmtree(r / "test"), r"missing folder .*test: expected train/<class>/ and test/<class>/"),
    "empty class": (lambda r: (r / "test" / "ship" / "0000.png").unlink(), r"test/ship holds no images"),
    "alias and name": (alias_beside_name, r"test: both airplane/ and plane/ name the class airplane"),
    "capitalised": (lambda r: (r / "test" / "cat").rename(r / "test" / "Cat"), r"test: class folders \['Cat', 'airplane'.*are not CIFAR-10's \['airplane'"),
    "wrong names": (lambda r: [(r / "test" / c).rename(r / "test" / f"class{i}") for i, c in enumerate(CLASSES)], r"class folders \['class0'.*are not CIFAR-10's \['airplane'"),
    "not an image": (lambda r: (r / "test" / "cat" / "notes.txt").write_text("x"), r"unexpected .*test/cat/notes.txt: class folders may hold only"),
    "wrong size": (lambda r: write_png(torch.zeros(3, 16, 24, dtype=torch.uint8), r / "test" / "cat" / "0000.png"), r"test/cat/0000.png is 24x16 pixels; CIFAR-10 images are 32x32"),
    "not decodable": (lambda r: (r / "test" / "cat" / "0000.png").write_bytes(b"GIF89a" + bytes(100)), r"cannot decode image .*test/cat/0000.png \(UnidentifiedImageError"),
}


@pytest.mark.parametrize("fault", TREE_FAULTS)
def test_image_tree_faults_are_named(tmp_path, fault):
    make_fault, message = TREE_FAULTS[fault]
    write_tree(tmp_path, make_images(1), make_images(1, seed=1))
    make_fault(tmp_path)
    with pytest.raises(DataError, match=message):
        load(tmp_path, train=False)


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_fuzzed_image_file_loads_or_is_a_data_error(tmp_path, suffix):
    write_tree(tmp_path, make_images(1), make_images(1, seed=1))
    path = tmp_path / "train" / "cat" / f"0000{suffix}"
    (tmp_path / "train" / "cat" / "0000.png").unlink()
    Image.fromarray(make_images(1)[0][3].permute(1, 2, 0).numpy()).save(path)
    good = path.read_bytes()
    rng = random.Random(1)
    rejected = 0
    for _ in range(40):
        path.write_bytes(corrupt(good, rng))
        for cache in tmp_path.glob(".labcnn-*"):
            cache.unlink()  # decode every time: a flipped byte keeps the size, maybe the mtime too
        try:
            assert_well_formed(*load(tmp_path))
        except DataError as e:
            assert str(path) in str(e) and "\n" not in str(e)
            rejected += 1
    assert rejected > 5


# ---------------------------------------------------------------- image modes
# Each case: (Pillow image in that mode, the RGB pixels expected, uint8 [32, 32, 3]), computed
# here from the values written, not by Pillow's conversion.

GRID = np.arange(32 * 32).reshape(32, 32)


def gray(values):
    return np.repeat(np.asarray(values, dtype=np.uint8)[:, :, None], 3, axis=2)


def mode_1():
    bits = (GRID * 7919) % 3 == 0
    return Image.fromarray(bits), gray(bits * 255)


def mode_l():
    values = (GRID % 256).astype(np.uint8)
    return Image.fromarray(values), gray(values)


def mode_la():
    values = (GRID % 256).astype(np.uint8)
    alpha = ((GRID * 37) % 256).astype(np.uint8)  # dropped, not composited onto any background
    return Image.fromarray(np.stack([values, alpha], axis=2), mode="LA"), gray(values)


def palette_image(transparency):
    palette = np.random.default_rng(0).integers(0, 256, (256, 3), dtype=np.uint8)
    index = ((GRID * 31) % 256).astype(np.uint8)
    image = Image.fromarray(index, mode="P")
    image.putpalette(palette.tobytes())
    image.info["transparency"] = transparency
    return image, palette[index]


def mode_rgba():
    rgb = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    alpha = ((GRID * 13) % 256).astype(np.uint8)
    return Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA"), rgb


SIXTEEN_BIT = np.concatenate([[0, 128, 129, 385, 386, 32767, 32768, 65406, 65407, 65535], np.arange(1014) * 64])


def sixteen_bit(mode):
    wide = SIXTEEN_BIT.reshape(32, 32)
    expected = gray(np.floor(wide / 257 + 0.5))  # round to nearest; v / 257 is never k + 0.5
    if mode == "I":
        return Image.fromarray(wide.astype(np.int32), mode="I"), expected
    return Image.frombytes(mode, (32, 32), wide.astype("<u2" if mode == "I;16" else ">u2").tobytes()), expected


MODES = {
    "1": mode_1, "L": mode_l, "LA": mode_la, "RGBA": mode_rgba,
    "P with a transparent index": lambda: palette_image(3),
    "P with an alpha table": lambda: palette_image(bytes(range(0, 256, 2)) * 2),
    "I;16": lambda: sixteen_bit("I;16"),
}


@pytest.mark.parametrize("mode", MODES)
def test_every_png_mode_loads_as_rgb(tmp_path, mode):
    image, expected = MODES[mode]()
    path = tmp_path / "image.png"
    image.save(path)
    with Image.open(path) as reopened:
        assert reopened.mode == mode.split()[0]  # the PNG keeps the mode under test
    assert image_tree.decode(path).permute(1, 2, 0).numpy().tolist() == expected.tolist()


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_sixteen_bit_gray_is_scaled_not_clipped(mode):
    image, expected = sixteen_bit(mode)
    assert image.mode == mode
    assert image_tree.to_rgb(image).tolist() == expected.tolist()


def test_sixteen_bit_png_in_a_tree_is_not_white(tmp_path):
    train, test = make_images(1), make_images(1, seed=1)
    write_tree(tmp_path, train, test)
    image, expected = sixteen_bit("I;16")
    image.save(tmp_path / "train" / "cat" / "0000.png")
    images, _ = load(tmp_path)
    assert images[3].permute(1, 2, 0).numpy().tolist() == expected.tolist()


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
@pytest.mark.parametrize("suffix", [".jpg", ".jpeg", ".png"])
def test_jpeg_of_every_mode_decodes_by_content(tmp_path, mode, suffix):
    """JPEG is lossy: the expected pixels are Pillow's ``convert("RGB")`` of the decoded file."""
    rgb = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    path = tmp_path / f"image{suffix}"
    Image.fromarray(rgb).convert(mode).save(path, format="JPEG", quality=95)
    with Image.open(path) as image:
        assert (image.format, image.mode) == ("JPEG", mode)
        expected = np.asarray(image.convert("RGB"))
        if mode == "CMYK":  # Pillow's CMYK -> RGB: each of C, M, Y scaled by (255 - K) / 255
            c, k = np.asarray(image).astype(np.int64)[:, :, :3], np.asarray(image).astype(np.int64)[:, :, 3:]
            assert np.abs((255 - c) * (255 - k) / 255 - expected).max() <= 1
    assert image_tree.decode(path).permute(1, 2, 0).numpy().tolist() == expected.tolist()


def test_palette_transparency_gives_no_warning(tmp_path):
    image, _ = palette_image(bytes(range(0, 256, 2)) * 2)
    image.save(tmp_path / "image.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image_tree.decode(tmp_path / "image.png")
