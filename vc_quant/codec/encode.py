"""encode_tensor: the one encode entry point of both codec families.

Shared by both families: input checks, the 2-D view (:func:`~vc_quant.codec.record.matrix_shape`),
the Fisher column scales, the seeded rotation along the columns and the record's metadata;
then :func:`~vc_quant.codec.video.encode.encode_video` (8-bit pixels → intra-coded frames) or
:func:`~vc_quant.codec.rans.encode.encode_rans` (rate–distortion quantization → interleaved rANS).
"""

from __future__ import annotations

import logging
import math

import torch

from vc_quant.codec import transform as tf
from vc_quant.codec.options import CodecOptions, check_bits
from vc_quant.codec.record import FLOAT_DTYPES, FORMAT_VERSION, EncodedTensor, matrix_shape
from vc_quant.errors import VcConfigError, VcInputError

logger = logging.getLogger(__name__)

# values within this factor of their dtype's largest finite value are refused: the
# rotation and the quantizer's rounding can move a reconstructed value past the limit
_RANGE_HEADROOM = 4.0


def _check_range(x: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    """Refuse NaN/Inf and values too close to ``dtype``'s largest (the reconstruction could overflow)."""
    # one pass, no temporaries: min/max propagate NaN and reach Inf, so a finite range means finite values
    lo, hi = torch.aminmax(x)
    peak = max(-float(lo), float(hi))
    if not math.isfinite(peak):
        finite = torch.isfinite(x)
        n_nan = int(torch.isnan(x).sum())
        raise VcInputError(
            f"{name}: contains {n_nan} NaN and {int((~finite).sum()) - n_nan} Inf values; "
            "the codec encodes finite values only"
        )
    limit = torch.finfo(dtype).max / _RANGE_HEADROOM
    if peak > limit:
        raise VcInputError(
            f"{name}: values reach {peak:.3g}, within {_RANGE_HEADROOM:g}x of the largest {dtype} "
            f"({torch.finfo(dtype).max:.3g}); the reconstruction could overflow to Inf. Rescale the tensor "
            "or keep it in full precision"
        )


def _as_matrix(t: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise VcInputError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES.values():
        raise VcInputError(f"{name}: dtype {t.dtype} is not supported; use float32, float16 or bfloat16")
    if t.numel() == 0:
        raise VcInputError(f"{name}: cannot encode an empty tensor of shape {tuple(t.shape)}")
    x = t.detach().to("cpu", torch.float32)
    _check_range(x, t.dtype, name)
    rows, cols = matrix_shape(tuple(x.shape))
    if x.dim() >= 2:
        return x.reshape(rows, cols)
    mat = torch.empty(rows, cols, dtype=torch.float32)
    mat.reshape(-1)[: x.numel()].copy_(x.reshape(-1))
    pad_folded(mat, x.numel())
    return mat


def pad_folded(mat: torch.Tensor, numel: int) -> None:
    """Fill the tail of a 1-D tensor folded into ``mat`` (its first ``numel`` values, in place) with its
    last value: the one fold rule every encoder of a 1-D tensor follows (a constant tail costs no rate)."""
    flat = mat.view(-1)
    flat[numel:].fill_(float(flat[numel - 1]))


def encode_tensor(
    t: torch.Tensor, bits: float | None, *, name: str = "tensor", col_scale: torch.Tensor | None = None, **options
) -> EncodedTensor:
    """Compress ``t`` to about ``bits`` all-in bits per value (see :class:`CodecOptions`).

    ``bits=None`` requires ``qp=`` (video codecs: fixed quantiser, no rate control).
    ``col_scale`` (a 2-D+ tensor's last dimension, > 0; stored as fp16 and counted in the rate)
    multiplies the columns before encoding; decoding divides them out. The result is
    deterministic for the same input, bits and options.
    """
    opts = CodecOptions.from_kwargs(**options)
    if bits is None and opts.qp is None:
        raise VcConfigError(f"{name}: give bits= (target bits per value) or qp= (fixed quantiser, video codecs)")
    if bits is not None:
        check_bits(bits, f"{name}: bits")
    dtype_name = str(t.dtype).removeprefix("torch.") if isinstance(t, torch.Tensor) else "?"
    mat = _as_matrix(t, name)
    return _encode(mat, list(t.shape), dtype_name, bits, opts, name, col_scale, t.dim() >= 2)


def encode_matrix(
    mat: torch.Tensor, shape: tuple[int, ...], bits: float, *, name: str = "tensor", keep_samples: bool = False,
    **options,
) -> EncodedTensor:  # fmt: skip
    """:func:`encode_tensor` of a float32 tensor of ``shape`` that the caller already folded into its
    ``(rows, cols)`` matrix (:func:`~vc_quant.codec.record.matrix_shape`; a 1-D tensor padded by
    :func:`pad_folded`), e.g. in a buffer it reuses: no copy here. The same record, the same bytes.

    ``keep_samples`` (rANS): keep the reconstruction integers with the record (``derived``), so decoding
    this record — the sender's own copy, e.g. for error feedback — skips the entropy decode."""
    opts = CodecOptions.from_kwargs(**options)
    check_bits(bits, f"{name}: bits")
    if mat.dtype != torch.float32 or mat.device.type != "cpu" or tuple(mat.shape) != matrix_shape(tuple(shape)):
        raise VcInputError(f"{name}: encode_matrix takes the float32 CPU matrix {matrix_shape(tuple(shape))} "
                           f"of a tensor of shape {tuple(shape)}, got {mat.dtype} {tuple(mat.shape)}")  # fmt: skip
    _check_range(mat, torch.float32, name)
    return _encode(mat.contiguous(), list(shape), "float32", bits, opts, name, None, len(shape) >= 2, keep_samples)


def _encode(
    mat: torch.Tensor, shape: list[int], dtype_name: str, bits: float | None, opts: CodecOptions, name: str,
    col_scale: torch.Tensor | None, two_d: bool, keep_samples: bool = False,
) -> EncodedTensor:  # fmt: skip
    cols = mat.shape[1]
    if col_scale is not None:
        col_scale = col_scale.detach().to("cpu", torch.float16)
        if not two_d or tuple(col_scale.shape) != (cols,) or not bool((col_scale > 0).all()):
            raise VcInputError(f"{name}: col_scale must hold {cols} positive values for a 2-D+ tensor")
    rotate = opts.rotation and tf.can_rotate(cols)
    meta = {
        "format": FORMAT_VERSION,
        "name": name,
        "codec": opts.codec,
        "shape": shape,
        "dtype": dtype_name,
        "bits": float(bits) if bits is not None else None,  # the target (a changed weight is re-encoded at it)
        "rotation_seed": opts.seed if rotate else None,
        "scale": opts.scale,
    }
    if col_scale is not None:
        meta["col_scale"] = True
    if opts.family == "rans":
        from vc_quant.codec.rans.encode import encode_rans

        x = tf.rotate_fast(mat, opts.seed if rotate else None, col_scale)
        return encode_rans(x, bits, meta, opts, name, col_scale, keep_samples)
    from vc_quant.codec.video.encode import encode_video

    if col_scale is not None:
        mat = mat * col_scale.float()[None, :]
    x = tf.rotate_exact(mat, opts.seed) if rotate else mat
    return encode_video(x, bits, meta, opts, name, col_scale, rotate)
