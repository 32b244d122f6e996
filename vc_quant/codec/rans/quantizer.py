"""Rate–distortion quantization of rotated values and the rate control that needs no trial encodes.

Two quantizers, both on one step ``Δ`` per tensor (after the rotation every row is close to
Gaussian; one step for all rows is the equal-slope, MSE-optimal choice, measured better
than a step per row at equal rate, docs/rans.md):

* ``"scalar"`` — uniform reconstruction ``kΔ``; each value takes the nearest level or the
  next one toward zero, whichever costs less in ``(v - k)² + λ·bits(k)`` (RDOQ).
* ``"dq"`` — dependent (trellis-coded) quantization as in H.266/VVC: two quantizers
  (``2kΔ`` and ``(2k - sgn k)Δ``) and four states driven by the parity of ``k``; a Viterbi
  search per lane picks the levels. The reconstruction is still an integer multiple of
  ``Δ`` (an int8), so decoded levels are directly the int8 residency's samples.

The rate is computed from the frequency tables (:mod:`~vc_quant.codec.rans.tables`),
so the step that hits a budget is found by computation: a few quantizer passes over a
sample of rows, then one (rarely two) passes over the whole tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from vc_quant.codec.rans import native
from vc_quant.codec.rans import tables as tb
from vc_quant.codec.rans.bitstream import CONTEXTS, header_bytes, n_segments

#: highest rate the int8 reconstruction integers reach on Gaussian data (the step floor keeps
#: the largest value representable; measured saturation ~5.9 dq, ~6.7 scalar): callers that
#: plan rates (the bit allocation) stay below it
MAX_RATE = {"dq": 5.5, "scalar": 6.5}
#: λ in units of the squared step per bit, measured per quantizer (scripts/rans_lambda.py)
DEFAULT_LAMBDA = {"scalar": 0.10, "dq": 0.45}
DEFAULT_LANES = 32
DEFAULT_LANE_LEN = 4096
_SAMPLE_MIN = 1 << 15  # values a rate-search sample holds at least
_SAMPLE_BELOW = 1 << 16  # smaller tensors are searched on all their values
_SETTLED = 0.003  # bits per symbol: the level costs moved less than this in the last pass
_MODEL_VALUES = 1 << 15  # synthetic Gaussian values the starting costs settle on
_MODEL_BUCKETS = 20  # starting costs are cached per 1/20 of log2 step
_REFINE = 3  # cost refinement passes near the target rate
_AIM = 0.6  # the search aims inside this share of the tolerance (estimates are ~1e-4 bpv off the coded size)
_OVER_RELAX = 1.0  # cost update: new + w (new - old); measured: 1 settles in half the passes, 2 diverges


def plan_lanes(n: int, lanes: int = DEFAULT_LANES, lane_len: int = DEFAULT_LANE_LEN) -> tuple[int, int]:
    """``(G, L)``: lanes per segment and symbols per lane; small tensors get fewer lanes (each costs 32 bits)."""
    if n >= lanes * lane_len:
        return lanes, lane_len
    g = max(1, min(lanes, math.ceil(n / lane_len)))
    return g, math.ceil(n / g)


@dataclass
class Levels:
    """Quantized values of one tensor and everything the coder needs for them."""

    k: np.ndarray  # int8 levels (n,)
    ctx: np.ndarray | None  # uint8 context of every symbol (dq), None for scalar
    counts: np.ndarray  # int64 (contexts, 255)
    tables: list[tb.Table]
    step: float
    #: float32 (rows,) fp16-exact steps when some rows needed a coarser one (RowFloors), else None
    row_steps: np.ndarray | None
    sqerr: float  # squared error in units of step² (NaN unless asked for)
    quantizer: str
    lanes: int
    lane_len: int

    @property
    def n(self) -> int:
        return self.k.size

    def stream_bits(self) -> float:
        """Bits of the whole rANS stream (header, tables, offsets, states, words), from the tables."""
        segs = n_segments(self.n, self.lanes, self.lane_len)
        payload = sum(tb.payload_bits(c, t) for c, t in zip(self.counts, self.tables, strict=True))
        # each lane's final state (32 bits, stored) carries ~8 bits of the payload on average
        data_words = max(0.0, payload / 16 - 0.5 * self.lanes * segs)
        return 8 * header_bytes(self.tables, segs) + 32 * self.lanes * segs + 16 * math.ceil(data_words)


def quantize(
    x: np.ndarray, step: float, quantizer: str, lam: float, costs: np.ndarray, lanes: int, lane_len: int,
    error: bool = False,
) -> Levels:
    """Quantize ``x`` (float32, 1-D) at ``step`` with the level costs ``costs`` ([context × 255] bits).

    ``error``: also sum the squared error (``Levels.sqerr``; NaN otherwise — the rate control needs none)."""
    lib = native.lib()
    n = x.size
    k = np.empty(n, dtype=np.int8)
    counts = np.zeros((CONTEXTS[quantizer], tb.N_LEVELS), dtype=np.int64)
    err = np.zeros(1, dtype=np.float64) if error else None
    costs = np.ascontiguousarray(costs, dtype=np.float64)
    inv = np.float32(1.0 / step)
    if quantizer == "scalar":
        ctx = None
        lib.vc_sq_quantize(native.ptr(x), n, inv, lam, native.ptr(costs), native.ptr(k), native.ptr(counts),
                           native.ptr(err))  # fmt: skip
    else:
        ctx = np.empty(n, dtype=np.uint8)
        if lib.vc_dq_quantize(native.ptr(x), n, inv, lanes, lane_len, lam, native.ptr(costs), native.ptr(k),
                              native.ptr(ctx), native.ptr(counts), native.ptr(err)) != 0:  # fmt: skip
            raise MemoryError("rANS quantizer: out of memory")
    tables = [tb.quantize_counts(c) if c.any() else tb.quantize_counts(_zero_counts()) for c in counts]
    return Levels(k, ctx, counts, tables, float(step), None, float(err[0]) if error else float("nan"), quantizer,
                  lanes, lane_len)  # fmt: skip


def reconstruction_integers(levels: Levels) -> np.ndarray:
    """The int8 reconstruction integers of ``levels`` (``k`` itself for the scalar quantizer; DQ maps each
    level through its quantizer): what the decoders return for the coded stream."""
    if levels.ctx is None:
        return levels.k
    out = np.empty_like(levels.k)
    native.lib().vc_dq_reconstruct(native.ptr(levels.k), native.ptr(levels.ctx), levels.n, native.ptr(out))
    return out


def _zero_counts() -> np.ndarray:
    c = np.zeros(tb.N_LEVELS, dtype=np.int64)
    c[tb.LEVEL_MAX] = 1  # an empty context still needs a valid table: level 0
    return c


def table_costs(levels: Levels) -> np.ndarray:
    return np.concatenate([tb.cost_array(t) for t in levels.tables])


class RowFloors:
    """The finest step each row can use: its reconstruction integers must hold its peak (|S| <= 127).

    One step for the whole tensor is the equal-slope, MSE-optimal choice — but a row whose
    values are far larger than the tensor's (rotated Qwen2.5 weights: row RMS up to 16x the
    tensor's) would then need reconstruction integers beyond int8, and one tensor-wide floor
    would coarsen every row. So rows keep the tensor's step where it fits and take the finest
    one that fits where it does not; the record then stores an fp16 step per row (16 bits a row,
    only for tensors that need it).
    """

    def __init__(self, peak: np.ndarray) -> None:
        """``peak``: each row's largest |value| (:func:`row_stats`)."""
        peak = peak.astype(np.float64) if peak.size else np.zeros(1)
        self.floor = np.maximum(peak / tb.LEVEL_MAX, np.finfo(np.float32).tiny)

    def steps(self, step: float) -> np.ndarray | None:
        """Per-row steps (fp16-exact, float32) at the tensor step ``step``, or None when every row fits it."""
        if step >= float(self.floor.max()):
            return None
        bound = self.floor > step
        want = np.where(bound, self.floor, step)
        s16 = want.astype(np.float16)
        low = bound & (s16.astype(np.float64) < want)  # a bound row's peak must stay inside int8 after storage
        s16[low] = np.nextafter(s16[low], np.float16(np.inf))
        return s16.astype(np.float32)

    @property
    def finest(self) -> float:
        return float(self.floor.min())


def row_stats(x2d: np.ndarray) -> tuple[float, np.ndarray]:
    """``(sum of squares, each row's peak |value|)`` of a C-contiguous float32 ``(rows, cols)`` matrix, in one
    native pass (deterministic: the same on every machine)."""
    rows, cols = x2d.shape
    peak = np.empty(rows, dtype=np.float32)
    sumsq = np.zeros(1, dtype=np.float64)
    native.lib().vc_row_stats(native.ptr(x2d), rows, cols, native.ptr(sumsq), native.ptr(peak))
    return float(sumsq[0]), peak


@dataclass
class StepSearch:
    """What the rate control did (encoder-side facts, not stored)."""

    passes_sample: int = 0
    passes_full: int = 0
    e_start: float = 0.0
    e_final: float = 0.0
    rate: float = 0.0  # achieved all-in bits per value (estimated from the tables)


def guess_log_step(target: float, quantizer: str) -> float:
    """log2(Δ/σ) that gives ``target`` bits for a Gaussian at high rate (ECSQ: Δ = σ·√(2πe)·2^-R)."""
    # the DQ step is half of each of its two quantizers' step; both start a little coarser (deadzone)
    return math.log2(math.sqrt(2 * math.pi * math.e)) - target + (-1.0 if quantizer == "dq" else 0.0) + 0.1


def search_step(
    x2d: np.ndarray, target_bits: float, fixed_bits: float, quantizer: str, lam: float | None = None,
    tolerance: float = 0.01, lanes: int = DEFAULT_LANES, lane_len: int = DEFAULT_LANE_LEN,
    e_guess: float | None = None, predict: bool = False, payload_only: bool = False, steps_per_row: bool = False,
) -> tuple[Levels, StepSearch]:  # fmt: skip
    """Quantize ``x2d`` (rows × cols float32) so the record lands on ``target_bits`` per value all-in.

    ``fixed_bits``: bits of the record outside the rANS stream and the step (metadata, column
    scales); the step costs 32 bits, or 16 per row when rows need their own (:class:`RowFloors`,
    or always with ``steps_per_row``). ``predict``: one pass at ``e_guess`` (streams of similar
    tensors learn the offset), no search. ``payload_only``: aim the coded symbols alone at
    ``target_bits`` (tiny tensors, whose headers exceed any budget, get a large tensor's step).
    """
    lam = DEFAULT_LAMBDA[quantizer] if lam is None else lam
    x2d = np.ascontiguousarray(x2d, dtype=np.float32).reshape(-1, x2d.shape[-1] if x2d.ndim else 1)
    n = x2d.size
    rows = x2d.shape[0]
    g, ln = plan_lanes(n, lanes, lane_len)
    sumsq, peak = row_stats(x2d)
    sigma = math.sqrt(sumsq / n) if n else 0.0
    floors = RowFloors(peak)
    stats = StepSearch()
    sample2d, scale = _sample(x2d, n)
    whole = scale == 1.0  # small tensors: the search runs on all values, its passes are the full ones

    def pass_on(part: np.ndarray, e: float, costs: np.ndarray) -> Levels:
        step = (sigma or 1.0) * 2.0**e  # an all-zero tensor codes at any step
        row_steps = floors.steps(step)
        y = part if row_steps is None else part * (np.float32(step) / row_steps)[:, None]
        lv = quantize(np.ascontiguousarray(y).reshape(-1), step, quantizer, lam, costs, g, ln)
        lv.row_steps = row_steps
        return lv

    def rate_of(lv: Levels, scale: float) -> float:  # all-in bits per value, the payload scaled to the tensor
        segs = n_segments(n, g, ln)
        payload = sum(tb.payload_bits(c, t) for c, t in zip(lv.counts, lv.tables, strict=True)) * scale
        if payload_only:
            return payload / n
        stream = 8 * header_bytes(lv.tables, segs) + 32 * g * segs + max(0.0, payload - 8 * g * segs)
        step_bits = 16 * rows if steps_per_row or lv.row_steps is not None else 32
        return (stream + step_bits + fixed_bits) / n

    if sigma == 0.0:  # all zeros: one level, nothing to search
        lv = pass_on(x2d, 0.0, tb.gaussian_costs(1.0, quantizer))
        stats.passes_full = 1
        stats.rate = rate_of(lv, 1.0)
        return lv, stats
    # below this every row is at its floor and the rate cannot grow further
    floor_e = math.log2(floors.finest / sigma) - 1.0
    e = guess_log_step(target_bits, quantizer) if e_guess is None else e_guess
    e = max(e, floor_e)
    stats.e_start = e

    costs = model_costs(quantizer, lam, e)
    if predict:
        lv = pass_on(x2d, e, costs)
        stats.passes_full, stats.e_final = 1, e
        stats.rate = rate_of(lv, 1.0)
        return lv, stats

    best: list = []  # [rate, levels, e] closest to the target

    def consider(r: float, lv: Levels, at: float) -> None:
        if not best or abs(r - target_bits) < abs(best[0] - target_bits):
            best[:] = [r, lv, at]

    # 1) step and level costs together on the sample. The table and the rate-distortion
    #    decisions feed each other and settle slowly (measured, dq at 2.5 bits: MSE x bound 1.23
    #    after one pass from a smooth model, 1.16 after ~7). So, in three phases:
    #    a. far from the target rate: jump along the rate curve (~ -1 bit per unit of log2
    #       step) and restart from the settled Gaussian costs of the new step (cached);
    #    b. near it: _REFINE passes of over-relaxed cost updates (settle in ~3), small step moves;
    #    c. costs locked: root-find the step (the rate is then monotone and smooth in e).
    slope = -1.0
    last: tuple[float, float] | None = None
    refine = 0
    for _ in range(16):
        lv = pass_on(sample2d, e, costs)
        r = rate_of(lv, scale)
        stats.passes_sample += 1
        locked = refine >= _REFINE
        if whole and locked:
            consider(r, lv, e)
        if locked and abs(r - target_bits) <= _AIM * tolerance:
            break
        if last is not None and abs(e - last[0]) > 0.02 and -2.0 < (r - last[1]) / (e - last[0]) < -0.3:
            slope = (r - last[1]) / (e - last[0])
        last = (e, r)
        e = max(floor_e, e + max(-2.0, min(2.0, (target_bits - r) / slope)))
        if locked:
            continue
        if refine == 0 and abs(r - target_bits) > 4 * tolerance:
            costs = model_costs(quantizer, lam, e)
        else:
            new_costs = table_costs(lv)
            refine += 1
            costs = new_costs if refine == _REFINE else np.clip(
                new_costs + _OVER_RELAX * (new_costs - costs), 0.0, 4.0 * tb.PROB_BITS)
    if whole and not best:
        consider(r, lv, e)
    # 2) the whole tensor with the same costs, corrected along the measured slope if it missed
    if not whole:
        for _ in range(3):
            lv = pass_on(x2d, e, costs)
            stats.passes_full += 1
            r = rate_of(lv, 1.0)
            consider(r, lv, e)
            if abs(r - target_bits) <= _AIM * tolerance:
                break
            e = max(floor_e, e + max(-1.0, min(1.0, (target_bits - r) / slope)))
    else:
        stats.passes_full, stats.passes_sample = stats.passes_sample, 0
    stats.rate, lv, stats.e_final = best
    return lv, stats


@lru_cache(maxsize=512)
def _model_costs(quantizer: str, lam: float, e_bucket: int) -> np.ndarray:
    e = e_bucket / _MODEL_BUCKETS
    x = np.random.default_rng(0).standard_normal(_MODEL_VALUES).astype(np.float32)
    g, ln = plan_lanes(x.size)
    costs = tb.gaussian_costs(2.0**-e, quantizer)
    for _ in range(12):
        lv = quantize(x, 2.0**e, quantizer, lam, costs, g, ln)
        new = table_costs(lv)
        settled = _cost_drift(lv, costs, new) < _SETTLED / 3
        costs = new
        if settled:
            break
    costs.setflags(write=False)
    return costs


def model_costs(quantizer: str, lam: float, e: float) -> np.ndarray:
    """Settled level costs for a unit Gaussian at log2 step ``e`` (cached): where the search starts.

    After the rotation real rows are close to Gaussian, so the search on real values then
    needs ~2 passes to settle instead of ~7 from a smooth model (the iteration between
    the table and the rate-distortion decisions is slow). Deterministic (fixed seed)."""
    return _model_costs(quantizer, float(lam), round(e * _MODEL_BUCKETS))


def _cost_drift(lv: Levels, old: np.ndarray, new: np.ndarray) -> float:
    """Mean change in bits per symbol between two cost tables, weighted by the symbols coded."""
    counts = lv.counts.reshape(-1).astype(np.float64)
    return float((counts * np.abs(new - old)).sum() / max(counts.sum(), 1.0))


def _sample(x2d: np.ndarray, n: int) -> tuple[np.ndarray, float]:
    """A rate-search sample of ``x2d``: every row, evenly strided columns (after the rotation the
    columns of a row are exchangeable, rows are not: their variances differ), at least
    ``_SAMPLE_MIN`` values; small tensors are searched whole. Returns the sample (rows × some
    columns) and n / its size."""
    if n < _SAMPLE_BELOW:
        return x2d, 1.0
    stride = max(1, min(x2d.shape[1], n // _SAMPLE_MIN))
    sample = np.ascontiguousarray(x2d[:, ::stride])
    return sample, n / sample.size
