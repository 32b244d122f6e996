"""The seeded rotation both codec families share (torch, and native float32 kernels).

* :func:`rotate` / :func:`unrotate` — a seeded random orthogonal rotation along the
  last dimension that spreads outliers so every row looks Gaussian: random signs,
  a Walsh–Hadamard transform over the power-of-two factor of ``n`` and, when ``n``
  has an odd factor ``m`` (576 = 64·9, 1536 = 512·3), a seeded random ``m×m``
  orthogonal matrix on the other axis (a Kronecker product ``Q_m ⊗ H_2^k``).
* :func:`rotate_exact` — the video encoder's float64 rotation; :func:`rotate_fast` /
  :func:`unrotate_levels` — the same rotation by the native kernels (rANS encoder, CPU decoder).

Both codec families rotate first (:mod:`vc_quant.codec.video` maps the rotated values to
pixels, :mod:`vc_quant.codec.rans` quantizes them directly).
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from vc_quant.errors import VcConfigError

# Odd factors above this get no dense rotation (an m×m matmul per row would dominate).
MAX_ODD_FACTOR = 2048


def split_pow2(n: int) -> tuple[int, int]:
    """Return ``(m, p)`` with ``n = m * p``, ``p`` a power of two and ``m`` odd."""
    p = n & -n
    return n // p, p


def can_rotate(n: int) -> bool:
    return n >= 2 and split_pow2(n)[0] <= MAX_ODD_FACTOR


# Largest Hadamard factor applied as one dense matmul; larger sizes are split into two
# factors (Sylvester: H_ab = H_a ⊗ H_b). Measured on 2 cores, 5376 rows: n=64 3.3 ms with
# log2(n) butterfly passes vs 0.27 ms as a matmul; n=512 as 16x32 factors beats both.
_DENSE_HADAMARD_MAX = 64


@lru_cache(maxsize=32)
def _hadamard(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The orthonormal Sylvester–Hadamard matrix of order ``n`` (a power of two)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(device, dtype)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh–Hadamard transform along the last dim (a power of two)."""
    n = x.shape[-1]
    if n <= _DENSE_HADAMARD_MAX:
        return torch.matmul(x, _hadamard(n, x.device, x.dtype))  # symmetric: x @ H = (H x^T)^T
    a = 1 << ((n.bit_length() - 1) // 2)  # n = a * b, a <= b, both powers of two
    b = n // a
    y = torch.matmul(x.reshape(*x.shape[:-1], a, b), _hadamard(b, x.device, x.dtype))
    y = torch.matmul(_hadamard(a, x.device, x.dtype), y)  # H_a along the other factor
    return y.reshape(x.shape)


@lru_cache(maxsize=64)
def _rotation_factors(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Signs (n,) and the odd-factor orthogonal matrix (m, m) or None; fp64, CPU.

    Generated on CPU in float64 so every machine (and the GPU decode path) derives
    bit-identical factors from the seed.
    """
    gen = torch.Generator().manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64).to(torch.float64) * 2 - 1
    m, _ = split_pow2(n)
    if m == 1:
        return signs, None
    q, r = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)  # unique Haar-distributed Q
    return signs, q


@lru_cache(maxsize=64)
def _factors_on(n: int, seed: int, device: torch.device, dtype: torch.dtype):
    """The rotation factors, converted once per device/dtype (every tensor of a model reuses them)."""
    signs, q = _rotation_factors(n, seed)
    return signs.to(device, dtype), (q.to(device, dtype) if q is not None else None)


def rotate(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Apply the seeded rotation along the last dim of a float tensor."""
    n = x.shape[-1]
    if not can_rotate(n):
        raise VcConfigError(
            f"rotation: last dimension {n} has an odd factor {split_pow2(n)[0]} > {MAX_ODD_FACTOR}; "
            "pass rotation=False for this tensor"
        )
    signs, q = _factors_on(n, seed, x.device, x.dtype)
    m, p = split_pow2(n)
    y = x * signs
    y = fwht(y.reshape(*x.shape[:-1], m, p))
    if q is not None:
        y = torch.matmul(q, y)
    return y.reshape(x.shape)


def rotate_exact(x: torch.Tensor, seed: int, rows_per_block: int = 1024) -> torch.Tensor:
    """:func:`rotate` computed in float64, returned in float32, a block of rows at a time.

    The encoder's rotation: float64 keeps it exact to the last float32 bit, and blocks
    keep the float64 temporaries small (a full float64 copy of a 5632-wide matrix is 8x
    the float32 bytes of the block, not of the matrix). Rows rotate independently, so
    the result equals rotating the whole matrix at once.
    """
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], rows_per_block):
        out[start : start + rows_per_block] = rotate(x[start : start + rows_per_block].double(), seed)
    return out


def unrotate(y: torch.Tensor, seed: int) -> torch.Tensor:
    """Exact inverse of :func:`rotate` (up to float rounding)."""
    n = y.shape[-1]
    signs, q = _factors_on(n, seed, y.device, y.dtype)
    m, p = split_pow2(n)
    x = y.reshape(*y.shape[:-1], m, p)
    if q is not None:
        x = torch.matmul(q.t(), x)
    x = fwht(x).reshape(y.shape)  # the orthonormal WHT is its own inverse
    return x * signs


@lru_cache(maxsize=64)
def _native_factors(n: int, seed: int) -> tuple[np.ndarray, np.ndarray | None, int, int]:
    signs, q = _rotation_factors(n, seed)
    m, p = split_pow2(n)
    q32 = np.ascontiguousarray(q.numpy(), dtype=np.float32) if q is not None else None
    return np.ascontiguousarray(signs.numpy(), dtype=np.float32), q32, m, p


def rotate_fast(x: torch.Tensor, seed: int | None, col_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``rotate(x * col_scale)`` in float32 by the native kernels (seed None: columns scaled only; neither:
    ``x`` itself as float32, not a copy).

    The rANS encoder's rotation: ~10x the speed of :func:`rotate_exact` and still the same
    bits on every machine (plain IEEE float32 operations in a fixed order, no FMA
    contraction); the decoders invert it in any float order. Falls back to
    :func:`rotate_exact` when the native library is missing.
    """
    from vc_quant.codec.rans import native

    mat = x.detach().to("cpu", torch.float32).contiguous()
    if seed is None and col_scale is None:  # nothing to do: no copy (the encoder only reads it)
        return mat
    scale = col_scale.detach().to("cpu", torch.float32).contiguous() if col_scale is not None else None
    if not native.status():
        scaled = mat * scale[None, :] if scale is not None else mat
        return rotate_exact(scaled, seed) if seed is not None else scaled
    rows, n = mat.shape
    a = mat.numpy()
    out = np.empty_like(a)
    signs = q = None
    m, p = 1, n
    if seed is not None:
        signs, q, m, p = _native_factors(n, seed)
    cs = scale.numpy() if scale is not None else None
    if native.lib().vc_rotate_rows(native.ptr(a), native.ptr(out), rows, m, p, native.ptr(signs), native.ptr(q),
                                   native.ptr(cs)) != 0:  # fmt: skip
        raise MemoryError("rotate_fast: out of memory")
    return torch.from_numpy(out)


_UNROTATE_PART = 1 << 20  # values per thread at least (smaller: the hand-off costs more than it saves)


def unrotate_levels(
    levels: np.ndarray, step: float | np.ndarray, seed: int | None, col_scale: torch.Tensor | None = None
) -> np.ndarray:
    """``unrotate(levels * step) / col_scale`` in float32 by the native kernels.

    ``levels``: int8 rows × cols; ``step``: one step, or a float32 array with one per row."""
    from vc_quant.codec.rans import native

    rows, n = levels.shape
    out = np.empty((rows, n), dtype=np.float32)
    signs = q = None
    m, p = 1, n
    if seed is not None:
        signs, q, m, p = _native_factors(n, seed)
    cs = np.ascontiguousarray(col_scale.detach().cpu().float().numpy()) if col_scale is not None else None
    per_row = np.ascontiguousarray(step, dtype=np.float32).reshape(-1) if np.ndim(step) else None
    scalar = np.float32(0.0 if per_row is not None else step)
    levels = np.ascontiguousarray(levels)
    lib = native.lib()

    def run(lo: int, hi: int) -> int:  # rows [lo, hi): independent, so split over the decoder's threads
        steps = per_row[lo:hi] if per_row is not None else None
        return lib.vc_unrotate_levels(native.ptr(levels[lo:hi]), scalar, native.ptr(steps), native.ptr(out[lo:hi]),
                                      hi - lo, m, p, native.ptr(signs), native.ptr(q), native.ptr(cs))  # fmt: skip

    from vc_quant.codec.rans import coder

    parts = max(1, min(coder.cpus(), levels.size // _UNROTATE_PART, rows))
    if any(coder.run_split(run, np.linspace(0, rows, parts + 1).round().astype(np.int64).tolist())):
        raise MemoryError("unrotate_levels: out of memory")
    return out
