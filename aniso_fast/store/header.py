"""The one reader of stored JSON: safetensors headers (checkpoints, shipped models, the embedded mixture) and the
JSON documents inside them or beside them (metadata, the manifest).

Everything is bounded before it is parsed: a header longer than `MAX_HEADER_BYTES` or JSON nested deeper than
`MAX_JSON_DEPTH` is refused without calling the parser (Python's recursive JSON decoder would end in a
RecursionError), numbers must be finite, and every tensor entry of a header must describe a tensor that lies
inside the file. A problem is one `StoredFileError` naming the file.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["StoredFileError", "MAX_HEADER_BYTES", "MAX_JSON_DEPTH", "DTYPE_BYTES", "parse_json", "read_header",
           "split_header"]

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
MAX_JSON_DEPTH = 64  # a safetensors header is 3 deep, the manifest 6
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


class StoredFileError(ValueError):
    """A stored file (shipped model, training checkpoint, embedded mixture, manifest) is missing, truncated,
    corrupt, or holds values that cannot be used."""


def _depth(data: bytes) -> int:
    """The deepest nesting of [ and { outside strings (an upper bound where a string is malformed)."""
    codes = np.frombuffer(_STRING.sub(b'""', data), dtype=np.uint8)
    steps = (codes == ord("[")).astype(np.int64) + (codes == ord("{")) - (codes == ord("]")) - (codes == ord("}"))
    return int(np.cumsum(steps).max(initial=0))


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(data: bytes | str, name: str, *, allow_nan: bool = False) -> Any:
    """A JSON document bounded in depth (and, unless `allow_nan`, with finite numbers only); StoredFileError
    naming `name` otherwise. Training metadata may hold NaN (a diverged loss), so it passes allow_nan."""
    raw = data.encode() if isinstance(data, str) else bytes(data)
    if _depth(raw) > MAX_JSON_DEPTH:
        raise StoredFileError(f"{name}: corrupt (JSON nested deeper than {MAX_JSON_DEPTH} levels)")
    try:
        if allow_nan:
            return json.loads(raw)
        return json.loads(raw, parse_float=_finite_float, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, and over-long integers
        raise StoredFileError(f"{name}: corrupt JSON ({str(e).splitlines()[0][:200]})") from None


def _check_entries(header: dict, data_bytes: int, name: str) -> None:
    """Every tensor entry well-formed (dtype, shape, offsets matching the size); together they fill the data."""
    spans = []
    for key, entry in header.items():
        if key == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise StoredFileError(f"{name}: corrupt header (metadata is not an object of strings)")
            continue
        if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and entry["dtype"] in DTYPE_BYTES
                and isinstance(entry.get("shape"), list) and isinstance(entry.get("data_offsets"), list)
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0
                        for n in (*entry["shape"], *entry["data_offsets"]))
                and len(entry["data_offsets"]) == 2):
            raise StoredFileError(f"{name}: corrupt header (tensor {key[:80]!r}: expected a dtype, a shape and "
                                  f"two data offsets)")
        begin, end = entry["data_offsets"]
        if end - begin != math.prod(entry["shape"]) * DTYPE_BYTES[entry["dtype"]]:
            raise StoredFileError(f"{name}: corrupt header (tensor {key[:80]!r}: its offsets do not match its "
                                  f"shape and dtype)")
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise StoredFileError(f"{name}: corrupt header (tensor data overlaps or leaves gaps)")
        position = end
    if position != data_bytes:
        raise StoredFileError(f"{name}: truncated or corrupt (tensor data is {data_bytes} bytes, the header "
                              f"describes {position})")


def split_header(prefix: bytes, total: int, name: str) -> int:
    """The header length from the first 8 bytes of a safetensors file of `total` bytes, checked against the bounds."""
    if len(prefix) < 8:
        raise StoredFileError(f"{name}: truncated ({total} bytes; not a safetensors file)")
    n = int.from_bytes(prefix[:8], "little")
    if n <= 0 or 8 + n > total:
        raise StoredFileError(f"{name}: truncated or corrupt (header length {n} exceeds the file size {total})")
    if n > MAX_HEADER_BYTES:
        raise StoredFileError(f"{name}: corrupt (header of {n} bytes, more than {MAX_HEADER_BYTES})")
    return n


def read_header(source: bytes | str | os.PathLike, name: str | None = None) -> tuple[dict, int]:
    """The validated JSON header of a safetensors file or blob: (header, offset of the tensor data).

    From a file it reads the header only. Checks: the length prefix and its bound, the JSON depth, the JSON
    object, each tensor entry, and that the tensor data ends exactly at the end of the file. StoredFileError
    naming the file otherwise.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = name or "<bytes>"
        n = split_header(data[:8], len(data), name)
        raw, total = data[8:8 + n], len(data)
    else:
        path = Path(source)
        name = name or str(path)
        if not path.is_file():
            raise StoredFileError(f"{name}: no such file")
        try:
            with open(path, "rb") as f:
                total = os.fstat(f.fileno()).st_size
                n = split_header(f.read(8), total, name)
                raw = f.read(n)
        except OSError as e:
            raise StoredFileError(f"{name}: cannot read ({e.strerror})") from None
    header = parse_json(raw, name)
    if not isinstance(header, dict):
        raise StoredFileError(f"{name}: corrupt header (not a JSON object)")
    _check_entries(header, total - 8 - n, name)
    return header, 8 + n
