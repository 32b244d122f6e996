"""The video family's encoder: a rotated matrix → 8-bit pixels → intra-coded frames, at a fractional rate.

The affine pixel map's amplitude and the integer QP form one continuous knob (the
effective log step, :mod:`~vc_quant.codec.ratecontrol`): probes on a sample of rows fit
the local rate curve, then the whole tensor is encoded once or twice.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from vc_quant.codec.options import CodecOptions
from vc_quant.codec.ratecontrol import Trial, search_rate, split_log_step
from vc_quant.codec.record import EncodedTensor, checksum
from vc_quant.codec.video import frames as fr
from vc_quant.codec.video import pixels as px
from vc_quant.codec.video.backends import EncoderSettings, VideoBackend, get_backend

logger = logging.getLogger(__name__)

_SAMPLE_MIN_VALUES = 216 * 144  # rate probes encode at least one smallest frame …
_SAMPLE_FRACTION = 1 / 16  # … or this share of the tensor, whichever is larger
_MIN_RATE_CONTROLLED = 1 << 14  # smaller tensors: one encode at the predicted step

@dataclass
class _Prepared:
    """Everything about a tensor that does not depend on the rate."""

    x: torch.Tensor  # (rows, cols) float32 after rotation
    per_row: bool
    layout: fr.FrameLayout
    meta: dict
    backend: VideoBackend
    settings: EncoderSettings
    col_scale: torch.Tensor | None = None  # fp16 (cols,), stored with the record


def _encode_at(p: _Prepared, x: torch.Tensor, layout: fr.FrameLayout, qp: int, center, step) -> list[bytes]:
    frames = [f.numpy() for f in fr.pack(px.to_pixels(x, center, step), layout)]
    return p.backend.encode(frames, qp, p.settings)


def _encode_full(p: _Prepared, qp: int, amplitude: float) -> EncodedTensor:
    """Map the whole tensor to pixels at ``amplitude``, encode at ``qp``, build the record."""
    center, step = px.pixel_map(p.x, amplitude, p.per_row)
    return _record(p, _encode_at(p, p.x, p.layout, qp, center, step), center, step, qp)


def _record(p: _Prepared, packets: list[bytes], center, step, qp: int) -> EncodedTensor:
    bitstream = torch.frombuffer(bytearray(b"".join(packets)), dtype=torch.uint8)
    meta = dict(p.meta, frame_bytes=[len(b) for b in packets], qp=qp)
    enc = EncodedTensor(bitstream, center, step, meta, col_scale=p.col_scale)
    enc.meta["crc32"] = checksum(enc)
    return enc


def encode_video(
    x: torch.Tensor, bits: float | None, meta: dict, opts: CodecOptions, name: str,
    col_scale: torch.Tensor | None, rotated: bool,
) -> EncodedTensor:  # fmt: skip
    """Encode the rotated ``(rows, cols)`` float32 matrix ``x``; ``meta``: the record's shared fields."""
    rows, cols = x.shape
    backend = get_backend(opts.codec)
    tile = opts.value("tile")
    layout = fr.plan_layout(rows, cols, tile)
    meta = dict(meta, layout=layout.to_dict(), tile=tile)
    params = opts.value("encoder_params")
    settings = EncoderSettings(
        preset=opts.value("preset"),
        threads=opts.threads,
        chroma_qp_match=opts.value("chroma_qp_match"),
        extra_params=backend.default_params if params is None else params,
    )
    p = _Prepared(x, opts.scale == "row", layout, meta, backend, settings, col_scale)
    if opts.qp is not None:
        enc = _encode_full(p, opts.qp, 1.0)
        enc.stats = {"full_encodes": 1, "amplitude": 1.0, "rate_controlled": False}
        return enc

    target = float(bits)
    numel = rows * cols
    tolerance = opts.value("tolerance")

    def knobs(e: float) -> tuple[int, float]:
        # amplitude in (0.75, 0.84]: headroom both ways for the full encodes below
        qp = split_log_step(e - 0.25, backend.log2_step, backend.qp_min, backend.qp_max)[0]
        return qp, min(1.0, 2.0 ** (backend.log2_step(qp) - e))

    # Bits that do not depend on the rate (scales, metadata; the latter from a
    # template of the final record): the bitstream gets the rest of the budget.
    center1, step1 = px.pixel_map(x, 1.0, p.per_row)
    template = _record(p, [b"\0" * 99_999] * layout.n_frames, center1, step1, 51)
    side_bits = template.bits_per_value * numel - 8 * template.bitstream.numel()

    # High-rate Gaussian guess: step ≈ σ·sqrt(2πe)·2^-R, in pixels (amplitude 1);
    # +0.5 is the measured gain of x265's dead-zone/RDOQ quantiser.
    # σ in pixels at amplitude 1: per-row maps give each row its own step, so measure it
    # in the pixel domain (a mean step would be dominated by the rows with outliers)
    sigma_pixels = float(((x - center1.float()) / step1.float()).std()) if numel > 1 else 0.0
    sigma_pixels = sigma_pixels if sigma_pixels > 0 else 1.0
    e_start = math.log2(sigma_pixels * 4.13) - target + 0.5
    e_bounds = (backend.log2_step(backend.qp_min), backend.log2_step(backend.qp_max) + 7.0)
    e_start = min(max(e_start, e_bounds[0]), e_bounds[1])

    # Small tensors: headers, scales and the smallest legal frame cost more than the
    # budget, so no rate can be hit; encode once at the step a large tensor would use.
    if side_bits / numel > 0.25 * target or numel < _MIN_RATE_CONTROLLED or opts.rate_control == "predict":
        qp, amp = knobs(min(max(e_start + opts.step_offset, e_bounds[0]), e_bounds[1]))
        enc = _encode_full(p, qp, amp)
        enc.stats = {"full_encodes": 1, "amplitude": amp, "rate_controlled": False, "target": target}
        return enc

    sample_rows, sample_shape = _sample_plan(rows, cols, rotated)
    sample_x = x[sample_rows].reshape(-1)[: math.prod(sample_shape)].reshape(sample_shape)
    sample_layout = fr.plan_layout(*sample_shape, tile)

    def sample_rate(e: float) -> float:
        qp, amp = knobs(e)
        # per-tensor scale: the whole tensor's map, so the sample sees the same step size
        center, step = px.pixel_map(sample_x if p.per_row else x, amp, p.per_row)
        packets = _encode_at(p, sample_x, sample_layout, qp, center, step)
        return 8 * sum(len(b) for b in packets) / sample_x.numel() + side_bits / numel

    full_qp: list[int] = []

    def full_encode(e: float) -> Trial[EncodedTensor]:
        # Keep one QP for all full encodes and move only the amplitude: the rate is
        # continuous in amplitude but jumps a little between QPs (RDO lambda).
        if not full_qp or not 0.5 <= 2.0 ** (backend.log2_step(full_qp[0]) - e) <= 1.0:
            full_qp[:] = [knobs(e)[0]]
        qp = full_qp[0]
        enc = _encode_full(p, qp, min(1.0, 2.0 ** (backend.log2_step(qp) - e)))
        return Trial(e, enc.bits_per_value, enc)

    best, trials = search_rate(sample_rate, full_encode, target, e_start, tolerance, e_bounds)
    if abs(best.rate - target) > tolerance:
        logger.warning("%s: rate %.3f bits/value misses the target %.3f", name, best.rate, target)
    amplitude = min(1.0, 2.0 ** (backend.log2_step(best.result.meta["qp"]) - best.e))
    best.result.stats = {"full_encodes": len(trials), "amplitude": amplitude, "rate_controlled": True,
                         "e_start": e_start, "e_final": best.e}  # fmt: skip
    return best.result


def _sample_plan(rows: int, cols: int, rotated: bool) -> tuple[torch.Tensor, tuple[int, int]]:
    """Rows to probe the rate on, and the shape to encode them in.

    Evenly spaced blocks of rows keep local 2-D structure. Rotated rows are
    statistically interchangeable, so the sample is re-shaped to fill exactly one
    smallest frame instead of paying for padding rows.
    """
    want = max(_SAMPLE_MIN_VALUES, int(rows * cols * _SAMPLE_FRACTION))
    n_rows = min(rows, max(1, math.ceil(want / cols)))
    if n_rows >= rows:
        idx = torch.arange(rows)
    else:
        n_blocks = min(8, n_rows)
        block = math.ceil(n_rows / n_blocks)
        starts = np.linspace(0, rows - block, n_blocks).round().astype(int)
        idx = torch.from_numpy(np.concatenate([np.arange(s, s + block) for s in starts]))
    n_values = len(idx) * cols
    frame_rows = fr.MIN_SIDE * 3 // 2
    if rotated and n_values >= frame_rows * fr.MIN_SIDE:
        width = (n_values // frame_rows) // fr.ALIGN * fr.ALIGN
        return idx, (frame_rows, width)
    return idx, (len(idx), cols)
