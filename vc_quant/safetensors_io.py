"""A strict, mmap-free safetensors reader: one header, then one tensor at a time.

safetensors' own ``safe_open`` maps a whole shard into the address space (a private
mapping, which also counts against a process's data limit). Reading a checkpoint as
untrusted input and compressing models larger than memory both need less: the header
is parsed with its size checked against the file before anything is allocated, every
entry's byte range is checked against its dtype and shape, and a tensor is read with one
``seek`` + ``read`` into memory the caller owns.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from vc_quant.errors import VcCorruptDataError

#: headers larger than this are refused (real ones: ~100 bytes per tensor)
MAX_HEADER_BYTES = 100 << 20
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    path: Path
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]


def read_header(path: str | Path) -> Header:
    """Parse and check the header of the safetensors file ``path``."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise VcCorruptDataError(f"{path}: not a readable safetensors file (shorter than its header size)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise VcCorruptDataError(f"{path}: not a readable safetensors file (header of {n} bytes)")
            text = f.read(n)
    except OSError as exc:
        raise VcCorruptDataError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        header = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise VcCorruptDataError(f"{path}: not a readable safetensors file (header: {exc})") from exc
    if not isinstance(header, dict):
        raise VcCorruptDataError(f"{path}: not a readable safetensors file (header is not an object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise VcCorruptDataError(f"{path}: safetensors metadata must map names to strings")
    base, tensors = 8 + n, {}
    for key, info in header.items():
        try:
            dtype, shape, (a, b) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
            item = torch.empty((), dtype=DTYPES[dtype]).element_size()
        except (KeyError, TypeError, ValueError) as exc:
            raise VcCorruptDataError(f"{path}: entry {key!r} of the header is malformed") from exc
        if any(s < 0 for s in shape) or not (0 <= a <= b <= size - base) or b - a != math.prod(shape) * item:
            raise VcCorruptDataError(f"{path}: entry {key!r} has byte range {a}..{b} that does not fit its "
                                     f"{dtype} {list(shape)} or the file")  # fmt: skip
        tensors[key] = TensorInfo(dtype, shape, base + a, base + b)
    return Header(path, tensors, metadata)


def read_tensor(path: str | Path, info: TensorInfo) -> torch.Tensor:
    """One tensor, read into a fresh buffer (the file can change afterwards)."""
    with open(path, "rb") as f:
        f.seek(info.start)
        data = bytearray(info.end - info.start)
        if f.readinto(data) != len(data):
            raise VcCorruptDataError(f"{path}: file ends inside a tensor (truncated)")
    if not data:
        return torch.empty(info.shape, dtype=DTYPES[info.dtype])
    return torch.frombuffer(data, dtype=DTYPES[info.dtype]).reshape(info.shape)


_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_SYNC_EVERY = 64 << 20


def write_file(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file tensor by tensor, straight from each tensor's memory (no serialised copy).

    ``safetensors.torch.save_file`` first turns every tensor into a ``bytes`` copy; for a
    bounded-memory writer the file is produced as it is read back: a header padded to
    8 bytes, then the raw data in the header's order.
    """
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    order = sorted(tensors)
    for key in order:
        t = tensors[key]
        nbytes = t.numel() * t.element_size()
        header[key] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for key in order:
            t = tensors[key].detach().cpu().contiguous()
            data = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
            for start in range(0, len(data), _SYNC_EVERY):
                f.write(data[start : start + _SYNC_EVERY])
                f.flush()
                # written-back pages can be reclaimed: under a memory limit, dirty pages cannot
                os.fdatasync(f.fileno())
