"""Reader for IDX files (the MNIST / Fashion-MNIST container), raw or gzip-compressed.

Layout: magic `00 00 <dtype code> <ndim>`, then `ndim` big-endian uint32 sizes, then the
values, big-endian, row-major. Everything is checked against the file's byte count so a
truncated download or a foreign file is an error, never a silently wrong array.
"""
import gzip
import zlib
from pathlib import Path

import numpy as np
from agmae.errors import UserError

GZIP_MAGIC = b"\x1f\x8b"

# IDX type codes -> big-endian numpy dtypes.
IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if not raw.startswith(GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as err:
        raise UserError(f"{path}: corrupt or truncated gzip stream ({err}); re-download the file") from err


def read_idx(path) -> np.ndarray:
    """Read an IDX file (compression detected from the content, not the name).

    Returns an array of the file's shape, e.g. images `[N, 28, 28]` uint8 or labels `[N]`
    uint8, in native byte order. Raises ValueError naming the file if its header or size is wrong.
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise UserError(f"{path}: {len(data)} bytes is too short for an IDX header; expected an IDX file")
    zero0, zero1, code, ndim = data[:4]
    if zero0 != 0 or zero1 != 0:
        raise UserError(f"{path}: bad IDX magic {data[:4].hex()} (expected 0000<type><ndim>); not an IDX file")
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02x}" for c in IDX_DTYPES)
        raise UserError(f"{path}: unknown IDX type code 0x{code:02x} (known: {known})")
    if ndim == 0:
        raise UserError(f"{path}: IDX header declares 0 dimensions; expected at least 1")
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise UserError(f"{path}: truncated IDX header ({len(data)} bytes, need {header_size} for {ndim} dimensions)")
    shape = tuple(int(s) for s in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dtype = IDX_DTYPES[code]
    expected = header_size + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise UserError(
            f"{path}: IDX header declares shape {shape} of {dtype.name} ({expected} bytes) but the file holds "
            f"{len(data)} bytes; the file is truncated or not this format"
        )
    values = np.frombuffer(data, dtype=dtype, offset=header_size).reshape(shape)
    return values.astype(dtype.newbyteorder("="))
