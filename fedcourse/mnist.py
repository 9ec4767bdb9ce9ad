"""MNIST for the course: an IDX reader, the embedded 10,000-digit sample and the full download.

Lessons must run offline and grade deterministically, so the default data is a sample shipped
inside the package (the original MNIST test-set files, unchanged), split into train and test
parts by a fixed rule that uses no random numbers. The full 60k/10k MNIST is an explicit
opt-in (``source="full"``): downloaded once, verified by MD5, cached. Neither source ever
replaces the other silently: a failure is an error that says what to do.

There is no CPU wheel of torchvision, so the IDX files are read here directly.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import os
import struct
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = [
    "MNIST_MEAN",
    "MNIST_STD",
    "MNIST_FILES",
    "SPLIT_FILES",
    "SPLITS",
    "SOURCES",
    "SAMPLE_SPLIT_RULE",
    "DEFAULT_MIRROR",
    "DATA_DIR_ENV",
    "MIRROR_ENV",
    "MNISTDataError",
    "MNISTChecksumError",
    "MNISTDownloadError",
    "MNISTMissingError",
    "read_idx",
    "parse_idx",
    "md5_of",
    "sample_data_dir",
    "sample_arrays",
    "sample_split_indices",
    "mnist_cache_dir",
    "ensure_mnist_file",
    "load_mnist",
    "class_counts",
]

# Mean and standard deviation of the pixel values (scaled to [0, 1]) over the 60,000 MNIST
# training images. Standardising with them is the convention of most MNIST code, so the
# course's numbers are comparable with what students find elsewhere.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081

# The four canonical files and their MD5 checksums. The checksums are what makes a cached or
# downloaded file trustworthy: anything that does not match is refused.
MNIST_FILES: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}

# (images file, labels file) for each split of the full data set.
SPLIT_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

SPLITS = ("train", "test")
SOURCES = ("sample", "full")

DEFAULT_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"
DATA_DIR_ENV = "FEDCOURSE_DATA_DIR"
MIRROR_ENV = "FEDCOURSE_MNIST_MIRROR"
DEFAULT_CACHE_DIR = Path("~/.cache/fedcourse/mnist")
DOWNLOAD_TIMEOUT_S = 60.0

SAMPLE_SPLIT_RULE = (
    "The embedded sample (the 10,000 MNIST test-set digits) is split once, without random "
    "numbers: within each class, taking the examples in file order, every 5th one "
    "(rank % 5 == 0, i.e. the 1st, 6th, 11th, ...) goes to the test part and the others to "
    "the training part. That gives 7,997 training and 2,003 test digits with the class "
    "proportions of the file preserved, and the split can never change with a library "
    "version. Both parts keep file order."
)

_SAMPLE_TEST_EVERY = 5
_IMAGE_SHAPE = (28, 28)

# IDX type codes (third byte of the magic number) -> element type, stored big-endian.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class MNISTDataError(RuntimeError):
    """Base class of the errors that say MNIST data is unavailable or cannot be trusted."""


class MNISTChecksumError(MNISTDataError):
    """A file's MD5 differs from the canonical one (truncated, corrupted or the wrong file)."""


class MNISTDownloadError(MNISTDataError):
    """Downloading a file failed (no network, mirror unreachable, HTTP error)."""


class MNISTMissingError(MNISTDataError):
    """A file is not in the cache and downloading was not allowed."""


class _Readable(Protocol):
    """What the sample loader needs from a location: ``pathlib.Path`` and package resources
    (``importlib.resources.abc.Traversable``) both qualify, so an installed package, even a
    zipped one, can read its data."""

    def __truediv__(self, child: str) -> "_Readable": ...

    def read_bytes(self) -> bytes: ...


# ---------------------------------------------------------------------------------------------
# IDX format
# ---------------------------------------------------------------------------------------------


def parse_idx(buffer: bytes, name: str = "<bytes>") -> np.ndarray:
    """Decode the (already decompressed) bytes of an IDX file into an array.

    The header is two zero bytes, a type code, the number of dimensions and then one
    big-endian uint32 per dimension. Every part is checked, and so is the payload length,
    because a truncated download would otherwise turn into a silently wrong array.
    ``name`` only serves the error messages.
    """
    if len(buffer) < 4:
        raise ValueError(f"{name}: too short to be an IDX file ({len(buffer)} bytes)")
    zero0, zero1, type_code, ndim = buffer[0], buffer[1], buffer[2], buffer[3]
    if zero0 != 0 or zero1 != 0:
        raise ValueError(
            f"{name}: not an IDX file (magic number starts with bytes {zero0:#04x} {zero1:#04x},"
            " expected 0x00 0x00)"
        )
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{name}: unknown IDX element type code {type_code:#04x}")
    if ndim == 0:
        raise ValueError(f"{name}: IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(buffer) < header_len:
        raise ValueError(
            f"{name}: truncated IDX header ({len(buffer)} bytes, {header_len} needed for"
            f" {ndim} dimensions)"
        )
    dims = struct.unpack(f">{ndim}I", buffer[4:header_len])
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(buffer) - header_len
    if actual < expected:
        raise ValueError(
            f"{name}: truncated IDX file: header says {dims} ({expected} bytes of data) but only"
            f" {actual} bytes follow"
        )
    if actual > expected:
        raise ValueError(
            f"{name}: malformed IDX file: {actual - expected} unexpected bytes after the"
            f" {expected} bytes of data the header {dims} describes"
        )
    data = np.frombuffer(buffer, dtype=dtype, offset=header_len).reshape(dims)
    # A native-endian copy: writable, and fast for torch.
    return data.astype(dtype.newbyteorder("="))


def _decompress_if_gzip(raw: bytes, name: str) -> bytes:
    """Decompress gzip data (recognised by its magic bytes, not the file name)."""
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{name}: corrupted or truncated gzip data ({exc})") from exc


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file, plain or gzip-compressed, into a numpy array.

    Raises ``ValueError`` naming the file when it is truncated or malformed.
    """
    path = Path(path)
    return parse_idx(_decompress_if_gzip(path.read_bytes(), str(path)), str(path))


def md5_of(data: bytes) -> str:
    """MD5 hex digest, used as a checksum (not for security; FIPS builds allow that)."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _md5_of_file(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_mnist_arrays(images: np.ndarray, labels: np.ndarray, where: str) -> None:
    """Refuse arrays that are valid IDX but not MNIST-shaped, before they reach a model."""
    if images.ndim != 3 or images.shape[1:] != _IMAGE_SHAPE or images.dtype != np.uint8:
        raise ValueError(
            f"{where}: expected uint8 images of shape (N, 28, 28), got {images.dtype}"
            f" {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise ValueError(
            f"{where}: expected uint8 labels of shape (N,), got {labels.dtype} {labels.shape}"
        )
    if len(images) != len(labels):
        raise ValueError(f"{where}: {len(images)} images but {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{where}: labels must be digits 0-9, found {int(labels.max())}")


# ---------------------------------------------------------------------------------------------
# The embedded sample
# ---------------------------------------------------------------------------------------------

_sample_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def sample_data_dir() -> _Readable:
    """Where the embedded sample lives: package data, so a pip-installed package carries it."""
    return importlib.resources.files("fedcourse").joinpath("data", "mnist-sample")


def _read_verified(location: _Readable, name: str) -> bytes:
    raw = (location / name).read_bytes()
    expected = MNIST_FILES[name]
    actual = md5_of(raw)
    if actual != expected:
        raise MNISTChecksumError(
            f"The embedded MNIST file {name} at {location / name} is corrupted: its MD5 is"
            f" {actual}, expected {expected}. Reinstall the course package (or restore the"
            " file from the course repository)."
        )
    return raw


def sample_arrays(
    data_dir: _Readable | str | os.PathLike[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 embedded digits as read-only uint8 arrays ``(images (N,28,28), labels (N,))``.

    Both files are MD5-verified before use. The result is cached for the process, since every
    lesson loads it several times. ``data_dir`` defaults to the package's copy; pass another
    folder holding the same two files (tests do, to check the verification).
    """
    location: _Readable = sample_data_dir() if data_dir is None else (
        Path(data_dir) if isinstance(data_dir, (str, os.PathLike)) else data_dir
    )
    key = str(location)
    if key not in _sample_cache:
        images, labels = (
            parse_idx(_decompress_if_gzip(_read_verified(location, name), name), name)
            for name in SPLIT_FILES["test"]
        )
        _check_mnist_arrays(images, labels, f"embedded sample at {location}")
        images.setflags(write=False)
        labels.setflags(write=False)
        _sample_cache[key] = (images, labels)
    return _sample_cache[key]


def _every_fifth_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply ``SAMPLE_SPLIT_RULE`` to a label vector; returns sorted int64 index arrays."""
    labels = np.asarray(labels)
    is_test = np.zeros(len(labels), dtype=bool)
    for digit in np.unique(labels):
        in_class = np.flatnonzero(labels == digit)  # file order
        is_test[in_class[::_SAMPLE_TEST_EVERY]] = True  # rank % 5 == 0
    return np.flatnonzero(~is_test).astype(np.int64), np.flatnonzero(is_test).astype(np.int64)


def sample_split_indices() -> tuple[np.ndarray, np.ndarray]:
    """``(train_idx, test_idx)`` into the embedded sample, following ``SAMPLE_SPLIT_RULE``.

    Deterministic by construction (no random numbers), disjoint, covering all 10,000 digits
    and stratified by label.
    """
    return _every_fifth_split(sample_arrays()[1])


# ---------------------------------------------------------------------------------------------
# The full data set: cache and download
# ---------------------------------------------------------------------------------------------


def mnist_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding the full MNIST files: ``cache_dir`` if given, else the folder named
    by ``$FEDCOURSE_DATA_DIR``, else ``~/.cache/fedcourse/mnist``."""
    if cache_dir is None:
        cache_dir = os.environ.get(DATA_DIR_ENV) or DEFAULT_CACHE_DIR
    return Path(cache_dir).expanduser()


def _mirror() -> str:
    base = os.environ.get(MIRROR_ENV) or DEFAULT_MIRROR
    return base if base.endswith("/") else base + "/"


def _how_to_provide(names: tuple[str, ...] | list[str], folder: Path) -> str:
    listing = "\n".join(f"  {name}  (md5 {MNIST_FILES[name]})" for name in names)
    return (
        f"load_mnist(source='full') needs these files in {folder}:\n{listing}\n"
        f"Download them on a machine with internet access (e.g. from {_mirror()}) and copy them"
        f" into {folder}, or set ${DATA_DIR_ENV} to the folder that holds them"
        f" (${MIRROR_ENV} selects another download mirror). The embedded sample,"
        " load_mnist(source='sample'), needs no download."
    )


def _checksum_error(name: str, path: Path, actual: str, origin: str) -> MNISTChecksumError:
    return MNISTChecksumError(
        f"MNIST file {name} {origin} at {path} has MD5 {actual}, expected {MNIST_FILES[name]}:"
        " it is truncated, corrupted or not the right file. Delete it and call load_mnist again"
        " to download it afresh (or copy in a good copy)."
    )


def _download(name: str, target: Path, needed: tuple[str, ...]) -> None:
    """Download ``name`` next to ``target``, verify it, then move it into place atomically,
    so that an interrupted download never leaves a half-written file under the real name."""
    url = _mirror() + name
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=target.parent)
    tmp_path = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        try:
            with (
                os.fdopen(fd, "wb") as out,
                urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response,
            ):
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    digest.update(chunk)
                    out.write(chunk)
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise MNISTDownloadError(
                f"Downloading MNIST file {name} from {url} failed ({reason}). Check the internet"
                " connection and retry, or provide the files yourself.\n"
                + _how_to_provide(needed, target.parent)
            ) from exc
        actual = digest.hexdigest()
        if actual != MNIST_FILES[name]:
            raise MNISTChecksumError(
                f"MNIST file {name} downloaded from {url} has MD5 {actual}, expected"
                f" {MNIST_FILES[name]}: the download was truncated or the mirror serves a"
                f" different file. Nothing was saved to {target}; retry, or set ${MIRROR_ENV}"
                " to another mirror."
            )
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def ensure_mnist_file(
    name: str,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    needed: tuple[str, ...] | None = None,
) -> Path:
    """Path to a verified copy of one canonical MNIST file, downloading it if allowed.

    A cached file whose MD5 matches is reused without touching the network; one that does
    not match is an error (never silently replaced, so that a user notices a bad copy they
    placed there). ``needed`` lists the files an error message should mention.
    """
    if name not in MNIST_FILES:
        raise ValueError(f"unknown MNIST file {name!r}; valid: {', '.join(MNIST_FILES)}")
    folder = mnist_cache_dir(cache_dir)
    target = folder / name
    needed = needed or (name,)
    if target.is_file():
        actual = _md5_of_file(target)
        if actual != MNIST_FILES[name]:
            raise _checksum_error(name, target, actual, "in the cache")
        return target
    if not download:
        raise MNISTMissingError(
            f"MNIST file {name} is not in {folder} and download=False.\n"
            + _how_to_provide(needed, folder)
            + " Or call load_mnist(..., download=True)."
        )
    _download(name, target, needed)
    return target


# ---------------------------------------------------------------------------------------------
# Public loader
# ---------------------------------------------------------------------------------------------


def _to_dataset(images: np.ndarray, labels: np.ndarray, normalize: bool) -> TensorDataset:
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).div_(255.0).unsqueeze(1)
    if normalize:
        x.sub_(MNIST_MEAN).div_(MNIST_STD)
    y = torch.from_numpy(labels.astype(np.int64))
    return TensorDataset(x, y)


def load_mnist(
    split: str = "train",
    source: str = "sample",
    *,
    normalize: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> TensorDataset:
    """MNIST as a ``TensorDataset`` of images ``float32 (N, 1, 28, 28)`` and labels ``int64 (N,)``.

    Pixels are scaled to [0, 1] and, with ``normalize`` (the default), standardised with
    ``MNIST_MEAN`` and ``MNIST_STD``.

    ``source="sample"`` (default, offline): the embedded 10,000 digits, split by
    ``SAMPLE_SPLIT_RULE`` into 7,997 train / 2,003 test.
    ``source="full"``: the canonical 60,000 / 10,000 digits from the cache folder (see
    ``mnist_cache_dir``), downloaded and MD5-verified on first use when ``download`` is true.
    ``cache_dir`` only matters for the full source.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(map(repr, SPLITS))}; got {split!r}")
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(map(repr, SOURCES))}; got {source!r}")

    if source == "sample":
        images, labels = sample_arrays()
        train_idx, test_idx = _every_fifth_split(labels)
        idx = train_idx if split == "train" else test_idx
        return _to_dataset(images[idx], labels[idx], normalize)

    names = SPLIT_FILES[split]
    paths = [ensure_mnist_file(name, cache_dir, download=download, needed=names) for name in names]
    images, labels = (read_idx(path) for path in paths)
    _check_mnist_arrays(images, labels, f"MNIST {split} files in {paths[0].parent}")
    return _to_dataset(images, labels, normalize)


def class_counts(labels: np.ndarray | torch.Tensor, num_classes: int = 10) -> np.ndarray:
    """How many examples of each class: an int64 array of length ``num_classes``."""
    labels = np.asarray(labels).astype(np.int64).ravel()
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in 0..{num_classes - 1}")
    return np.bincount(labels, minlength=num_classes)
