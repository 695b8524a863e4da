"""Safe reading of ``.safetensors`` files: header validation, tensors as NumPy arrays, metadata, sha256.

auditkit parses the safetensors container itself (it is 8 bytes of little-endian header length,
a JSON header, then raw tensor bytes) instead of going through torch, for three reasons:
every malformed file gets a precise one-line message, nothing executes (pickles are refused
before any byte is interpreted), and the static scan needs neither torch nor a GPU.
Tensors are memory-mapped, so reading a file costs about its size in memory at most.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import numpy as np

from auditkit.errors import BadInput
from auditkit.fsutil import parse_json
from auditkit.lora.identify import MAX_HEADER_BYTES, identify_bytes

# Pickle-based checkpoints can execute code when loaded; they are refused, never opened with torch.
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}

_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("<f8", 8),
    "F32": ("<f4", 4),
    "F16": ("<f2", 2),
    "BF16": ("<u2", 2),  # decoded to float32 below: NumPy has no bfloat16
    "I64": ("<i8", 8),
    "I32": ("<i4", 4),
    "I16": ("<i2", 2),
    "I8": ("i1", 1),
    "U8": ("u1", 1),
    "BOOL": ("?", 1),
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


@dataclass
class SafetensorsFile:
    """An opened, validated safetensors file. Tensors are read lazily from a read-only memory map."""

    path: Path
    size: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    _map: mmap.mmap | None = field(default=None, repr=False)
    _sha256: str | None = field(default=None, repr=False)

    def array(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor ``name`` as a NumPy array (a zero-copy view unless it is bfloat16); only its rows
        ``start:stop`` when ``rows`` is given (a share of a fused tensor: nothing else is decoded)."""
        info = self.tensors[name]
        np_dtype, _ = _DTYPES[info.dtype]
        count = math.prod(info.shape)
        if self._map is None:  # zero-byte data region: only empty tensors exist
            raw = np.zeros(0, dtype=np_dtype)
        else:
            raw = np.frombuffer(self._map, dtype=np_dtype, count=count, offset=info.start)
        raw = raw.reshape(info.shape)
        if rows is not None:
            raw = raw[rows[0]:rows[1]]
        if info.dtype == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        return raw

    def float_array(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """A floating-point tensor (or its rows ``start:stop``), checked to be finite (NaN/Inf weights are refused)."""
        info = self.tensors[name]
        if info.dtype not in FLOAT_DTYPES:
            raise BadInput(self.path, f"tensor '{name}' has dtype {info.dtype}, expected a float type")
        arr = self.array(name, rows)
        if not np.isfinite(arr).all():
            raise BadInput(self.path, f"tensor '{name}' contains NaN or Inf values")
        return arr

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            digest = hashlib.sha256()
            with open(self.path, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    digest.update(chunk)
            self._sha256 = digest.hexdigest()
        return self._sha256


def refuse_pickle(path: Path) -> None:
    """Raise for pickle checkpoints, by suffix or by their first bytes; never unpickle."""
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise BadInput(
            path,
            f"'{path.suffix}' is a pickle checkpoint, which can run code when loaded; auditkit never "
            "unpickles. Convert it to .safetensors with a trusted tool first",
        )
    with open(path, "rb") as fh:
        head = fh.read(9)
    # torch.save writes a zip archive (PK\x03\x04); older pickles start with the PROTO opcode 0x80.
    # A safetensors header length can begin with 0x80 too, but its JSON then opens at byte 8.
    if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[8:9] != b"{"):
        raise BadInput(path, "file is a pickle/zip checkpoint, not safetensors; auditkit never unpickles")


def open_safetensors(path: str | Path) -> SafetensorsFile:
    """Open and validate ``path``. Every defect raises :class:`BadInput` naming the file."""
    path = Path(path)
    if not path.exists():
        raise BadInput(path, "no such file")
    if path.is_dir():
        raise BadInput(path, "is a directory, expected a .safetensors file")
    try:
        refuse_pickle(path)
        size = path.stat().st_size
        if size == 0:
            raise BadInput(path, "file is empty")
        if size < 8:
            raise BadInput(path, f"truncated: {size} bytes, too short for a safetensors header")
        with open(path, "rb") as fh:
            head = fh.read(1024)
            described = identify_bytes(head)  # only when it cannot be safetensors: an LFS pointer, a web page, ...
            if described:
                raise BadInput(path, described)
            header_len = int.from_bytes(head[:8], "little")
            fh.seek(8)
            if header_len > MAX_HEADER_BYTES:
                raise BadInput(path, f"header length {header_len} is absurd (limit {MAX_HEADER_BYTES})")
            if 8 + header_len > size:
                raise BadInput(path, f"truncated: header claims {header_len} bytes but the file has {size}")
            header_bytes = fh.read(header_len)
            tensors, metadata = _parse_header(path, header_bytes, data_start=8 + header_len, size=size)
            data_len = size - 8 - header_len
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if data_len > 0 else None
    except OSError as exc:
        raise BadInput(path, f"cannot read file ({exc.strerror or exc})") from None
    return SafetensorsFile(path=path, size=size, tensors=tensors, metadata=metadata, _map=mapped)


def _parse_header(
    path: Path, header_bytes: bytes, data_start: int, size: int
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    # the format forbids a repeated tensor name, which Python's JSON would silently read as the last one
    header = parse_json(header_bytes, path, "header", limit=MAX_HEADER_BYTES, unique="tensor name")
    if not isinstance(header, dict):
        raise BadInput(path, "header is not a JSON object")
    raw_meta = header.pop("__metadata__", None) or {}
    if not isinstance(raw_meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw_meta.items()
    ):
        raise BadInput(path, "__metadata__ must map strings to strings")

    data_len = size - data_start
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _parse_entry(path, name, entry, data_start, data_len)
    # Tensors must not overlap (the format requires a contiguous, non-overlapping layout).
    spans = sorted((t.start, t.end, t.name) for t in tensors.values() if t.end > t.start)
    for (_, end_a, name_a), (start_b, _, name_b) in pairwise(spans):
        if start_b < end_a:
            raise BadInput(path, f"corrupt: tensors '{name_a}' and '{name_b}' overlap")
    return tensors, dict(raw_meta)


def _parse_entry(path: Path, name: str, entry: object, data_start: int, data_len: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise BadInput(path, f"corrupt header entry for '{name}'")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in _DTYPES:
        raise BadInput(path, f"tensor '{name}' has unsupported dtype {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise BadInput(path, f"tensor '{name}' has an invalid shape {shape!r}")
    if not (
        isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
    ):
        raise BadInput(path, f"tensor '{name}' has invalid data_offsets {offsets!r}")
    begin, end = offsets
    expected = math.prod(shape) * _DTYPES[dtype][1]  # Python ints: NumPy's int64 product wraps around
    if begin < 0 or end < begin:
        raise BadInput(path, f"tensor '{name}' has invalid data_offsets {offsets!r}")
    if end - begin != expected:
        raise BadInput(path, f"tensor '{name}' spans {end - begin} bytes but shape {shape} needs {expected}")
    if end > data_len:
        raise BadInput(path, f"truncated: tensor '{name}' ends at byte {end} of a {data_len}-byte data region")
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


_NP_TO_ST = {np.dtype("<f8"): "F64", np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<i8"): "I64",
             np.dtype("<i4"): "I32", np.dtype("<i2"): "I16", np.dtype("i1"): "I8", np.dtype("u1"): "U8",
             np.dtype("?"): "BOOL"}


def serialize(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """Bytes of a safetensors file with sorted keys: the same tensors always give the same bytes.

    (The reference library stores metadata in a hash map, so its key order, and the file's hash,
    can change from run to run; adapters auditkit writes are reproducible byte for byte.)
    """
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    chunks, offset = [], 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        if arr.dtype not in _NP_TO_ST:
            raise TypeError(f"cannot store dtype {arr.dtype} ({name})")
        data = arr.tobytes()
        header[name] = {"dtype": _NP_TO_ST[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # align the data region to 8 bytes, as the format recommends
    return len(head).to_bytes(8, "little") + head + b"".join(chunks)
