"""Rate control: find the quantiser setting that lands on a fractional bit budget.

The codec has one continuous knob, the *effective log step* ``e`` = log2 of the
quantiser step measured in value units. It is realised as an integer QP plus a
pixel amplitude in (2^-1/6, 1] (see :func:`split_log_step`), so any fractional
rate is reachable with a single QP per picture. Rate falls monotonically with
``e`` (about one bit per unit at high rate, less at low rate).

The search spends encodes where they are cheap: a few encodes of a small
*sample* of the tensor fit the local rate curve; the full tensor is then encoded
at the predicted point and corrected by a secant step if it missed. On average
this costs little more than one full encode per tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


def split_log_step(e: float, log2_step: Callable[[int], float], qp_min: int, qp_max: int) -> tuple[int, float]:
    """Effective log step → ``(qp, amplitude)`` with amplitude in (2^-1/6, 1] where possible."""
    qp = qp_min
    for q in range(qp_min, qp_max + 1):
        if log2_step(q) <= e + 1e-12:
            qp = q
    amplitude = 2.0 ** (log2_step(qp) - e)
    return qp, min(amplitude, 1.0)


@dataclass
class Trial(Generic[T]):
    e: float
    rate: float  # bits per value, all-in
    result: T


def _secant(e0: float, r0: float, e1: float, r1: float, target: float, fallback_slope: float) -> float:
    slope = (r1 - r0) / (e1 - e0) if abs(e1 - e0) > 1e-9 else fallback_slope
    if not slope < -1e-3:  # rate must fall as the step grows; guard against noise
        slope = fallback_slope
    return e1 + (target - r1) / slope


def search_rate(
    sample_rate: Callable[[float], float],
    full_encode: Callable[[float], Trial[T]],
    target: float,
    e_start: float,
    tolerance: float,
    e_bounds: tuple[float, float] = (-4.0, 16.0),
    max_full: int = 6,
) -> tuple[Trial[T], list[Trial[T]]]:
    """Find ``e`` whose full encode lands within ``tolerance`` of ``target`` bits/value.

    ``sample_rate(e)`` predicts bits/value from a small sample; ``full_encode(e)``
    encodes everything and reports the all-in rate. Returns the trial closest to
    the target (the caller judges a miss) and all full trials. x265's rate is
    locally noisy (jumps of up to ~0.1 bit between amplitudes 1% apart), so a
    miss is retried with secant steps up to ``max_full`` encodes.
    """
    lo, hi = e_bounds

    def clamp(e: float, around: float) -> float:
        # at most 3 units (~18 QP) per step: the rate curve is far from linear
        return min(max(e, lo, around - 3.0), hi, around + 3.0)

    # 1) Fit the local rate curve on the sample: two probes, then one refinement.
    e0 = min(max(e_start, lo), hi)
    r0 = sample_rate(e0)
    e1 = clamp(e0 + (0.5 if r0 > target else -0.5), e0)
    r1 = sample_rate(e1)
    slope = (r1 - r0) / (e1 - e0) if abs(e1 - e0) > 1e-9 else -1.0  # e1 == e0 when e0 sits on a bound
    if not slope < -1e-3:
        slope = -1.0
    near = min(((e0, r0), (e1, r1)), key=lambda p: abs(p[1] - target))
    e2 = clamp(_secant(e0, r0, e1, r1, target, slope), near[0])
    r2 = sample_rate(e2)
    if abs(e2 - near[0]) > 1e-6 and (r2 - near[1]) / (e2 - near[0]) < -1e-3:
        slope = (r2 - near[1]) / (e2 - near[0])  # the local slope, nearest the target
    e_pred = clamp(_secant(near[0], near[1], e2, r2, target, slope), e2)
    # 2) Full encodes, corrected by secant steps through the full-rate points.
    trials: list[Trial[T]] = []
    e = e_pred
    for _ in range(max_full):
        trial = full_encode(e)
        trials.append(trial)
        if abs(trial.rate - target) <= tolerance:
            return trial, trials
        if len(trials) == 1:
            e = clamp(trial.e + (target - trial.rate) / slope, trial.e)
        else:
            a, b = sorted(trials[-2:], key=lambda t: t.e)
            e = clamp(_secant(a.e, a.rate, b.e, b.rate, target, slope), trial.e)
        if not math.isfinite(e):
            break
    best = min(trials, key=lambda t: abs(t.rate - target))
    return best, trials


class StepPredictor:
    """Learns, per stream, how far the codec's high-rate step guess is off, from the rates it got.

    Callers that encode a stream of similar tensors once each (KV-cache blocks, gradient
    buckets, activations crossing a pipeline boundary) ask :meth:`encode_options` for the
    codec options of the next tensor and report the all-in rate they got with
    :meth:`update`. The first tensor of a stream is rate-searched (a few encodes, once);
    its step seeds the stream's offset. Later ones are encoded once at the guessed step
    shifted by the offset; the rate falls by about one bit per unit of log2 step, so the
    offset moves by ``gain`` × the rate error and the running rate stays on the target.
    """

    def __init__(self, gain: float = 0.9) -> None:
        self.gain = gain
        self._offsets: dict[str, float] = {}

    def offset(self, stream: str = "") -> float:
        return self._offsets.get(stream, 0.0)

    def encode_options(self, stream: str = "") -> dict:
        """``encode_tensor`` options for the next tensor of ``stream``."""
        if stream not in self._offsets:
            return {"rate_control": "search"}
        return {"rate_control": "predict", "step_offset": self._offsets[stream]}

    def update(self, stream: str, achieved_bits: float, target_bits: float, stats: dict | None = None) -> None:
        """Learn from one encode (``stats``: the record's encoder stats; a searched encode seeds the offset)."""
        if stream not in self._offsets and stats and "e_final" in stats:
            self._offsets[stream] = stats["e_final"] - stats["e_start"]
        self._offsets[stream] = self.offset(stream) + self.gain * (achieved_bits - target_bits)

    def reset(self) -> None:
        self._offsets.clear()
