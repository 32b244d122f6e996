"""Round-to-nearest (RTN) group quantisation: the baseline every result is compared to.

Asymmetric ``bits``-bit codes per group of ``group_size`` values along the last
dimension, with a float16 scale and a float16 minimum per group (32 bits of
overhead per group, counted in :func:`rtn_bits_per_value`). Optionally the same
seeded rotation the codec uses is applied first.
"""

from __future__ import annotations

import math

import torch

from vc_quant.codec import transform as tf
from vc_quant.errors import VcConfigError


def rtn_bits_per_value(bits: int, group_size: int, cols: int | None = None) -> float:
    """All-in rate; with ``cols``, a last partial group per row is counted whole."""
    if cols is None:
        return bits + 32.0 / group_size
    return bits + 32.0 * math.ceil(cols / group_size) / cols


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int, rotation: bool = False, seed: int = 0) -> torch.Tensor:
    """Quantise and dequantise ``w`` (any float dtype); returns a tensor like ``w``."""
    if not 1 <= bits <= 8:
        raise VcConfigError(f"rtn bits={bits}: expected 1..8")
    cols = w.shape[-1]
    if group_size < 1:
        raise VcConfigError(f"rtn group_size={group_size}: expected >= 1")
    x = w.detach().reshape(-1, cols).double()
    rotate = rotation and tf.can_rotate(cols)
    if rotate:
        x = tf.rotate(x, seed)
    padded = math.ceil(cols / group_size) * group_size  # a short last group: pad by repetition
    xp = torch.cat([x, x[:, -1:].expand(-1, padded - cols)], dim=1)
    g = xp.reshape(-1, group_size)
    lo = g.amin(dim=1, keepdim=True).half().double()
    hi = g.amax(dim=1, keepdim=True)
    scale = ((hi - lo) / (2**bits - 1)).half().double().clamp_min(1e-8)
    q = ((g - lo) / scale).round().clamp(0, 2**bits - 1)
    x = (q * scale + lo).reshape(-1, padded)[:, :cols]
    if rotate:
        x = tf.unrotate(x, seed)
    return x.reshape(w.shape).to(w.dtype)
