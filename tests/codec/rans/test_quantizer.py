"""Rate–distortion quantization and the rate control: on target by computation, near the Shannon bound."""

import math

import numpy as np
import pytest

from vc_quant.codec.rans import quantizer as qz


def _gaussian(rows: int, cols: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.5, 2.0, size=(rows, 1))  # rows of different variance, as real rotated weights
    return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)


def _rel_mse(x: np.ndarray, lv: qz.Levels) -> float:
    if lv.quantizer == "scalar":
        r = lv.k.astype(np.float64)
    else:
        r = np.where(lv.ctx == 1, 2 * lv.k - np.sign(lv.k), 2 * lv.k).astype(np.float64)
    return float(((r * lv.step - x.reshape(-1)) ** 2).sum() / (x.astype(np.float64) ** 2).sum())


@pytest.mark.parametrize("quantizer", ["dq", "scalar"])
@pytest.mark.parametrize("bits", [2.0, 3.0, 4.0])
def test_rate_lands_within_a_hundredth_of_a_bit(quantizer, bits):
    x = _gaussian(512, 768)  # 393k values: searched on a sample, then one or two full passes
    lv, stats = qz.search_step(x, bits, 0.0, quantizer)
    assert abs(lv.stream_bits() / lv.n - bits) <= 0.01
    assert stats.passes_full <= 3


def test_fixed_bits_are_part_of_the_budget():
    x = _gaussian(256, 512)
    lv, _ = qz.search_step(x, 3.0, fixed_bits=0.25 * x.size, quantizer="dq")
    assert abs(lv.stream_bits() / lv.n + 0.25 - 3.0) <= 0.01


def test_trellis_beats_scalar_quantization_at_equal_rate():
    x = _gaussian(256, 1024)
    mse = {}
    for quantizer in ("dq", "scalar"):
        lv, _ = qz.search_step(x, 2.5, 0.0, quantizer)
        mse[quantizer] = _rel_mse(x, lv) / 2.0 ** (-2 * lv.stream_bits() / lv.n)
    # measured on Gaussians and on real weights: dq ~1.15x the Shannon bound, scalar RDOQ ~1.43x
    assert mse["dq"] < 1.25
    assert mse["scalar"] < 1.5
    assert mse["dq"] < 0.9 * mse["scalar"]


def test_search_is_deterministic():
    x = _gaussian(128, 512)
    a, _ = qz.search_step(x, 2.5, 0.0, "dq")
    b, _ = qz.search_step(x, 2.5, 0.0, "dq")
    assert a.step == b.step and np.array_equal(a.k, b.k)


def test_rows_too_large_for_int8_get_their_own_step():
    x = _gaussian(64, 512)
    x[5] *= 40.0  # a row 40x the others (rotated Qwen2.5 weights: up to 16x)
    lv, _ = qz.search_step(x, 4.0, 0.0, "dq")
    r = np.where(lv.ctx == 1, 2 * lv.k.astype(np.int64) - np.sign(lv.k), 2 * lv.k.astype(np.int64))
    assert np.abs(r).max() <= 127
    assert lv.row_steps is not None
    assert lv.row_steps[5] >= np.abs(x[5]).max() / 127  # the big row: the finest step that holds its peak
    others = np.delete(lv.row_steps, 5)
    assert np.all(others == np.float32(np.float16(lv.step)))  # every other row keeps the tensor's step
    err = ((r.reshape(x.shape) * lv.row_steps[:, None] - x) ** 2).sum(axis=1)
    assert np.delete(err, 5).sum() / (np.delete(x, 5, axis=0) ** 2).sum() < 0.007  # ~4 bits everywhere else


def test_one_step_when_every_row_fits():
    lv, _ = qz.search_step(_gaussian(64, 512), 3.0, 0.0, "dq")
    assert lv.row_steps is None


def test_small_tensors_get_fewer_lanes():
    assert qz.plan_lanes(10) == (1, 10)
    assert qz.plan_lanes(24_576) == (6, 4096)
    assert qz.plan_lanes(1 << 20) == (32, 4096)


def test_guess_is_the_high_rate_gaussian_step():
    assert math.isclose(qz.guess_log_step(3.0, "scalar"), math.log2(math.sqrt(2 * math.pi * math.e)) - 3.0 + 0.1)


def test_row_stats_are_numpys_sum_of_squares_and_row_peaks():
    x = _gaussian(37, 203, seed=4)  # columns not a multiple of the kernel's 8 partial sums
    sumsq, peak = qz.row_stats(x)
    assert np.array_equal(peak, np.abs(x).max(axis=1))
    assert sumsq == pytest.approx(float(np.square(x, dtype=np.float64).sum()), rel=1e-12)
