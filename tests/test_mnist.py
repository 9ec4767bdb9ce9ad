"""Tests of fedcourse.mnist: IDX reading, the embedded sample and its split, the full download.

Nothing here touches the internet: the "full" source is served from a local HTTP server on
127.0.0.1, with the real t10k files (the embedded sample is exactly those) and small
synthetic stand-ins for the 60k training files, whose checksums are patched in.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import shutil
import struct
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from fedcourse import mnist

SAMPLE_DIR = Path(mnist.__file__).parent / "data" / "mnist-sample"
IMAGES = "t10k-images-idx3-ubyte.gz"
LABELS = "t10k-labels-idx1-ubyte.gz"
TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
SAMPLE_CLASS_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
UNREACHABLE = "http://127.0.0.1:9/"  # the discard port: nothing listens there


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode an array as IDX (independent of the module under test)."""
    codes = {np.dtype("u1"): 0x08, np.dtype("i1"): 0x09, np.dtype("i2"): 0x0B,
             np.dtype("i4"): 0x0C, np.dtype("f4"): 0x0D, np.dtype("f8"): 0x0E}
    code = codes[array.dtype.newbyteorder("=")]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# --------------------------------------------------------------------------------------------
# IDX reader
# --------------------------------------------------------------------------------------------


def test_read_idx_real_sample_files():
    images = mnist.read_idx(SAMPLE_DIR / IMAGES)
    labels = mnist.read_idx(SAMPLE_DIR / LABELS)
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.uint8
    assert np.bincount(labels).tolist() == SAMPLE_CLASS_COUNTS
    assert images.min() == 0 and images.max() == 255
    assert mnist.class_counts(labels).tolist() == SAMPLE_CLASS_COUNTS


def test_read_idx_plain_file_and_other_dtypes(tmp_path):
    plain = tmp_path / "labels-idx1-ubyte"
    plain.write_bytes(gzip.decompress((SAMPLE_DIR / LABELS).read_bytes()))
    assert np.array_equal(mnist.read_idx(plain), mnist.read_idx(SAMPLE_DIR / LABELS))

    for array in (np.arange(24, dtype=np.int32).reshape(2, 3, 4) - 7,
                  np.linspace(-1, 1, 6).astype(np.float32).reshape(3, 2),
                  np.array([-300, 5, 32000], dtype=np.int16)):
        path = tmp_path / "x.idx.gz"
        path.write_bytes(gzip.compress(idx_bytes(array)))
        result = mnist.read_idx(path)
        assert result.shape == array.shape and result.dtype == array.dtype
        assert np.array_equal(result, array)


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"\x00\x00", "too short"),
        (b"\x01\x00\x08\x01" + struct.pack(">I", 3) + b"abc", "not an IDX"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 3) + b"abc", "type code"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 3), "truncated IDX header"),
        (b"\x00\x00\x08\x02" + struct.pack(">II", 3, 4) + bytes(11), "truncated"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 3) + bytes(4), "unexpected bytes"),
    ],
)
def test_read_idx_rejects_malformed_files(tmp_path, content, fragment):
    path = tmp_path / "broken-idx-file"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=fragment) as info:
        mnist.read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_rejects_truncated_gzip_and_truncated_payload(tmp_path):
    raw = (SAMPLE_DIR / LABELS).read_bytes()
    cut = tmp_path / "cut-labels.gz"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="cut-labels.gz"):
        mnist.read_idx(cut)

    # A valid gzip stream whose IDX payload is one label short.
    short = tmp_path / "short-labels.gz"
    short.write_bytes(gzip.compress(gzip.decompress(raw)[:-1]))
    with pytest.raises(ValueError, match="truncated") as info:
        mnist.read_idx(short)
    assert "short-labels.gz" in str(info.value)


# --------------------------------------------------------------------------------------------
# Embedded sample and its split
# --------------------------------------------------------------------------------------------


def test_sample_split_follows_the_rule_and_is_stable():
    train_idx, test_idx = mnist.sample_split_indices()
    again_train, again_test = mnist.sample_split_indices()
    assert np.array_equal(train_idx, again_train) and np.array_equal(test_idx, again_test)
    assert train_idx.dtype == np.int64 and test_idx.dtype == np.int64
    assert len(train_idx) == 7997 and len(test_idx) == 2003
    assert np.intersect1d(train_idx, test_idx).size == 0
    assert np.array_equal(np.sort(np.concatenate([train_idx, test_idx])), np.arange(10000))
    assert np.all(np.diff(train_idx) > 0) and np.all(np.diff(test_idx) > 0)  # file order

    labels = mnist.read_idx(SAMPLE_DIR / LABELS)
    for digit in range(10):
        in_class = np.flatnonzero(labels == digit)
        expected_test = in_class[np.arange(len(in_class)) % 5 == 0]
        assert np.array_equal(test_idx[labels[test_idx] == digit], expected_test)
        fraction = len(expected_test) / len(in_class)
        assert 0.19 < fraction < 0.21


def test_load_mnist_sample_shapes_labels_and_pixels():
    train_idx, test_idx = mnist.sample_split_indices()
    raw_images = mnist.read_idx(SAMPLE_DIR / IMAGES)
    raw_labels = mnist.read_idx(SAMPLE_DIR / LABELS)
    for split, idx in (("train", train_idx), ("test", test_idx)):
        dataset = mnist.load_mnist(split, normalize=False)
        images, labels = dataset.tensors
        assert images.shape == (len(idx), 1, 28, 28) and images.dtype == torch.float32
        assert labels.dtype == torch.int64
        assert np.array_equal(labels.numpy(), raw_labels[idx])
        assert np.allclose(images[:, 0].numpy(), raw_images[idx] / 255.0)
    train_counts = mnist.class_counts(mnist.load_mnist("train").tensors[1])
    test_counts = mnist.class_counts(mnist.load_mnist("test").tensors[1])
    assert (train_counts + test_counts).tolist() == SAMPLE_CLASS_COUNTS


def test_normalize_on_and_off():
    raw = mnist.load_mnist("train", normalize=False).tensors[0]
    assert raw.min() == 0.0 and raw.max() == 1.0
    assert 0.11 < raw.mean() < 0.15 and 0.29 < raw.std() < 0.33
    standardised = mnist.load_mnist("train").tensors[0]
    assert torch.allclose(standardised, (raw - mnist.MNIST_MEAN) / mnist.MNIST_STD, atol=1e-5)
    assert abs(standardised.mean()) < 0.05 and abs(standardised.std() - 1) < 0.05
    assert (mnist.MNIST_MEAN, mnist.MNIST_STD) == (0.1307, 0.3081)


def test_invalid_split_and_source():
    with pytest.raises(ValueError, match="'train', 'test'"):
        mnist.load_mnist("validation")
    with pytest.raises(ValueError, match="'sample', 'full'"):
        mnist.load_mnist("train", source="fashion")


def test_corrupted_embedded_file_is_refused(tmp_path, monkeypatch):
    for name in (IMAGES, LABELS):
        shutil.copy(SAMPLE_DIR / name, tmp_path / name)
    corrupted = bytearray((tmp_path / IMAGES).read_bytes())
    corrupted[5000] ^= 0xFF
    (tmp_path / IMAGES).write_bytes(bytes(corrupted))
    with pytest.raises(mnist.MNISTChecksumError) as info:
        mnist.sample_arrays(tmp_path)
    message = str(info.value)
    assert IMAGES in message and mnist.MNIST_FILES[IMAGES] in message and md5(bytes(corrupted)) in message

    # load_mnist goes through the same verification.
    monkeypatch.setattr(mnist, "sample_data_dir", lambda: tmp_path)
    with pytest.raises(mnist.MNISTChecksumError, match=mnist.MNIST_FILES[IMAGES]):
        mnist.load_mnist()


def test_truncated_embedded_labels_are_refused(tmp_path):
    shutil.copy(SAMPLE_DIR / IMAGES, tmp_path / IMAGES)
    (tmp_path / LABELS).write_bytes((SAMPLE_DIR / LABELS).read_bytes()[:-100])
    with pytest.raises(mnist.MNISTChecksumError, match=mnist.MNIST_FILES[LABELS]):
        mnist.sample_arrays(tmp_path)


# --------------------------------------------------------------------------------------------
# Full source, served locally
# --------------------------------------------------------------------------------------------


class _CountingServer:
    """A static HTTP server on 127.0.0.1 that counts the requests for each path."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: Counter[str] = Counter()
        requests = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                requests[self.path.lstrip("/")] += 1
                super().do_GET()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
        )
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def synthetic_train():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(30, 28, 28), dtype=np.uint8)
    labels = (np.arange(30) % 10).astype(np.uint8)
    return images, labels, gzip.compress(idx_bytes(images)), gzip.compress(idx_bytes(labels))


@pytest.fixture
def mirror(tmp_path, monkeypatch, synthetic_train):
    """Serve the t10k files and synthetic train files; patch the train checksums to match."""
    served = tmp_path / "mirror"
    served.mkdir()
    for name in (IMAGES, LABELS):
        shutil.copy(SAMPLE_DIR / name, served / name)
    _, _, images_gz, labels_gz = synthetic_train
    (served / TRAIN_IMAGES).write_bytes(images_gz)
    (served / TRAIN_LABELS).write_bytes(labels_gz)
    monkeypatch.setitem(mnist.MNIST_FILES, TRAIN_IMAGES, md5(images_gz))
    monkeypatch.setitem(mnist.MNIST_FILES, TRAIN_LABELS, md5(labels_gz))
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv(mnist.DATA_DIR_ENV, raising=False)
    server = _CountingServer(served)
    monkeypatch.setenv(mnist.MIRROR_ENV, server.url)
    yield server
    server.close()


def test_full_downloads_once_then_reuses_the_cache(tmp_path, monkeypatch, mirror, synthetic_train):
    cache = tmp_path / "cache"
    images, labels, _, _ = synthetic_train
    dataset = mnist.load_mnist("train", "full", cache_dir=cache, normalize=False)
    assert mirror.requests == {TRAIN_IMAGES: 1, TRAIN_LABELS: 1}
    assert sorted(p.name for p in cache.iterdir()) == [TRAIN_IMAGES, TRAIN_LABELS]  # no temp files
    x, y = dataset.tensors
    assert x.shape == (30, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert np.allclose(x[:, 0].numpy(), images / 255.0)
    assert np.array_equal(y.numpy(), labels)

    monkeypatch.setenv(mnist.MIRROR_ENV, UNREACHABLE)
    again = mnist.load_mnist("train", "full", cache_dir=cache)
    assert len(again) == 30
    assert mirror.requests == {TRAIN_IMAGES: 1, TRAIN_LABELS: 1}


def test_full_test_split_is_the_canonical_t10k(tmp_path, mirror):
    dataset = mnist.load_mnist("test", "full", cache_dir=tmp_path / "cache")
    assert mirror.requests == {IMAGES: 1, LABELS: 1}
    assert len(dataset) == 10000
    assert mnist.class_counts(dataset.tensors[1]).tolist() == SAMPLE_CLASS_COUNTS


def test_full_uses_the_env_cache_dir(tmp_path, monkeypatch, mirror):
    folder = tmp_path / "from-env"
    monkeypatch.setenv(mnist.DATA_DIR_ENV, str(folder))
    assert mnist.mnist_cache_dir() == folder
    assert mnist.mnist_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    mnist.load_mnist("train", "full")
    assert (folder / TRAIN_IMAGES).is_file() and (folder / TRAIN_LABELS).is_file()


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv(mnist.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert mnist.mnist_cache_dir() == tmp_path / ".cache" / "fedcourse" / "mnist"


def test_unreachable_mirror_gives_a_clear_error(tmp_path, monkeypatch, mirror):
    cache = tmp_path / "cache"
    monkeypatch.setenv(mnist.MIRROR_ENV, UNREACHABLE)
    with pytest.raises(mnist.MNISTDownloadError) as info:
        mnist.load_mnist("train", "full", cache_dir=cache)
    assert isinstance(info.value, RuntimeError)
    message = str(info.value)
    for needed in (str(cache), mnist.DATA_DIR_ENV, TRAIN_IMAGES, TRAIN_LABELS,
                   mnist.MNIST_FILES[TRAIN_IMAGES], mnist.MNIST_FILES[TRAIN_LABELS], "failed"):
        assert needed in message
    assert not any(cache.iterdir())  # no partial download left behind


def test_missing_file_on_the_mirror_is_a_download_error(tmp_path, mirror):
    (mirror.root / TRAIN_LABELS).unlink()
    with pytest.raises(mnist.MNISTDownloadError, match=TRAIN_LABELS):
        mnist.load_mnist("train", "full", cache_dir=tmp_path / "cache")


def test_corrupted_download_is_not_kept(tmp_path, monkeypatch, mirror):
    monkeypatch.setitem(mnist.MNIST_FILES, TRAIN_IMAGES, "0" * 32)
    cache = tmp_path / "cache"
    with pytest.raises(mnist.MNISTChecksumError) as info:
        mnist.load_mnist("train", "full", cache_dir=cache)
    assert TRAIN_IMAGES in str(info.value) and "0" * 32 in str(info.value)
    assert not (cache / TRAIN_IMAGES).exists()
    assert not any(cache.iterdir())


def test_corrupted_cached_file_is_refused(tmp_path, monkeypatch, mirror, synthetic_train):
    cache = tmp_path / "cache"
    cache.mkdir()
    _, _, images_gz, labels_gz = synthetic_train
    truncated = images_gz[:-10]
    (cache / TRAIN_IMAGES).write_bytes(truncated)
    (cache / TRAIN_LABELS).write_bytes(labels_gz)
    monkeypatch.setenv(mnist.MIRROR_ENV, UNREACHABLE)
    with pytest.raises(mnist.MNISTChecksumError) as info:
        mnist.load_mnist("train", "full", cache_dir=cache)
    message = str(info.value)
    for needed in (TRAIN_IMAGES, str(cache / TRAIN_IMAGES), md5(images_gz), md5(truncated), "Delete"):
        assert needed in message
    assert mirror.requests == {}  # it never tried to replace the bad copy


def test_download_false_with_missing_files(tmp_path, mirror):
    cache = tmp_path / "cache"
    with pytest.raises(mnist.MNISTMissingError) as info:
        mnist.load_mnist("test", "full", cache_dir=cache, download=False)
    message = str(info.value)
    for needed in (IMAGES, LABELS, mnist.MNIST_FILES[IMAGES], str(cache), "download=True"):
        assert needed in message
    assert mirror.requests == {}


def test_full_never_falls_back_to_the_sample(tmp_path, monkeypatch):
    monkeypatch.setenv(mnist.MIRROR_ENV, UNREACHABLE)
    with pytest.raises(mnist.MNISTDataError):
        mnist.load_mnist("test", "full", cache_dir=tmp_path / "empty")
