"""The rANS bitstream: header, frequency tables, segment offsets, words (docs/rans_format.md).

Everything a decoder needs to turn the bytes into reconstruction integers is in the
stream itself; the record's metadata adds what turns those into the tensor (shape, step,
rotation seed, column scales). :func:`parse` is the only way in: it checks every field
against the tensor's size before anything is allocated or decoded, and raises
:class:`~vc_quant.errors.VcCorruptDataError` naming the field.

Layout (little-endian)::

    offset  size  field
    0       4     magic b"vcRA"
    4       1     version (1)
    5       1     quantizer: 0 scalar, 1 dependent (trellis, 2 contexts)
    6       1     probability bits (12)
    7       1     lanes per segment G (1..64)
    8       4     symbols per lane and segment L
    12      8     symbols n (= the matrix's rows x cols)
    20      4     segments S (= ceil(n / (G L)))
    24      ...   per context: int8 kmin, uint8 count, then count x uint16 frequency
    ...           zero padding to a multiple of 4 bytes
    ...     4S    uint32 cumulative end offset of each segment, in words
    ...     2W    uint16 words: each segment's G initial states (low, high word) then its data
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from vc_quant.codec.rans.tables import LEVEL_MAX, PROB_BITS, PROB_SCALE, Table
from vc_quant.errors import VcCorruptDataError

MAGIC = b"vcRA"
VERSION = 1
QUANTIZERS = ("scalar", "dq")
#: contexts (tables) and the level range of each quantizer (DQ levels reconstruct to 2k or 2k - sgn k)
CONTEXTS = {"scalar": 1, "dq": 2}
LEVEL_RANGE = {"scalar": LEVEL_MAX, "dq": (LEVEL_MAX + 1) // 2}
MAX_LANES = 64
MAX_LANE_LEN = 1 << 20
_HEADER = struct.Struct("<4sBBBBIQI")
_CONTEXT = struct.Struct("<bB")


@dataclass
class RansStream:
    quantizer: str
    lanes: int
    lane_len: int
    n_symbols: int
    tables: list[Table]
    seg_end: np.ndarray  # uint32 (S,)
    words: np.ndarray  # uint16 (W,)

    @property
    def n_segments(self) -> int:
        return len(self.seg_end)

    @property
    def dq(self) -> bool:
        return self.quantizer == "dq"

    @cached_property
    def lut(self) -> np.ndarray:
        """The decoders' slot table (built once per stream: the KV cache decodes its blocks every step)."""
        from vc_quant.codec.rans.tables import decode_lut

        return decode_lut(self.tables)


def n_segments(n: int, lanes: int, lane_len: int) -> int:
    return math.ceil(n / (lanes * lane_len))


def header_bytes(tables: list[Table], n_segments: int) -> int:
    """Bytes before the words: header, tables, padding, segment offsets (for rate budgets)."""
    size = _HEADER.size + sum(_CONTEXT.size + 2 * len(t.freq) for t in tables)
    return -(-size // 4) * 4 + 4 * n_segments


def pack(stream: RansStream) -> bytes:
    head = _HEADER.pack(MAGIC, VERSION, QUANTIZERS.index(stream.quantizer), PROB_BITS, stream.lanes,
                        stream.lane_len, stream.n_symbols, stream.n_segments)  # fmt: skip
    parts = [head]
    for t in stream.tables:
        parts += [_CONTEXT.pack(t.kmin, len(t.freq)), t.freq.astype("<u2").tobytes()]
    size = sum(len(p) for p in parts)
    parts.append(b"\0" * (-size % 4))
    parts += [stream.seg_end.astype("<u4").tobytes(), stream.words.astype("<u2").tobytes()]
    return b"".join(parts)


def parse(buf: np.ndarray, n_symbols: int, name: str = "tensor") -> RansStream:
    """Read and check a stream for a tensor of ``n_symbols`` values (``buf``: uint8, 1-D)."""

    def bad(what: str) -> VcCorruptDataError:
        return VcCorruptDataError(f"{name}: rANS stream {what} (corrupted or crafted record)")

    data = memoryview(np.ascontiguousarray(buf, dtype=np.uint8)).cast("B")
    if len(data) < _HEADER.size:
        raise bad(f"is {len(data)} bytes, shorter than its header")
    magic, version, quant, prob_bits, lanes, lane_len, n, segs = _HEADER.unpack_from(data, 0)
    if magic != MAGIC or version != VERSION:
        raise bad(f"has magic/version {magic!r}/{version}, expected {MAGIC!r}/{VERSION}")
    if quant >= len(QUANTIZERS) or prob_bits != PROB_BITS:
        raise bad(f"has quantizer {quant} / probability bits {prob_bits}")
    quantizer = QUANTIZERS[quant]
    if not 1 <= lanes <= MAX_LANES or not 1 <= lane_len <= MAX_LANE_LEN:
        raise bad(f"has {lanes} lanes of {lane_len} symbols (allowed: 1..{MAX_LANES}, 1..{MAX_LANE_LEN})")
    if n != n_symbols:
        raise bad(f"holds {n} symbols, the tensor has {n_symbols}")
    if segs != n_segments(n, lanes, lane_len):
        raise bad(f"has {segs} segments, {n_segments(n, lanes, lane_len)} expected")
    offset = _HEADER.size
    tables = []
    limit = LEVEL_RANGE[quantizer]
    for _ in range(CONTEXTS[quantizer]):
        if offset + _CONTEXT.size > len(data):
            raise bad("is truncated in its tables")
        kmin, count = _CONTEXT.unpack_from(data, offset)
        offset += _CONTEXT.size
        if count == 0 or kmin < -limit or kmin + count - 1 > limit or offset + 2 * count > len(data):
            raise bad(f"has a table of {count} levels from {kmin} (levels must lie in [-{limit}, {limit}])")
        freq = np.frombuffer(data, dtype="<u2", count=count, offset=offset).astype(np.uint32)
        offset += 2 * count
        if int(freq.sum()) != PROB_SCALE:
            raise bad(f"has a table summing to {int(freq.sum())}, not {PROB_SCALE}")
        tables.append(Table(kmin, freq))
    offset = -(-offset // 4) * 4
    if offset + 4 * segs > len(data) or (len(data) - offset - 4 * segs) % 2:
        raise bad("is truncated in its segment offsets")
    seg_end = np.frombuffer(data, dtype="<u4", count=segs, offset=offset).astype(np.uint32)
    offset += 4 * segs
    n_words = (len(data) - offset) // 2
    words = np.frombuffer(data, dtype="<u2", count=n_words, offset=offset)
    ends = seg_end.astype(np.int64)
    sizes = np.diff(np.concatenate([[0], ends]))
    if segs and (ends[-1] != n_words or bool((sizes < 2 * lanes).any())):
        raise bad(f"segment offsets do not cover its {n_words} words")
    if n_words > n + 2 * lanes * segs:  # every symbol adds at most one word
        raise bad(f"has {n_words} words, more than {n} symbols can produce")
    return RansStream(quantizer, lanes, lane_len, n, tables, seg_end, words)
