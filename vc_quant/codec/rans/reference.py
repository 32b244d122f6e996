"""The reference rANS decoder in NumPy: the bitstream spec as code, and the fallback decoder.

It runs every lane of every segment at once, one NumPy step per lane position, exactly as
a GPU runs one thread per lane: at each position every lane decodes one symbol, and the
lanes of a segment that renormalise read consecutive words of the segment's stream in lane
order (an exclusive prefix sum of the renormalisation flags gives each lane its word).
The native and Triton decoders must agree with it bit for bit.
"""

from __future__ import annotations

import numpy as np

from vc_quant.codec.rans.bitstream import RansStream
from vc_quant.codec.rans.tables import PROB_BITS, PROB_SCALE, decode_lut
from vc_quant.errors import VcCorruptDataError

RANS_L = 1 << 16
DQ_NEXT = np.array([[0, 2], [2, 0], [1, 3], [3, 1]], dtype=np.int64)


def decode(stream: RansStream, out: np.ndarray, name: str = "tensor") -> np.ndarray:
    """Decode ``stream`` into ``out`` (int8, n values); raise VcCorruptDataError on a damaged stream."""
    n, g, ln, segs = stream.n_symbols, stream.lanes, stream.lane_len, stream.n_segments
    lut = decode_lut(stream.tables).astype(np.int64)
    words = stream.words.astype(np.int64)
    ends = stream.seg_end.astype(np.int64)
    starts = np.concatenate([[0], ends[:-1]])
    lanes = np.arange(g)
    if bool((ends - starts < 2 * g).any()):
        raise VcCorruptDataError(f"{name}: segment offsets are inconsistent with the tensor (corrupted header)")
    x = words[starts[:, None] + 2 * lanes] | (words[starts[:, None] + 2 * lanes + 1] << 16)
    ptr = starts + 2 * g
    state = np.zeros((segs, g), dtype=np.int64)
    first = np.arange(segs, dtype=np.int64) * g * ln
    last = np.minimum(first + g * ln, n)
    flat = out.reshape(-1)
    for t in range(ln):
        i = first[:, None] + t * g + lanes
        valid = i < last[:, None]
        if not valid.any():
            break
        slot = x & (PROB_SCALE - 1)
        ctx = state >> 1 if stream.dq else np.zeros_like(state)
        e = lut[ctx, slot]
        k = ((e & 0xFF) ^ 0x80) - 0x80  # the low byte as int8
        f, cum = ((e >> 8) & 0xFFF) + 1, e >> 20
        xn = f * (x >> PROB_BITS) + slot - cum
        need = valid & (xn < RANS_L)
        offset = ptr[:, None] + np.cumsum(need, axis=1) - need
        if bool((need & (offset >= ends[:, None])).any()):
            raise VcCorruptDataError(f"{name}: a lane needs more words than its segment holds (truncated or corrupted)")
        w = words[np.where(need, offset, 0)]
        xn = np.where(need, (xn << 16) | w, xn)
        x = np.where(valid, xn, x)
        ptr += need.sum(axis=1)
        r = np.where(ctx == 1, 2 * k - np.sign(k), 2 * k) if stream.dq else k
        flat[i[valid]] = r[valid]
        if stream.dq:
            state = np.where(valid, DQ_NEXT[state, k & 1], state)
    if bool((ptr != ends).any()):
        raise VcCorruptDataError(f"{name}: words are left over after the last symbol of a segment (corrupted)")
    if bool((x != RANS_L).any()):
        raise VcCorruptDataError(f"{name}: a lane did not return to the encoder's initial state (corrupted)")
    return out
