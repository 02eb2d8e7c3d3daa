import gzip
import struct

import numpy as np
import pytest

from agmae.data.idx import read_idx

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
TYPE_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of an array, written from the format's definition (big-endian)."""
    header = bytes([0, 0, TYPE_CODES[array.dtype.type], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


@pytest.mark.parametrize("dtype", list(TYPE_CODES))
@pytest.mark.parametrize("compressed", [False, True])
def test_round_trip_every_dtype_raw_and_gzip(tmp_path, dtype, compressed):
    rng = np.random.default_rng(0)
    array = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    data = idx_bytes(array)
    path = tmp_path / "a.idx"
    path.write_bytes(gzip.compress(data) if compressed else data)
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype).newbyteorder("=") and out.shape == (3, 4, 5)
    np.testing.assert_array_equal(out, array)
    out[0, 0, 0] = 1  # a writable array of its own, not a view on the file's bytes


def test_compression_detected_by_content_not_name(tmp_path):
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    gz_named_raw = tmp_path / "raw.gz"
    gz_named_raw.write_bytes(idx_bytes(array))
    raw_named_gz = tmp_path / "compressed-idx1-ubyte"
    raw_named_gz.write_bytes(gzip.compress(idx_bytes(array)))
    np.testing.assert_array_equal(read_idx(gz_named_raw), array)
    np.testing.assert_array_equal(read_idx(raw_named_gz), array)


def test_reads_fashion_mnist():
    images = read_idx(f"{FASHION_MNIST}/t10k-images-idx3-ubyte.gz")
    labels = read_idx(f"{FASHION_MNIST}/t10k-labels-idx1-ubyte.gz")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8 and images.max() == 255
    assert np.bincount(labels).tolist() == [1000] * 10
    assert labels[:5].tolist() == [9, 2, 1, 1, 6]  # ankle boot, pullover, trouser, trouser, shirt


def bad_files():
    good = idx_bytes(np.arange(24, dtype=np.int16).reshape(2, 3, 4))
    return {
        "truncated data": (good[:-1], "truncated"),
        "trailing bytes": (good + b"\0", "truncated"),
        "truncated header": (good[:9], "truncated IDX header"),
        "too short": (b"\0\0", "too short"),
        "bad magic": (b"\x89PNG\r\n\x1a\n" + good, "magic"),
        "unknown dtype": (bytes([0, 0, 0x0A, 1]) + struct.pack(">I", 1) + b"\0", "type code 0x0a"),
        "zero dimensions": (bytes([0, 0, 0x08, 0]), "0 dimensions"),
        "truncated gzip": (gzip.compress(good)[:-6], "gzip"),
        "truncated data inside gzip": (gzip.compress(good[:-2]), "truncated"),
    }


@pytest.mark.parametrize("case", list(bad_files()))
def test_bad_files_are_rejected_with_the_file_name(tmp_path, case):
    data, message = bad_files()[case]
    path = tmp_path / "broken-idx3-ubyte"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=message) as err:
        read_idx(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
