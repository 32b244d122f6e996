"""The rANS family's encoder: a rotated matrix → levels (rate–distortion quantized) → interleaved rANS record.

The rate is computed from the frequency tables before anything is coded
(:mod:`~vc_quant.codec.rans.quantizer`), so the all-in budget — stream, step, metadata and
column scales — is hit without trial encodes; the stream is then coded once.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from vc_quant.codec.options import CodecOptions
from vc_quant.codec.rans import bitstream as bs
from vc_quant.codec.rans import coder
from vc_quant.codec.rans import quantizer as qz
from vc_quant.codec.record import EncodedTensor, checksum, dump_meta
from vc_quant.errors import VcConfigError

logger = logging.getLogger(__name__)

_WARN_ABOVE = 1 << 14  # tensors this large that miss the rate get a warning (smaller: metadata dominates)
_TINY_SHARE = 0.25  # fixed bits above this share of the budget: rate-control the symbols alone


def encode_rans(
    x: torch.Tensor, bits: float | None, meta: dict, opts: CodecOptions, name: str, col_scale: torch.Tensor | None,
    keep_samples: bool = False,
) -> EncodedTensor:  # fmt: skip
    """Encode the rotated (and column-scaled) ``(rows, cols)`` float32 matrix ``x``.

    ``keep_samples``: the record keeps the reconstruction integers the decoder will produce (``derived``)."""
    if bits is None:
        raise VcConfigError(f"{name}: codec='rans' needs bits= (it has no fixed quantiser setting)")
    quantizer = opts.value("quantizer")
    rows, cols = x.shape
    a = np.ascontiguousarray(x.numpy(), dtype=np.float32)
    per_row = opts.scale == "row"
    row_scale = None
    if per_row:  # each row normalised by its RMS (stored in fp16 with the step): one step for all
        rms = np.sqrt(np.mean(np.square(a, dtype=np.float64), axis=1)).astype(np.float16)
        row_scale = np.where(np.isfinite(rms) & (rms > 0), rms, np.float16(1.0)).astype(np.float32)
        a = a / row_scale[:, None]
    meta = dict(meta, quantizer=quantizer)
    center = torch.zeros(1, 1, dtype=torch.float32)
    # bits outside the stream and the step (search_step counts the step: one, or one per row)
    fixed = 8 * (len(dump_meta(dict(meta, crc32=2**32 - 1))) + 4 + (2 * cols if col_scale is not None else 0))
    target = float(bits)
    predict = opts.rate_control == "predict"
    e_guess = qz.guess_log_step(target, quantizer) + opts.step_offset if predict else None
    # tiny tensors: metadata and headers alone exceed the budget, so no rate can be hit; they get
    # the step a large tensor would use at this rate
    tiny = fixed > _TINY_SHARE * target * a.size
    lv, search = qz.search_step(a, target, fixed, quantizer, tolerance=opts.value("tolerance"), e_guess=e_guess,
                                predict=predict, payload_only=tiny, steps_per_row=per_row)  # fmt: skip
    stream = coder.encode_stream(lv)
    bitstream = torch.frombuffer(bytearray(bs.pack(stream)), dtype=torch.uint8)
    if per_row or lv.row_steps is not None:
        steps = lv.row_steps if lv.row_steps is not None else np.full(rows, lv.step, dtype=np.float32)
        if per_row:
            steps = steps * row_scale
        step_t = torch.from_numpy(steps.astype(np.float16)).reshape(rows, 1)
    else:
        step_t = torch.tensor([[lv.step]], dtype=torch.float32)
    enc = EncodedTensor(bitstream, center, step_t, meta, col_scale=col_scale)
    if keep_samples:  # exactly what the decoders return (tests/codec/rans/test_coder.py)
        enc.derived["samples"] = qz.reconstruction_integers(lv).reshape(rows, cols)
    enc.meta["crc32"] = checksum(enc)
    rate = enc.bits_per_value
    if not (predict or tiny) and abs(rate - target) > opts.value("tolerance") and enc.numel >= _WARN_ABOVE:
        logger.warning("%s: rate %.3f bits/value misses the target %.3f", name, rate, target)
    enc.stats = {"full_encodes": 1, "rate_controlled": not (predict or tiny), "target": target,
                 "quantizer_passes_sample": search.passes_sample, "quantizer_passes_full": search.passes_full,
                 "e_start": search.e_start, "e_final": search.e_final}  # fmt: skip
    return enc
