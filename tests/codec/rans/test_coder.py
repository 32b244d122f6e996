"""The rANS stream: levels → words → levels, by the native decoder and the NumPy reference."""

import numpy as np
import pytest

from vc_quant.codec.rans import bitstream as bs
from vc_quant.codec.rans import coder, native, reference
from vc_quant.codec.rans import quantizer as qz
from vc_quant.codec.rans import tables as tb
from vc_quant.errors import VcCorruptDataError


def _levels(n: int, quantizer: str, lanes: int, lane_len: int, seed: int = 0, bits: float = 2.5) -> qz.Levels:
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32).reshape(1, n)
    lv, _ = qz.search_step(x, bits, 0.0, quantizer, lanes=lanes, lane_len=lane_len)
    return lv


def _reconstruction(lv: qz.Levels) -> np.ndarray:
    return qz.reconstruction_integers(lv)  # what keep_samples records carry: must equal the decoders' output


def _roundtrip(lv: qz.Levels) -> tuple[bs.RansStream, np.ndarray]:
    packed = bs.pack(coder.encode_stream(lv))
    stream = bs.parse(np.frombuffer(packed, dtype=np.uint8), lv.n)
    out = np.empty(lv.n, dtype=np.int8)
    coder.decode_levels(stream, out)
    return stream, out


@pytest.mark.parametrize("quantizer", ["dq", "scalar"])
@pytest.mark.parametrize(("n", "lanes", "lane_len"), [(1, 1, 1), (1000, 1, 1000), (5000, 4, 256), (70001, 32, 512),
                                                      (4096, 64, 64)])  # fmt: skip
def test_levels_round_trip_exactly(quantizer, n, lanes, lane_len):
    lv = _levels(n, quantizer, lanes, lane_len)
    stream, out = _roundtrip(lv)
    assert np.array_equal(out, _reconstruction(lv))
    ref = np.empty(lv.n, dtype=np.int8)
    assert np.array_equal(reference.decode(stream, ref), out)  # the spec-as-code decoder agrees bit for bit


def test_decoding_on_several_threads_gives_the_same_integers():
    lv = _levels(300_000, "dq", 8, 1024)
    stream, one = _roundtrip(lv)
    assert stream.n_segments > 4
    many = np.empty_like(one)
    coder.decode_levels(stream, many, workers=2)
    assert np.array_equal(one, many)


def test_rate_from_the_tables_is_the_coded_size():
    lv = _levels(200_000, "dq", 32, 1024, bits=3.0)
    packed = bs.pack(coder.encode_stream(lv))
    assert abs(8 * len(packed) - lv.stream_bits()) <= 16 * lv.lanes  # a few bits per lane of rounding


def test_constant_input_codes_to_almost_nothing():
    x = np.zeros((64, 128), dtype=np.float32)
    lv, _ = qz.search_step(x, 2.0, 0.0, "dq")
    _, out = _roundtrip(lv)
    assert not out.any()
    assert lv.stream_bits() / lv.n < 0.2  # header, one-level tables and lane states only


def test_quantize_counts_sums_to_the_scale_and_keeps_every_seen_level():
    counts = np.zeros(tb.N_LEVELS, dtype=np.int64)
    counts[tb.LEVEL_MAX - 3 : tb.LEVEL_MAX + 4] = [1, 50, 4000, 100000, 4000, 50, 1]
    t = tb.quantize_counts(counts)
    assert int(t.freq.sum()) == tb.PROB_SCALE
    assert (t.freq >= 1).all() and t.kmin == -3 and t.kmax == 3
    assert tb.quantize_counts(counts).freq.tolist() == t.freq.tolist()  # deterministic


def test_zero_count_levels_inside_the_range_get_no_probability():
    counts = np.zeros(tb.N_LEVELS, dtype=np.int64)
    counts[tb.LEVEL_MAX - 2] = 10
    counts[tb.LEVEL_MAX + 2] = 30
    t = tb.quantize_counts(counts)
    assert t.freq.tolist()[1:4] == [0, 0, 0] and int(t.freq.sum()) == tb.PROB_SCALE


@pytest.mark.parametrize("quantizer", ["dq", "scalar"])
def test_damaged_words_in_the_32_lane_decoder_are_refused(quantizer):
    """The 32-lane specialisation skips bounds checks while a round has a word per lane left;
    flipped and missing words must still be reported, never read past the segment."""
    lv = _levels(3 * 32 * 512 + 77, quantizer, 32, 512, seed=3)
    stream = coder.encode_stream(lv)
    assert stream.n_segments == 4
    out = np.empty(lv.n, dtype=np.int8)
    rng = np.random.default_rng(4)
    for trial in range(120):
        words, seg_end = stream.words.copy(), stream.seg_end.copy()
        if trial % 2:
            words[int(rng.integers(0, words.size))] ^= np.uint16(1 << int(rng.integers(0, 16)))
        else:  # the last segment loses its last few words
            cut = int(rng.integers(1, 40))
            words, seg_end[-1] = words[:-cut], seg_end[-1] - cut
        damaged = bs.RansStream(stream.quantizer, stream.lanes, stream.lane_len, stream.n_symbols, stream.tables,
                                seg_end, words)  # fmt: skip
        with pytest.raises(VcCorruptDataError):
            coder.decode_levels(damaged, out, workers=1)


@pytest.fixture
def scalar_and_simd():
    """Runs the body's decodes with the SSE4.1 rounds off, then on; restores the default."""
    default = native.simd_decoder()
    if not native.simd_decoder(True):
        pytest.skip("this CPU has no SSE4.1: only the scalar decoder exists here")
    yield native.simd_decoder
    native.simd_decoder(default)


def _decode_both(stream: bs.RansStream, switch) -> tuple[np.ndarray | str, np.ndarray | str]:
    results = []
    for enabled in (False, True):
        switch(enabled)
        out = np.empty(stream.n_symbols, dtype=np.int8)
        try:
            results.append(coder.decode_levels(stream, out, workers=1))
        except VcCorruptDataError as exc:
            results.append(str(exc))
    return results[0], results[1]


@pytest.mark.parametrize("quantizer", ["dq", "scalar"])
@pytest.mark.parametrize("lanes", [32, 4, 8, 12, 64, 7])  # 7: not a multiple of 4, scalar rounds only
def test_the_sse41_decoder_gives_the_scalar_decoders_integers(scalar_and_simd, quantizer, lanes):
    for seed, bits in enumerate([0.6, 2.5, 4.0, 7.0]):  # few to many words per symbol, levels up to the limit
        lv = _levels(lanes * 700 + 13 * seed, quantizer, lanes, 256, seed=seed, bits=bits)
        stream = coder.encode_stream(lv)
        scalar, simd = _decode_both(stream, scalar_and_simd)
        assert np.array_equal(scalar, _reconstruction(lv)) and np.array_equal(simd, scalar)


@pytest.mark.parametrize("quantizer", ["dq", "scalar"])
def test_the_sse41_decoder_refuses_damaged_streams_as_the_scalar_one_does(scalar_and_simd, quantizer):
    lv = _levels(3 * 32 * 512 + 77, quantizer, 32, 512, seed=5)
    stream = coder.encode_stream(lv)
    rng = np.random.default_rng(6)
    for trial in range(60):
        words, seg_end = stream.words.copy(), stream.seg_end.copy()
        if trial % 2:
            words[int(rng.integers(0, words.size))] ^= np.uint16(1 << int(rng.integers(0, 16)))
        else:
            cut = int(rng.integers(1, 40))
            words, seg_end[-1] = words[:-cut], seg_end[-1] - cut
        damaged = bs.RansStream(stream.quantizer, stream.lanes, stream.lane_len, stream.n_symbols, stream.tables,
                                seg_end, words)  # fmt: skip
        scalar, simd = _decode_both(damaged, scalar_and_simd)
        assert isinstance(scalar, str) and simd == scalar  # refused, with the same reason
