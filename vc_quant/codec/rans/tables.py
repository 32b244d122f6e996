"""Static frequency tables: level counts → probabilities in 1/4096, costs, coder tables, exact rates.

A table covers one *context* (the scalar quantizer has one; dependent quantization two,
one per quantizer): a contiguous range of levels ``[kmin, kmin + count)`` and a frequency
per level, summing to :data:`PROB_SCALE`. Rates are computed from the tables, not measured
after coding: the rANS coder spends ``log2(PROB_SCALE / f)`` bits per symbol to within a
few bits per lane, so rate control needs no trial encodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PROB_BITS = 12
PROB_SCALE = 1 << PROB_BITS
LEVEL_MAX = 127  # reconstruction integers are int8: [-127, 127]
N_LEVELS = 2 * LEVEL_MAX + 1  # the native kernels index every per-level array by k + 127
#: cost in bits given to a level the table does not hold yet (rarer than any level seen)
UNSEEN_COST = PROB_BITS + 2.0


@dataclass(frozen=True)
class Table:
    """One context's frequencies: levels ``kmin … kmin + len(freq) - 1``."""

    kmin: int
    freq: np.ndarray  # uint32, sums to PROB_SCALE (0 for a level that never occurs)

    @property
    def kmax(self) -> int:
        return self.kmin + len(self.freq) - 1


def quantize_counts(counts: np.ndarray) -> Table:
    """Frequencies for level counts (``counts[k + 127]``) that cost the fewest bits.

    Every level seen gets at least 1/4096; rounding is corrected greedily by the cheapest
    change of the total code length, so the result is deterministic.
    """
    used = np.nonzero(counts)[0]
    if used.size == 0:
        raise ValueError("no symbols to build a table from")
    lo, hi = int(used[0]), int(used[-1])
    c = counts[lo : hi + 1].astype(np.float64)
    total = c.sum()
    # levels never seen inside the range keep frequency 0 (they are never coded)
    f = np.where(c > 0, np.maximum(1, np.floor(c * PROB_SCALE / total + 0.5)), 0).astype(np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        while (excess := int(f.sum()) - PROB_SCALE) != 0:
            if excess > 0:  # take from the entry whose decrement costs the least
                loss = np.where(f > 1, c * np.log2(f / np.maximum(f - 1, 1)), np.inf)
                order = np.argsort(loss, kind="stable")[: min(excess, int(np.isfinite(loss).sum()))]
                f[order] -= 1
            else:  # give to the entry whose increment saves the most
                gain = np.where(c > 0, c * np.log2((f + 1) / np.maximum(f, 1)), -np.inf)
                order = np.argsort(-gain, kind="stable")[: -excess]
                f[order] += 1
    return Table(lo - LEVEL_MAX, f.astype(np.uint32))


def payload_bits(counts: np.ndarray, table: Table) -> float:
    """Bits the coder spends on ``counts`` (indexed by k + 127) with ``table``."""
    lo = table.kmin + LEVEL_MAX
    c = counts[lo : lo + len(table.freq)].astype(np.float64)
    f = table.freq.astype(np.float64)
    if counts.sum() != c.sum() or bool((c[f == 0] > 0).any()):
        raise ValueError("counts hold levels the table cannot code")
    used = c > 0
    return float((c[used] * (PROB_BITS - np.log2(f[used]))).sum())


def cost_array(table: Table | None) -> np.ndarray:
    """Bits per level over the whole int8 range (for the quantizers); unseen levels cost more."""
    cost = np.full(N_LEVELS, UNSEEN_COST, dtype=np.float64)
    if table is not None:
        lo = table.kmin + LEVEL_MAX
        f = table.freq.astype(np.float64)
        with np.errstate(divide="ignore"):
            cost[lo : lo + len(f)] = np.where(f > 0, PROB_BITS - np.log2(f), UNSEEN_COST)
    return cost


def gaussian_costs(sigma_steps: float, quantizer: str) -> np.ndarray:
    """Starting costs before any table exists: a Gaussian of ``sigma_steps`` (in steps) per context."""
    k = np.arange(-LEVEL_MAX, LEVEL_MAX + 1, dtype=np.float64)
    rows = []
    for recon in ((k,) if quantizer == "scalar" else (2 * k, 2 * k - np.sign(k))):
        p = np.exp(-0.5 * (recon / max(sigma_steps, 1e-3)) ** 2) + 1e-12
        rows.append(-np.log2(p / p.sum()))
    return np.concatenate(rows)


def encoder_tables(tables: list[Table]) -> tuple[np.ndarray, np.ndarray]:
    """``(freq, cum)`` as ``[context][k + 127]`` uint32 arrays for the native encoder."""
    freq = np.zeros((len(tables), N_LEVELS), dtype=np.uint32)
    cum = np.zeros((len(tables), N_LEVELS), dtype=np.uint32)
    for i, t in enumerate(tables):
        lo = t.kmin + LEVEL_MAX
        freq[i, lo : lo + len(t.freq)] = t.freq
        cum[i, lo : lo + len(t.freq)] = np.concatenate([[0], np.cumsum(t.freq)[:-1]])
    return freq, cum


def decode_lut(tables: list[Table]) -> np.ndarray:
    """``[context][slot]`` uint32 entries ``(uint8)k | (freq - 1) << 8 | cum << 20`` (4096 slots each)."""
    lut = np.empty((len(tables), PROB_SCALE), dtype=np.uint32)
    for i, t in enumerate(tables):
        idx = np.repeat(np.arange(len(t.freq)), t.freq)
        cum = np.concatenate([[0], np.cumsum(t.freq)[:-1]]).astype(np.uint32)
        k = (t.kmin + idx).astype(np.int64) & 0xFF
        lut[i] = k.astype(np.uint32) | ((t.freq[idx] - 1) << 8) | (cum[idx] << 20)
    return lut
