"""CIFAR-10 in memory as uint8 tensors (Krizhevsky, 2009; names, URL, MD5s: torchvision's CIFAR10)
from release files, their archive or an image tree: the search rule is README.md's (Data)."""

import errno
import hashlib
import pickle
import tarfile
import urllib.request
import zipfile
from http.client import HTTPException, IncompleteRead
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image

from labcnn import DataError, WriteError
from labcnn.fileio import atomic_write, broken_link, make_dir, reason, staged_dir, warn_once

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
URL, ARCHIVE = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz"
ARCHIVE_MD5, BATCHES_DIR = "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py"
FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
KINDS = ("batches", "archive", "images")  # the layouts, by precedence
ARCHIVES = ("cifar-10-python*.tar*", "*.zip")  # as browsers leave it (.tar, " (1)"); Kaggle's zip
TIMEOUT = 30  # seconds without a byte before a download is abandoned
ALIASES = {"plane": "airplane", "car": "automobile"}  # class folder names some mirrors use
LITTER = {"Thumbs.db", "desktop.ini", "__MACOSX", "$RECYCLE.BIN", "lost+found"}
MAGIC = (b"PK", b"\x1f\x8b", b"BZh", b"\xfd7zXZ")  # zip, gzip, bzip2, xz; a tar: "ustar" at 257
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
PICKLE_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
    (f"numpy.{core}.{module}", name)
    for core in ("core", "_core")
    for module, name in (
        ("multiarray", "_reconstruct"),
        ("multiarray", "scalar"),
        ("numeric", "_frombuffer"),
    )
}


def load_cifar10(root, train=True, download=False, verify=True, url: str | None = None):
    """One split: uint8 ``[N, 3, 32, 32]`` RGB, int64 ``[N]`` labels; DataError, WriteError."""
    root, url = Path(root).expanduser().absolute(), url or URL
    try:
        if no_broken_link(root).exists() and not root.is_dir():
            raise DataError(not_a_folder(root))
        folders = [root, *(p for p in visible(root) if p.is_dir())] if root.is_dir() else [root]
        found = [hit for folder in folders for hit in layouts_in(folder)]
        kind, path = min(found, key=lambda hit: KINDS.index(hit[0]), default=(None, None))
        if kind is None:
            path = search_failed(root, folders, download, url, verify)
        elif kind == "archive":
            path = unpacked(path.parent, path, verify)
        if kind == "images":
            return read_tree(path / ("train" if train else "test"))
        return read_batches(path, train, verify)
    except OSError as e:  # permissions, I/O errors: name the file instead of a traceback
        raise DataError(f"cannot read {e.filename or root} ({reason(e)})") from None


def not_a_folder(root: Path) -> str:
    """What ``root``, a file, is, and what to pass as the data folder instead."""
    what = "a file"
    if root.name in FILES:
        what = "a CIFAR-10 batch file"
    elif root.suffix in (".gz", ".tgz", ".tar", ".zip", ".bz2", ".xz"):
        what = "an archive"
    return (
        f"{root} is {what}, not a folder: pass the folder that holds it, --data-dir {root.parent}"
    )


def search_failed(root: Path, folders: list[Path], download: bool, url: str, verify: bool) -> Path:
    """Where no layout was found: download if asked, else a DataError saying what ``root`` is."""
    deeper = [g for f in folders[1:] for g in visible(f) if g.is_dir() and layouts_in(g)]
    if deeper:
        raise DataError(
            f"found CIFAR-10 at {deeper[0]}, one level deeper than searched: "
            f"pass --data-dir {deeper[0]}"
        )
    if download:
        return unpacked(root, url, verify)
    if {p.name for p in folders[1:]} & {*CLASSES, *ALIASES}:
        raise DataError(
            f"{root} is a folder of class folders, one split of an image tree: pass the folder "
            f"that holds train/ and test/, --data-dir {root.parent}"
        )
    raise DataError(
        f"no CIFAR-10 data found in {root} (searched: {', '.join(map(str, folders))}). "
        f"Put {BATCHES_DIR}/, {ARCHIVE} or an image tree train/<class>/, test/<class>/ there, "
        f"or pass --download (download=True) to get {url}"
    )


def no_broken_link(path: Path) -> Path:
    """``path``; DataError naming it as a broken link to its target, if it is one."""
    if broken_link(path):
        raise DataError(f"{path} is {broken_link(path)}: fix or remove the link")
    return path


def visible(folder: Path) -> list[Path]:
    """The entries of ``folder``, sorted, without hidden files and system litter."""
    return sorted(p for p in folder.iterdir() if p.name[0] != "." and p.name not in LITTER)


def missing_files(folder: Path) -> list[str]:
    """The release's FILES that ``folder`` lacks (a link counts as there: it is checked on read)."""
    return [n for n in FILES if not ((folder / n).is_file() or (folder / n).is_symlink())]


def layouts_in(folder: Path) -> list[tuple[str, Path]]:
    """``(kind, path)`` of each layout in ``folder``, by README.md's search rule."""
    found = [("batches", f) for f in (folder, folder / BATCHES_DIR) if len(missing_files(f)) < 7]
    archives = [
        p
        for p in (visible(folder) if folder.is_dir() else [])
        if p.is_file() and any(map(p.match, ARCHIVES)) and (p.suffix != ".zip" or zip_holds(p))
    ]
    found += [("archive", p) for p in sorted(archives, key=lambda p: p.name != ARCHIVE)]
    if (folder / "train").is_dir() or (folder / "test").is_dir():
        found.append(("images", folder))
    return found


def zip_holds(path: Path) -> bool:
    """Whether a zip holds the release or an image tree (True if unreadable: checked later)."""
    try:
        with zipfile.ZipFile(path) as z:
            folders = {part for name in z.namelist() for part in PurePosixPath(name).parts[:-1]}
    except (zipfile.BadZipFile, OSError):
        return True
    return bool(folders & {BATCHES_DIR, "train", "test"})


def unpacked(folder: Path, source: Path | str, verify: bool) -> Path:
    """Extract ``source`` (an archive, or a URL to download) into ``folder/cifar-10-batches-py``,
    staged: the folder appears whole or not at all. Returns it; DataError, WriteError."""
    try:
        with staged_dir(make_dir(folder) / BATCHES_DIR) as scratch:
            if isinstance(source, str):
                fetch(source, scratch / ARCHIVE, folder)
                unpack(scratch / ARCHIVE, scratch, f"the file downloaded from {source}", verify)
                (scratch / ARCHIVE).unlink()
            else:  # the MD5 is the gzip archive's, as released; others' files are checked on read
                unpack(source, scratch, str(source), verify and source.name.endswith(".gz"))
    except WriteError as e:
        advice = "download into a writable folder instead: pass it as root"
        if isinstance(source, Path):
            tool = "python -m zipfile -e {} DIR" if source.suffix == ".zip" else "tar -C DIR -xf {}"
            advice = f"extract the archive elsewhere ({tool.format(source)}) and pass that DIR"
        raise WriteError(folder, e.reason, f"{advice} (command line: --data-dir DIR)") from None
    if len(missing_files(folder / BATCHES_DIR)) == 7:  # staged_dir kept a folder that was there
        raise DataError(
            f"cannot extract {source}: {folder / BATCHES_DIR} is in the way (a folder"
            " without batch files); move or delete it"
        )
    return folder / BATCHES_DIR


def fetch(url: str, path: Path, root: Path) -> None:
    """Download ``url`` to ``path``; DataError naming why, after TIMEOUT s without a byte."""
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            body = response.read()  # IncompleteRead if the connection drops
    except (OSError, HTTPException, ValueError) as e:
        e = e.reason if type(e) is urllib.request.URLError else e  # the socket's own error
        dropped = isinstance(e, (ConnectionResetError, ConnectionAbortedError, IncompleteRead))
        why = f"the connection dropped ({reason(e)})" if dropped else reason(e)
        if isinstance(e, TimeoutError):
            why = f"timed out: nothing received for {TIMEOUT} s"
        raise DataError(
            f"could not download CIFAR-10 from {url} into {root} ({why}); without "
            f"internet, copy {ARCHIVE} or an image tree there"
        ) from None
    atomic_write(path, lambda f: f.write(body))


def unpack(archive: Path, folder: Path, shown: str, verify: bool) -> None:
    """Extract the release's files from ``archive`` (tar or zip) into ``folder``, refusing links
    and paths outside it; ``shown`` names the archive in errors. DataError, WriteError."""

    def in_release(name: str) -> str | None:
        parts = PurePosixPath(name).parts
        return (
            "/".join(parts[parts.index(BATCHES_DIR) + 1 :]) if BATCHES_DIR in parts[:-1] else None
        )

    def keep(member, dest):  # filtered as named, then as moved out of cifar-10-batches-py/
        name = in_release(tarfile.data_filter(member, dest).name)
        return name and tarfile.data_filter(member.replace(name=name, deep=False), dest)

    with open(archive, "rb") as f:
        head = f.read(512)
    if not (head.startswith(MAGIC) or head[257:262] == b"ustar"):
        what = "a web page (HTML)" if b"<" in head[:64] else "no archive"
        raise DataError(
            f"{shown} is {what} (it starts with {head[:16]!r}), not the CIFAR-10 archive"
        )
    check_file(archive, ARCHIVE_MD5 if verify else None, shown)
    try:
        if head.startswith(b"PK"):  # zipfile drops ".." and leading "/" from names
            with zipfile.ZipFile(archive) as z:
                for info in [i for i in z.infolist() if not i.is_dir() and in_release(i.filename)]:
                    info.filename = in_release(info.filename)
                    z.extract(info, folder)
        else:
            with tarfile.open(archive) as tar:
                tar.extractall(folder, filter=keep)  # TypeError on Pythons without filters
    except (getattr(tarfile, "FilterError", ()), TypeError) as e:
        raise DataError(
            f"{shown}: refusing a member ({e}); expected plain files inside the "
            "archive's folder (and Python 3.10.12, 3.11.4 or later)"
        ) from None
    except Exception as e:  # tarfile, zipfile, gzip and zlib raise many types on damaged input
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS:
            raise WriteError(folder, reason(e)) from None
        raise DataError(
            f"could not extract {shown} ({type(e).__name__}: {reason(e)}); it is "
            "truncated or damaged"
        ) from None
    if missing := missing_files(folder):
        raise DataError(
            f"{shown} lacks {BATCHES_DIR}/{', '.join(missing)}: expected the CIFAR-10"
            " python archive (an image tree: unpack it and pass its folder)"
        )


def check_file(path: Path, md5: str | None, shown=None) -> None:
    """DataError unless ``path`` is a file whose MD5 is ``md5`` (None: not checked)."""
    if not no_broken_link(path).is_file():
        raise DataError(f"missing CIFAR-10 file {path}: expected the release's {path.name}")
    if md5 and hashlib.md5(path.read_bytes()).hexdigest() != md5:
        raise DataError(
            f"{shown or path} does not match the official CIFAR-10 release (MD5 {md5}):"
            " damaged or re-packed: get it again, or pass --no-verify (verify=False)."
        )


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays (PICKLE_GLOBALS) and nothing else: no code runs."""

    def find_class(self, module, name):
        """The global ``module.name`` if numpy's array rebuilding needs it; else an error."""
        if (module, name) not in PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"unexpected global {module}.{name}")
        return super().find_class(module, name)


def read_pickle(path: Path) -> dict:
    """A pickled batch as a dict with text keys; DataError unless it is one."""
    with open(path, "rb") as f:
        try:  # pickle raises many types on damaged input; anything but a dict lacks .items()
            entry = NumpyOnlyUnpickler(f, encoding="latin1").load()
            return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
        except Exception as e:
            raise DataError(
                f"{path} is not a readable CIFAR-10 pickle batch (a dict): {reason(e)}"
            ) from None


def read_batches(folder: Path, train: bool, verify: bool):
    """One split of the python release in ``folder`` (MD5s checked if ``verify``; else one
    warning): uint8 ``[N, 3, 32, 32]``, int64 ``[N]``. DataError."""
    from torchvision.datasets import CIFAR10  # here: torchvision takes seconds to import

    if not verify:
        warn_once(f"loading {folder} without checking MD5s (verify=False)")
    batches, meta = CIFAR10.train_list if train else CIFAR10.test_list, folder / "batches.meta"
    for name, md5 in batches + [[meta.name, CIFAR10.meta["md5"]]]:
        check_file(folder / name, md5 if verify else None)
    names = read_pickle(meta).get("label_names", CLASSES)
    if not isinstance(names, (list, tuple)) or [
        str(n, "latin1") if isinstance(n, bytes) else n for n in names
    ] != list(CLASSES):
        raise DataError(f"{meta}: label_names {names} are not CIFAR-10's {list(CLASSES)}")
    images, labels = [], []
    for path in (folder / name for name, _ in batches):
        entry = read_pickle(path)
        data, y = entry.get("data"), entry.get("labels", entry.get("fine_labels"))
        try:  # data: numpy uint8 [N, 3072], 1024 red then green then blue values, row-major
            y = np.asarray(y, dtype=np.int64)
            ok = data.dtype == np.uint8 and data.shape[1:] == (3072,) and y.shape == (len(data),)
        except (AttributeError, TypeError, ValueError, OverflowError):
            ok = False
        if not ok or not np.isin(y, np.arange(10)).all():
            raise DataError(
                f"{path}: expected 'data' uint8 [N, 3072] and 'labels' N integers in "
                f"0..9, found keys {sorted(map(str, entry))}"
            )
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(y)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


def read_tree(split: Path):
    """One split of an image tree, ``split/<class>/*.png|jpg``: uint8 ``[N, 3, 32, 32]``, int64
    ``[N]``. Decoded once into the cache ``.labcnn-<split>-<key>.pt`` beside it (a warning if
    it cannot be written); the key follows names, sizes and times. DataError."""
    folders = [no_broken_link(p) for p in visible(split) if p.is_dir() or p.is_symlink()]
    by_class = {ALIASES.get(p.name, p.name): p for p in folders}
    if len(by_class) < len(folders) or not set(by_class) <= set(CLASSES):
        raise DataError(
            f"{split}: class folders {[p.name for p in folders]} are not CIFAR-10's "
            f"{list(CLASSES)}, one each"
        )
    if missing := [c for c in CLASSES if c not in by_class]:
        raise DataError(f"{split}: missing class folders {missing} of {list(CLASSES)}")
    files, key = [], hashlib.sha1(b"2")  # cache version 2: 16-bit images scaled, not clipped
    for label, name in enumerate(CLASSES):
        if not visible(by_class[name]):
            raise DataError(f"{by_class[name]} holds no images")
        for p in map(no_broken_link, visible(by_class[name])):
            if not p.is_file() or p.suffix.lower() not in (".png", ".jpg", ".jpeg"):
                raise DataError(f"unexpected {p}: class folders may hold only .png, .jpg images")
            st = p.stat()
            key.update(f"{name}/{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            files.append((p, label))
    cache = split.parent / f".labcnn-{split.name}-{key.hexdigest()[:16]}.pt"
    if cache.is_file():
        try:
            saved = torch.load(cache, weights_only=True)
            return saved["images"], saved["labels"]
        except Exception as e:  # damaged or foreign: decode again
            warn_once(f"ignoring unreadable cache {cache} ({type(e).__name__})")
    images = torch.stack([decode(p) for p, _ in files])
    labels = torch.tensor([label for _, label in files])
    try:
        atomic_write(cache, lambda f: torch.save({"images": images, "labels": labels}, f))
        for old in set(split.parent.glob(f".labcnn-{split.name}-*.pt")) - {cache}:
            old.unlink(missing_ok=True)
    except (WriteError, OSError) as e:
        why = e.reason if isinstance(e, WriteError) else reason(e)
        warn_once(f"could not write the decode cache {cache} ({why}); the next load decodes again")
    return images, labels


def decode(path: Path) -> torch.Tensor:
    """A 32x32 PNG or JPEG as uint8 ``[3, 32, 32]`` RGB; DataError naming the file."""
    try:
        with Image.open(path, formats=("PNG", "JPEG")) as image:
            if image.size == (32, 32):  # known before the pixels are decoded
                return torch.from_numpy(to_rgb(image)).permute(2, 0, 1)
    except Exception as e:  # Pillow raises several types on damaged files
        raise DataError(f"cannot decode image {path} ({type(e).__name__}: {reason(e)})") from None
    raise DataError(f"{path} is {image.width}x{image.height} pixels, not 32x32")


def to_rgb(image: Image.Image) -> np.ndarray:
    """``image`` as uint8 ``[H, W, 3]`` RGB; 16-bit grey is scaled to 8 bits, not clipped."""
    if image.mode.startswith("I"):  # "I;16", "I;16B", "I": Pillow's convert("RGB") clips them
        gray = (np.asarray(image).astype(np.int64).clip(0, 65535) + 128) // 257  # never k + 0.5
        return np.repeat(gray.astype(np.uint8)[:, :, None], 3, axis=2)
    return np.array(image.convert("RGBA").convert("RGB"))  # via RGBA: no palette warning
