"""CIFAR-10 in memory as uint8 tensors, from any common layout (Krizhevsky, 2009,
https://www.cs.toronto.edu/~kriz/cifar.html; file names, URL and MD5s: torchvision's CIFAR10).
The search rule, in ``root`` then its visible subfolders, by precedence over all of them: a folder F
or F/cifar-10-batches-py/ holding release files; an archive in F (:data:`ARCHIVES`), unpacked once
into F/cifar-10-batches-py/; an image tree F/train/<class>/, F/test/<class>/."""
import errno
import hashlib
import pickle
import tarfile
import urllib.request
import warnings
import zipfile
from http.client import HTTPException, IncompleteRead
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import check_integrity

from labcnn import DataError, WriteError
from labcnn.fileio import atomic_write, make_dir, reason, staged_dir, warn_once

# Label order of the release (batches.meta, label_names): index = label.
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
URL, ARCHIVE, ARCHIVE_MD5 = CIFAR10.url, CIFAR10.filename, CIFAR10.tgz_md5
BATCHES_DIR = CIFAR10.base_folder  # "cifar-10-batches-py"
# As browsers leave it: Safari's un-gzipped .tar, "... (1).tar.gz", Kaggle's archive.zip (a zip
ARCHIVES = ("cifar-10-python*.tar*", "*.zip")  # counts if it holds the release or an image tree)
TIMEOUT = 30  # seconds without a byte before a download is abandoned
ALIASES = {"plane": "airplane", "car": "automobile"}  # class folder names some mirrors use
LITTER = {"Thumbs.db", "desktop.ini", "__MACOSX", "$RECYCLE.BIN", "lost+found"}
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
# The only globals a batch needs: numpy's array rebuilding (numpy 1 and 2, pickle protocols 2-5).
PICKLE_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
    (f"numpy.{core}.{module}", name) for core in ("core", "_core") for module, name in
    (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))}


def load_cifar10(root, train: bool = True, download: bool = False, verify: bool = True,
                 url: str | None = None):
    """One split (search rule: see the module): uint8 ``[N, 3, 32, 32]`` RGB images, int64 ``[N]``
    labels in 0..9; DataError, or WriteError where unpacking is refused (message: what to do)."""
    root, url = Path(root).expanduser().resolve(), url or URL
    try:
        found = [layouts_in(folder) for folder in search_folders(root)]
        kind, path = next(((k, f[k]) for k in ("batches", "archive", "images") for f in found
                           if k in f), (None, None))
        if kind is None:
            if deeper := next((g for c in search_folders(root)[1:] for g in search_folders(c)[1:]
                               if layouts_in(g)), None):
                raise DataError(f"found CIFAR-10 at {deeper}, one level deeper than searched: "
                                f"pass --data-dir {deeper}")
            if not download:
                searched = ", ".join(map(str, search_folders(root)))
                raise DataError(f"no CIFAR-10 data found in {root} (searched: {searched}). Put "
                                f"{BATCHES_DIR}/, {ARCHIVE} or an image tree train/<class>/, test/"
                                f"<class>/ there, or pass --download (download=True) to get {url}")
            kind, path = "batches", unpacked(root, url, verify)
        if kind == "archive":
            kind, path = "batches", unpacked(path.parent, path, verify)
        if kind == "batches":
            return read_batches(path, train, verify)
        return read_tree(path / ("train" if train else "test"))
    except OSError as e:  # permissions, I/O errors: name the file instead of a traceback
        raise DataError(f"cannot read {e.filename or root} ({reason(e)})") from None


def visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name[0] != "." and p.name not in LITTER)


def search_folders(root: Path) -> list[Path]:  # root, then its visible subfolders
    return [root, *(p for p in visible(root) if p.is_dir())] if root.is_dir() else [root]


def missing_files(folder: Path) -> list[str]:  # torchvision's lists, read when called
    names = [n for n, _ in CIFAR10.train_list + CIFAR10.test_list] + [CIFAR10.meta["filename"]]
    return [name for name in names if not (folder / name).is_file()]


def layouts_in(folder: Path) -> dict[str, Path]:  # {kind: path} by the search rule
    found = {"batches": f for f in (folder / BATCHES_DIR, folder) if len(missing_files(f)) < 7}
    if archive := min((p for p in (visible(folder) if folder.is_dir() else []) if p.is_file()
                       and any(map(p.match, ARCHIVES)) and (p.suffix != ".zip" or zip_holds(p))),
                      key=lambda p: (p.name != ARCHIVE, p.name), default=None):
        found["archive"] = archive  # the release's own name first
    if (folder / "train").is_dir() or (folder / "test").is_dir():
        found["images"] = folder
    return found


def zip_holds(path: Path) -> bool:
    """False for a zip holding neither the release nor an image tree (True if unreadable)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any({BATCHES_DIR, "train", "test"} & set(PurePosixPath(n).parts[:-1])
                       for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return True


def unpacked(folder: Path, source: Path | str, verify: bool) -> Path:
    """folder/cifar-10-batches-py from the archive or URL ``source``, staged: whole or nothing."""
    zipped = str(source).endswith(".zip")
    tool = f"python -m zipfile -e {source} DIR" if zipped else f"tar -C DIR -xf {source}"
    advice = "download into a writable folder instead: pass it as root" if isinstance(
        source, str) else f"extract the archive elsewhere ({tool}) and pass that DIR"
    try:
        with staged_dir(make_dir(folder) / BATCHES_DIR) as scratch:
            if isinstance(source, str):
                fetch(source, archive := Path(scratch, ARCHIVE), folder)
                unpack(archive, Path(scratch), f"the file downloaded from {source}", verify)
                archive.unlink()
            else:  # the MD5 is the gzip archive's, as released; others' files are checked on read
                unpack(source, Path(scratch), str(source), verify and source.name.endswith(".gz"))
    except WriteError as e:
        raise WriteError(folder, e.reason, f"{advice} (command line: --data-dir DIR)") from None
    if len(missing_files(folder / BATCHES_DIR)) == 7:  # staged_dir kept a folder that was there
        raise DataError(f"cannot extract {source}: {folder / BATCHES_DIR} is in the way (a folder"
                        " without batch files); move or delete it")
    return folder / BATCHES_DIR


def fetch(url: str, path: Path, root: Path) -> None:
    """Stream ``url`` into ``path``; DataError after :data:`TIMEOUT` seconds without a byte."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response, open(path, "wb") as f:
            size, done = int(response.headers.get("Content-Length") or 0), 0
            while chunk := response.read(1 << 20):
                done += f.write(chunk)
            if done < size:
                raise ConnectionAbortedError(f"after {done:,} of {size:,} bytes")
    except (OSError, HTTPException, ValueError) as e:
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            raise WriteError(path.parent, reason(e)) from None
        e = e.reason if type(e) is urllib.request.URLError else e  # the socket's own error
        why = (f"timed out: nothing received for {TIMEOUT} s" if isinstance(e, TimeoutError) else
               f"the connection dropped ({reason(e)})" if isinstance(e, (
                   ConnectionResetError, ConnectionAbortedError, IncompleteRead)) else reason(e))
        raise DataError(f"could not download CIFAR-10 from {url} into {root} ({why}); without "
                        f"internet, copy {ARCHIVE} or an image tree there") from None


def unpack(archive: Path, folder: Path, shown: str, verify: bool) -> None:
    """The files under cifar-10-batches-py/ (at any depth) of a tar or zip into ``folder``."""
    def in_release(name: str) -> str | None:
        parts = PurePosixPath(name).parts
        return "/".join(parts[parts.index(BATCHES_DIR) + 1:]) if BATCHES_DIR in parts[:-1] else None

    def keep(member, dest):  # filtered as named, then as moved out of cifar-10-batches-py/
        name = in_release(tarfile.data_filter(member, dest).name)
        return name and tarfile.data_filter(member.replace(name=name, deep=False), dest)

    with open(archive, "rb") as f:
        head = f.read(512)
    if b"<html" in head.lower() or b"<!doctype html" in head.lower() or not head.startswith(
            (b"PK", b"\x1f\x8b", b"BZh", b"\xfd7zXZ")) and head[257:262] != b"ustar":
        raise DataError(f"{shown} is {'a web page (HTML)' if b'<' in head[:64] else 'no archive'}"
                        f" (it starts with {head[:16]!r}), not the CIFAR-10 archive")
    check_file(archive, ARCHIVE_MD5 if verify else None, shown)
    try:
        if head.startswith(b"PK"):  # zipfile drops ".." and leading "/" from names
            with zipfile.ZipFile(archive) as z:
                for info in (i for i in z.infolist() if in_release(i.filename) and not i.is_dir()):
                    info.filename = in_release(info.filename)
                    z.extract(info, folder)
        else:
            with tarfile.open(archive) as tar:
                tar.extractall(folder, filter=keep)  # TypeError on Pythons without filters
    except (getattr(tarfile, "FilterError", ()), TypeError) as e:
        raise DataError(f"{shown}: refusing a member ({e}); expected plain files inside the "
                        "archive's folder (and Python 3.10.12, 3.11.4 or later)") from None
    except Exception as e:  # tarfile, zipfile, gzip and zlib raise many types on damaged input
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            raise WriteError(folder, reason(e)) from None
        raise DataError(f"could not extract {shown} ({type(e).__name__}: {reason(e)}); it is "
                        "truncated or damaged") from None
    if missing := missing_files(folder):
        raise DataError(f"{shown} lacks {BATCHES_DIR}/{', '.join(missing)}: expected the CIFAR-10"
                        " python archive (an image tree: unpack it and pass its folder)")


def check_file(path: Path, md5: str | None, shown=None) -> None:
    """DataError if ``path`` is missing or, given ``md5``, has another MD5."""
    if not path.is_file():
        raise DataError(f"missing CIFAR-10 file {path}: expected the official release's "
                        f"{path.name}")
    if md5 and not check_integrity(str(path), md5):
        raise DataError(f"{shown or path} does not match the official CIFAR-10 release (MD5 {md5}, "
                        "per torchvision): truncated, damaged or re-packed. Download it again, or "
                        "pass --no-verify (verify=False).")


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Refuses every global outside :data:`PICKLE_GLOBALS` (numpy.testing's runstring runs code)."""
    def find_class(self, module, name):
        if (module, name) not in PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"unexpected global {module}.{name}")
        return super().find_class(module, name)


def read_pickle(path: Path) -> dict:
    """A batch file's dict, keys as text. DataError: not a readable pickle of a dict."""
    with open(path, "rb") as f:
        try:  # pickle raises many types on damaged input; anything but a dict lacks .items()
            entry = NumpyOnlyUnpickler(f, encoding="latin1").load()
            return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
        except Exception as e:
            raise DataError(f"{path} is not a readable CIFAR-10 pickle batch (a dict): "
                            f"{reason(e)}") from None


def read_batches(folder: Path, train: bool, verify: bool):
    """One split of a batches folder (see :func:`load_cifar10`); warns once without ``verify``."""
    if not verify:
        warn_once(f"loading {folder} without checking MD5s (verify=False)")
    batches, meta = CIFAR10.train_list if train else CIFAR10.test_list, folder / "batches.meta"
    for name, md5 in batches + [[meta.name, CIFAR10.meta["md5"]]]:
        check_file(folder / name, md5 if verify else None)
    names = read_pickle(meta).get("label_names", CLASSES)
    if not isinstance(names, (list, tuple)) or [
            str(n, "latin1") if isinstance(n, bytes) else n for n in names] != list(CLASSES):
        raise DataError(f"{meta}: label_names {names} are not CIFAR-10's {list(CLASSES)}")
    images, labels = [], []
    for path in (folder / name for name, _ in batches):
        entry = read_pickle(path)
        data, y = entry.get("data"), entry.get("labels", entry.get("fine_labels"))
        try:  # data: numpy uint8 [N, 3072], 1024 red then green then blue values, row-major
            y = torch.as_tensor(np.asarray(y, dtype=np.int64))
            ok = data.dtype == np.uint8 and data.shape[1:] == (3072,) and y.shape == (len(data),)
        except (AttributeError, TypeError, ValueError, OverflowError):
            ok = False
        if not ok or len(y) and not 0 <= y.min() <= y.max() < 10:
            raise DataError(f"{path}: expected 'data' uint8 [N, 3072] and 'labels' N integers in "
                            f"0..9, found keys {sorted(map(str, entry))}")
        images.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        labels.append(y)
    return torch.cat(images), torch.cat(labels)


def read_tree(split: Path):
    """An image tree's split, decoded once into .labcnn-<split>-<key>.pt (optional: may warn)."""
    folders = [p for p in visible(split) if p.is_dir()]
    names = [ALIASES.get(p.name, p.name) for p in folders]
    if not set(names) <= set(CLASSES) or len(set(names)) < len(names):
        raise DataError(f"{split}: class folders {[p.name for p in folders]} are not CIFAR-10's "
                        f"{list(CLASSES)}, one each")
    if missing := [c for c in CLASSES if c not in names]:
        raise DataError(f"{split}: missing class folders {missing} of {list(CLASSES)}")
    files, key = [], hashlib.sha1(b"2")  # cache version 2: 16-bit images scaled, not clipped
    for folder, name in sorted(zip(folders, names), key=lambda f: CLASSES.index(f[1])):
        if not (paths := visible(folder)):
            raise DataError(f"{folder} holds no images")
        for p in paths:
            if not p.is_file() or p.suffix.lower() not in (".png", ".jpg", ".jpeg"):
                raise DataError(f"unexpected {p}: class folders may hold only .png, .jpg images")
            st = p.stat()
            key.update(f"{name}/{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            files.append((p, CLASSES.index(name)))
    cache = split.parent / f".labcnn-{split.name}-{key.hexdigest()[:16]}.pt"
    if cache.is_file():
        try:
            saved = torch.load(cache, weights_only=True)
            return saved["images"], saved["labels"]
        except Exception as e:  # damaged or foreign: decode again
            warn_once(f"ignoring unreadable cache {cache} ({type(e).__name__})")
    images = torch.stack([decode(p) for p, _ in files])
    labels = torch.tensor([label for _, label in files], dtype=torch.int64)
    try:
        atomic_write(cache, lambda f: torch.save({"images": images, "labels": labels}, f))
        for old in set(split.parent.glob(f".labcnn-{split.name}-*.pt")) - {cache}:
            old.unlink(missing_ok=True)
    except (WriteError, OSError) as e:
        warn_once(f"could not write the decode cache {cache} "
                  f"({getattr(e, 'reason', None) or reason(e)}); the next load decodes again")
    return images, labels


def decode(path: Path) -> torch.Tensor:
    """A 32x32 PNG or JPEG (known by content) as uint8 ``[3, 32, 32]`` RGB; DataError naming it."""
    try:
        with Image.open(path, formats=("PNG", "JPEG")) as image:  # size read before the pixels
            size, pixels = image.size, image.size == (32, 32) and to_rgb(image)
    except Exception as e:  # Pillow raises several types on damaged files
        raise DataError(f"cannot decode image {path} ({type(e).__name__}: {reason(e)})") from None
    if size != (32, 32):
        raise DataError(f"{path} is {size[0]}x{size[1]} pixels, not 32x32")
    return torch.from_numpy(pixels).permute(2, 0, 1)


def to_rgb(image: Image.Image) -> np.ndarray:
    """uint8 ``[H, W, 3]``: ``convert("RGB")``, but wider gray scaled by 1/257 (not clipped)."""
    if image.mode.startswith("I"):  # "I;16", "I;16B", "I": Pillow's convert("RGB") clips them
        gray = (np.asarray(image).astype(np.int64).clip(0, 65535) + 128) // 257  # never k + 0.5
        return np.repeat(gray.astype(np.uint8)[:, :, None], 3, axis=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Palette images with Transparency...": dropped on purpose
        return np.array(image.convert("RGB"))  # a writable copy, as torch.from_numpy wants
