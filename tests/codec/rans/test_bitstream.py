"""Untrusted rANS records: every damaged or crafted stream is refused with VcCorruptDataError, nothing else.

Random damage is caught by the record's CRC32; crafted records (damage plus a recomputed
CRC) must be caught by the stream's own checks — sizes against the tensor before anything
is allocated, table sums, segment offsets, and the decoder's invariants (no overrun, every
word used, every lane back at the encoder's initial state).
"""

import struct
import time
import tracemalloc

import numpy as np
import pytest
import torch

from vc_quant import decode_tensor, encode_tensor
from vc_quant.codec.rans import bitstream as bs
from vc_quant.codec.record import EncodedTensor, checksum
from vc_quant.errors import VcCorruptDataError

SHAPE = (96, 640)  # 61k values: 1 segment of 15 lanes


@pytest.fixture(scope="module")
def record() -> EncodedTensor:
    w = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * 0.02
    return encode_tensor(w, 2.5, codec="rans", name="w")


def _copy(enc: EncodedTensor, bitstream: torch.Tensor | None = None, recrc: bool = False) -> EncodedTensor:
    out = EncodedTensor((enc.bitstream if bitstream is None else bitstream).clone(), enc.center.clone(),
                        enc.step.clone(), dict(enc.meta), col_scale=enc.col_scale)  # fmt: skip
    if recrc:
        out.meta["crc32"] = checksum(out)
    return out


def _refused(enc: EncodedTensor) -> None:
    with pytest.raises(VcCorruptDataError):
        enc.verify("w", expect_name="w")
        decode_tensor(enc, name="w")


def test_random_damage_is_always_detected(record):
    rng = np.random.default_rng(0)
    data = record.bitstream.numpy()
    for trial in range(300):
        buf = data.copy()
        if trial % 3 == 0:  # bit flips anywhere
            for pos in rng.integers(0, buf.size, size=rng.integers(1, 9)):
                buf[pos] ^= 1 << int(rng.integers(0, 8))
        elif trial % 3 == 1:  # truncation
            buf = buf[: int(rng.integers(0, buf.size))]
        else:  # a run of random bytes
            start = int(rng.integers(0, buf.size - 8))
            buf[start : start + 8] = rng.integers(0, 256, size=8)
            if np.array_equal(buf, data):
                continue
        _refused(_copy(record, torch.from_numpy(buf)))


def _header(buf: bytearray) -> list:
    return list(struct.unpack_from("<4sBBBBIQI", buf, 0))


def _with_header(data: np.ndarray, **fields) -> torch.Tensor:
    buf = bytearray(data.tobytes())
    names = ["magic", "version", "quantizer", "prob_bits", "lanes", "lane_len", "n", "segments"]
    values = dict(zip(names, _header(buf), strict=True))
    values.update(fields)
    struct.pack_into("<4sBBBBIQI", buf, 0, *[values[k] for k in names])
    return torch.frombuffer(buf, dtype=torch.uint8)


@pytest.mark.parametrize("fields", [
    {"magic": b"xxxx"}, {"version": 2}, {"quantizer": 7}, {"prob_bits": 15}, {"lanes": 0}, {"lanes": 65},
    {"lane_len": 0}, {"lane_len": 1 << 30}, {"n": 1 << 40}, {"n": 61439}, {"segments": 1 << 31}, {"segments": 2},
])  # fmt: skip
def test_crafted_headers_are_refused_before_any_allocation(record, fields):
    crafted = _copy(record, _with_header(record.bitstream.numpy(), **fields), recrc=True)
    tracemalloc.start()
    try:
        _refused(crafted)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * record.numel + (1 << 20)  # never more than the tensor's own size (+ tables)


def test_crafted_tables_and_offsets_are_refused(record):
    data = record.bitstream.numpy()
    stream = bs.parse(data, record.numel)
    rng = np.random.default_rng(1)
    for trial in range(200):
        s = bs.RansStream(stream.quantizer, stream.lanes, stream.lane_len, stream.n_symbols,
                          [bs.Table(t.kmin, t.freq.copy()) for t in stream.tables], stream.seg_end.copy(),
                          stream.words)  # fmt: skip
        t = s.tables[trial % len(s.tables)]
        kind = trial % 4
        if kind == 0:  # frequencies that do not sum to 4096
            t.freq[int(rng.integers(0, len(t.freq)))] += int(rng.integers(1, 100))
        elif kind == 1:  # levels outside the quantizer's range
            s.tables[trial % len(s.tables)] = bs.Table(int(rng.integers(60, 120)), t.freq)
        elif kind == 2:  # segment offsets that do not cover the words
            delta = int(rng.integers(1, 50)) * (1 if trial % 8 == 2 else -1)
            s.seg_end[-1] = np.uint32(int(s.seg_end[-1]) + delta)
        else:  # words appended or removed
            cut = int(rng.integers(1, 20))
            s.words = s.words[:-cut] if trial % 8 == 3 else np.concatenate([s.words, s.words[:cut]])
        _refused(_copy(record, torch.frombuffer(bytearray(bs.pack(s)), dtype=torch.uint8), recrc=True))


def test_crafted_word_flips_are_caught_by_the_stream_invariants(record):
    """A flipped data word with a valid CRC: the lanes drift off the encoder's path and end elsewhere."""
    data = record.bitstream.numpy()
    stream = bs.parse(data, record.numel)
    rng = np.random.default_rng(2)
    started = time.monotonic()
    for _ in range(300):
        words = stream.words.copy()
        pos = int(rng.integers(0, words.size))
        words[pos] ^= np.uint16(1 << int(rng.integers(0, 16)))
        s = bs.RansStream(stream.quantizer, stream.lanes, stream.lane_len, stream.n_symbols, stream.tables,
                          stream.seg_end, words)  # fmt: skip
        _refused(_copy(record, torch.frombuffer(bytearray(bs.pack(s)), dtype=torch.uint8), recrc=True))
    assert time.monotonic() - started < 60  # no hang: every decode is bounded by the tensor's size


def test_metadata_must_match_the_stream(record):
    crafted = _copy(record)
    crafted.meta["quantizer"] = "scalar"
    crafted.meta["crc32"] = checksum(crafted)
    _refused(crafted)
    crafted = _copy(record)
    crafted.meta["shape"] = [SHAPE[0] * 2, SHAPE[1]]
    crafted.meta["crc32"] = checksum(crafted)
    _refused(crafted)
    crafted = _copy(record)
    crafted.meta["format"] = 2  # rANS records exist from format 3 on
    crafted.meta["crc32"] = checksum(crafted)
    _refused(crafted)
    crafted = _copy(record)
    crafted.step = torch.tensor([[-1.0]])
    crafted.meta["crc32"] = checksum(crafted)
    _refused(crafted)
