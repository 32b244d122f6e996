"""encode_tensor / decode_tensor and the EncodedTensor record.

Pipeline (encode): tensor → 2-D ``(rows, cols)`` → seeded rotation along ``cols`` →
8-bit pixels (affine map, amplitude from rate control) → 4:2:0 frames → one
intra-coded access unit per frame. Decode runs the exact inverse.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from vc_quant.codec import frames as fr
from vc_quant.codec import transform as tf
from vc_quant.codec.backends import EncoderSettings, VideoBackend, check_preset, get_backend
from vc_quant.codec.ratecontrol import Trial, search_rate, split_log_step
from vc_quant.errors import VcConfigError, VcCorruptDataError, VcInputError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_SAMPLE_MIN_VALUES = 216 * 144  # rate probes encode at least one smallest frame …
_SAMPLE_FRACTION = 1 / 16  # … or this share of the tensor, whichever is larger
_MIN_RATE_CONTROLLED = 1 << 14  # smaller tensors: one encode at the predicted step


@dataclass(frozen=True)
class CodecOptions:
    """Options of :func:`encode_tensor` (all have measured defaults; see README)."""

    codec: str = "hevc"
    preset: str = "superfast"  # x265: same MSE as medium at ~1.5x the speed; "slow" is ~5% better
    rotation: bool = True
    seed: int = 0
    scale: str = "tensor"  # "tensor": one affine map (MSE-optimal); "row": per-row min/max
    tile: int = 2048  # largest frame side
    chroma_qp_match: bool = True
    # extra encoder parameters, "key=value:key=value" (x265 / x264 / SVT-AV1 syntax);
    # None: the backend's measured default (HEVC: rdoq-level=2, see HevcBackend)
    encoder_params: str | None = None
    threads: int = 0
    tolerance: float = 0.03  # allowed |achieved - target| in all-in bits per value
    qp: int | None = None  # fixed QP (amplitude 1): bypasses rate control
    # "search": probes + full encodes until the rate is within tolerance; "predict": one
    # encode at the model-predicted step shifted by ``step_offset`` (callers that encode
    # many similar tensors, e.g. KV-cache blocks, learn the offset from earlier rates)
    rate_control: str = "search"
    step_offset: float = 0.0

    def __post_init__(self) -> None:
        if self.rate_control not in ("search", "predict"):
            raise VcConfigError(f"rate_control={self.rate_control!r}: expected 'search' or 'predict'")
        if self.scale not in ("tensor", "row"):
            raise VcConfigError(f"scale={self.scale!r}: expected 'tensor' or 'row'")
        if not isinstance(self.rotation, bool):
            raise VcConfigError(f"rotation={self.rotation!r}: expected True or False")
        if not (0 < self.tolerance < 1):
            raise VcConfigError(f"tolerance={self.tolerance!r}: expected a value in (0, 1) bits per value")
        params = self.encoder_params
        if params is not None and (
            not isinstance(params, str)
            or any(not re.fullmatch(r"[a-z0-9-]+(=[^:=\s]+)?", item) for item in params.split(":") if item)
        ):
            raise VcConfigError(
                f"encoder_params={self.encoder_params!r}: expected 'key=value:key=value' encoder parameters"
            )
        if self.threads < 0:
            raise VcConfigError(f"threads={self.threads!r}: expected >= 0 (0 = all cores)")
        fr.plan_layout(1, 1, self.tile)  # validates tile
        check_preset(self.codec, self.preset)  # before any encode

    @classmethod
    def from_kwargs(cls, **options) -> CodecOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise VcConfigError(f"unknown codec option(s) {unknown}; known options: {sorted(known)}")
        return cls(**options)


@dataclass
class EncodedTensor:
    """A compressed tensor: bitstream bytes, the affine pixel map, and metadata.

    ``meta`` is JSON-able; ``to_dict``/``from_dict`` give the stored form (every
    stored byte counts in :attr:`bits_per_value`).
    """

    bitstream: torch.Tensor  # uint8, frame access units back to back
    center: torch.Tensor  # float16 (rows, 1) or float32 (1, 1)
    step: torch.Tensor
    meta: dict = field(default_factory=dict)
    #: encoder-side facts (not stored): number of full encodes, amplitude, …
    stats: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.meta["shape"])

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes stored for this tensor: bitstream + scales + metadata."""
        return sum(t.numel() * t.element_size() for t in self.to_dict().values())

    @property
    def bits_per_value(self) -> float:
        """All-in bits per value: bitstream, scales, metadata and padding."""
        return 8.0 * self.nbytes / max(self.numel, 1)

    def to_dict(self) -> dict[str, torch.Tensor]:
        meta = torch.frombuffer(bytearray(_dump_meta(self.meta)), dtype=torch.uint8)
        return {"bitstream": self.bitstream, "center": self.center, "step": self.step, "meta": meta}

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor], name: str = "tensor", verify: bool = True) -> EncodedTensor:
        """Rebuild a stored record; ``verify=False`` defers the checksum to :meth:`verify`."""
        missing = {"bitstream", "center", "step", "meta"} - set(d)
        if missing:
            raise VcCorruptDataError(f"{name}: stored record lacks {sorted(missing)}")
        try:
            meta = json.loads(bytes(d["meta"].cpu().numpy().tobytes()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise VcCorruptDataError(f"{name}: metadata is not valid JSON ({exc})") from exc
        enc = cls(d["bitstream"], d["center"], d["step"], meta)
        if verify:
            enc.verify(name)
        return enc

    def verify(self, name: str = "tensor") -> None:
        """Check format version, sizes and checksum; raise VcCorruptDataError naming ``name``."""
        meta = self.meta
        if meta.get("format") != FORMAT_VERSION:
            raise VcCorruptDataError(
                f"{name}: format version {meta.get('format')!r} is not {FORMAT_VERSION}; upgrade vc_quant"
            )
        frame_bytes = meta.get("frame_bytes", [])
        if sum(frame_bytes) != self.bitstream.numel():
            raise VcCorruptDataError(
                f"{name}: bitstream has {self.bitstream.numel()} bytes, metadata expects {sum(frame_bytes)} "
                "(truncated or corrupted file)"
            )
        if _checksum(self) != meta.get("crc32"):
            raise VcCorruptDataError(f"{name}: checksum mismatch (the stored bitstream or scales are corrupted)")


def _dump_meta(meta: dict) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _checksum(enc: EncodedTensor) -> int:
    crc = 0
    for t in (enc.bitstream, enc.center, enc.step):
        crc = zlib.crc32(t.detach().cpu().contiguous().view(torch.uint8).numpy(), crc)  # no copy
    meta = {k: v for k, v in enc.meta.items() if k != "crc32"}
    return zlib.crc32(_dump_meta(meta), crc)


def _as_matrix(t: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise VcInputError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES.values():
        raise VcInputError(f"{name}: dtype {t.dtype} is not supported; use float32, float16 or bfloat16")
    if t.numel() == 0:
        raise VcInputError(f"{name}: cannot encode an empty tensor of shape {tuple(t.shape)}")
    x = t.detach().to("cpu", torch.float32)
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(x).sum())
        raise VcInputError(
            f"{name}: contains {n_nan} NaN and {int((~finite).sum()) - n_nan} Inf values; "
            "the codec encodes finite values only"
        )
    if x.dim() >= 2:
        return x.reshape(-1, x.shape[-1])
    # 1-D/0-D: fold into a near-square matrix (padded with the last value) so the
    # codec sees a picture, not one long row
    n = x.numel()
    width = min(fr.MAX_SIDE // 4, max(fr.MIN_SIDE, -(-math.isqrt(n) // fr.ALIGN) * fr.ALIGN))
    if n <= width:
        return x.reshape(1, n)
    flat = x.reshape(-1)
    rows = -(-n // width)
    return torch.cat([flat, flat[-1:].expand(rows * width - n)]).reshape(rows, width)


@dataclass
class _Prepared:
    """Everything about a tensor that does not depend on the rate."""

    x: torch.Tensor  # (rows, cols) float32 after rotation
    per_row: bool
    layout: fr.FrameLayout
    meta: dict
    backend: VideoBackend
    settings: EncoderSettings


def _encode_at(p: _Prepared, x: torch.Tensor, layout: fr.FrameLayout, qp: int, center, step) -> list[bytes]:
    frames = [f.numpy() for f in fr.pack(tf.to_pixels(x, center, step), layout)]
    return p.backend.encode(frames, qp, p.settings)


def _encode_full(p: _Prepared, qp: int, amplitude: float) -> EncodedTensor:
    """Map the whole tensor to pixels at ``amplitude``, encode at ``qp``, build the record."""
    center, step = tf.pixel_map(p.x, amplitude, p.per_row)
    return _record(p, _encode_at(p, p.x, p.layout, qp, center, step), center, step, qp)


def _record(p: _Prepared, packets: list[bytes], center, step, qp: int) -> EncodedTensor:
    bitstream = torch.frombuffer(bytearray(b"".join(packets)), dtype=torch.uint8)
    meta = dict(p.meta, frame_bytes=[len(b) for b in packets], qp=qp)
    enc = EncodedTensor(bitstream, center, step, meta)
    enc.meta["crc32"] = _checksum(enc)
    return enc


def encode_tensor(t: torch.Tensor, bits: float | None, *, name: str = "tensor", **options) -> EncodedTensor:
    """Compress ``t`` to about ``bits`` all-in bits per value (see :class:`CodecOptions`).

    ``bits=None`` requires ``qp=`` (fixed quantiser, no rate control). The result is
    deterministic for the same input, bits and options.
    """
    opts = CodecOptions.from_kwargs(**options)
    if bits is None and opts.qp is None:
        raise VcConfigError(f"{name}: give bits= (target bits per value) or qp= (fixed quantiser)")
    if bits is not None and not (0.5 <= float(bits) <= 8.0):
        raise VcConfigError(f"{name}: bits={bits!r} is outside the supported range [0.5, 8]")
    dtype_name = str(t.dtype).removeprefix("torch.") if isinstance(t, torch.Tensor) else "?"
    mat = _as_matrix(t, name)
    rows, cols = mat.shape
    rotate = opts.rotation and tf.can_rotate(cols)
    x = tf.rotate(mat.double(), opts.seed).float() if rotate else mat
    backend = get_backend(opts.codec)
    layout = fr.plan_layout(rows, cols, opts.tile)
    meta = {
        "format": FORMAT_VERSION,
        "codec": opts.codec,
        "shape": list(t.shape),
        "dtype": dtype_name,
        "layout": layout.to_dict(),
        "rotation_seed": opts.seed if rotate else None,
        "scale": opts.scale,
    }
    settings = EncoderSettings(
        preset=opts.preset,
        threads=opts.threads,
        chroma_qp_match=opts.chroma_qp_match,
        extra_params=backend.default_params if opts.encoder_params is None else opts.encoder_params,
    )
    p = _Prepared(x, opts.scale == "row", layout, meta, backend, settings)

    if opts.qp is not None:
        if not (backend.qp_min <= opts.qp <= backend.qp_max):
            raise VcConfigError(f"{name}: qp={opts.qp} outside [{backend.qp_min}, {backend.qp_max}] for {opts.codec}")
        enc = _encode_full(p, opts.qp, 1.0)
        enc.stats = {"full_encodes": 1, "amplitude": 1.0, "rate_controlled": False}
        return enc

    target = float(bits)
    numel = rows * cols

    def knobs(e: float) -> tuple[int, float]:
        # amplitude in (0.75, 0.84]: headroom both ways for the full encodes below
        qp = split_log_step(e - 0.25, backend.log2_step, backend.qp_min, backend.qp_max)[0]
        return qp, min(1.0, 2.0 ** (backend.log2_step(qp) - e))

    # Bits that do not depend on the rate (scales, metadata; the latter from a
    # template of the final record): the bitstream gets the rest of the budget.
    center1, step1 = tf.pixel_map(x, 1.0, p.per_row)
    template = _record(p, [b"\0" * 99_999] * layout.n_frames, center1, step1, 51)
    side_bits = template.bits_per_value * numel - 8 * template.bitstream.numel()

    # High-rate Gaussian guess: step ≈ σ·sqrt(2πe)·2^-R, in pixels (amplitude 1);
    # +0.5 is the measured gain of x265's dead-zone/RDOQ quantiser.
    sigma = float(x.std()) if numel > 1 else 0.0
    sigma_pixels = sigma / float(step1.float().mean()) if sigma > 0 else 1.0
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

    sample_rows, sample_shape = _sample_plan(rows, cols, rotate)
    sample_x = x[sample_rows].reshape(-1)[: math.prod(sample_shape)].reshape(sample_shape)
    sample_layout = fr.plan_layout(*sample_shape, opts.tile)

    def sample_rate(e: float) -> float:
        qp, amp = knobs(e)
        # per-tensor scale: the whole tensor's map, so the sample sees the same step size
        center, step = tf.pixel_map(sample_x if p.per_row else x, amp, p.per_row)
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

    best, trials = search_rate(sample_rate, full_encode, target, e_start, opts.tolerance, e_bounds)
    if abs(best.rate - target) > opts.tolerance:
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


_DECODE_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _DECODE_POOL
    if _DECODE_POOL is None:
        _DECODE_POOL = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="vc-decode")
    return _DECODE_POOL


def decode_frames(enc: EncodedTensor, threads: int | None = None) -> list[torch.Tensor]:
    """Decode the access units of ``enc`` into uint8 frames (CPU, frames in parallel).

    ``threads``: decoder threads inside a single frame (default: all cores); pass 1
    when several tensors are decoded side by side.
    """
    layout = fr.FrameLayout.from_dict(enc.meta["layout"])
    backend = get_backend(enc.meta["codec"])
    data = enc.bitstream.cpu().numpy().tobytes()
    offsets = np.cumsum([0, *enc.meta["frame_bytes"]])
    packets = [data[a:b] for a, b in itertools.pairwise(offsets)]
    if len(packets) == 1:  # one frame: threads inside it
        out = backend.decode(packets, layout.width, layout.height, threads=threads or os.cpu_count() or 1)
    else:  # several frames: one per worker
        jobs = [_pool().submit(backend.decode, [pk], layout.width, layout.height) for pk in packets]
        out = [f for j in jobs for f in j.result()]
    return [torch.from_numpy(f) for f in out]


def reconstruct(enc: EncodedTensor, frames: list[torch.Tensor], device=None, dtype=None) -> torch.Tensor:
    """Frames (any device) → the dequantised, un-rotated tensor."""
    layout = fr.FrameLayout.from_dict(enc.meta["layout"])
    device = torch.device(device) if device is not None else frames[0].device
    return pixels_to_tensor(enc, fr.unpack([f.to(device) for f in frames], layout), dtype)


def pixels_to_tensor(enc: EncodedTensor, pixels: torch.Tensor, dtype=None) -> torch.Tensor:
    """The decoded uint8 ``(rows, cols)`` matrix → the tensor (on the pixels' device)."""
    meta = enc.meta
    x = tf.from_pixels(pixels, enc.center, enc.step, torch.float32)
    if meta["rotation_seed"] is not None:
        x = tf.unrotate(x, meta["rotation_seed"])
    out_dtype = dtype or _FLOAT_DTYPES.get(meta["dtype"], torch.float32)
    n = math.prod(meta["shape"])
    return x.reshape(-1)[:n].reshape(meta["shape"]).to(out_dtype)


def decode_tensor(
    enc: EncodedTensor, device=None, dtype: torch.dtype | None = None, threads: int | None = None
) -> torch.Tensor:
    """Decode ``enc`` to a dense tensor on ``device`` (default CPU) in its original dtype."""
    return reconstruct(enc, decode_frames(enc, threads), device=device or "cpu", dtype=dtype)


def decode_tensors_alike(encs: list[EncodedTensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode records of one shape and codec setting (one frame each) to a ``(len(encs), *shape)`` tensor.

    One decoder for all pictures and one vectorised dequantise + inverse rotation:
    the per-tensor fixed costs of :func:`decode_tensor` dominate for small tensors
    decoded often (the KV cache decodes every block at every step). Same result as
    stacking :func:`decode_tensor` outputs.
    """
    first = encs[0].meta
    same = ("codec", "layout", "shape", "rotation_seed", "scale")
    if any(any(e.meta[k] != first[k] for k in same) for e in encs):
        raise VcConfigError(f"decode_tensors_alike: records differ in one of {same}")
    layout = fr.FrameLayout.from_dict(first["layout"])
    packets = [e.bitstream.numpy().tobytes() for e in encs]
    frames = get_backend(first["codec"]).decode(packets, layout.width, layout.height, threads=os.cpu_count() or 1)
    pixels = fr.unpack_single_frames(torch.from_numpy(np.stack(frames)), layout)
    center = torch.stack([e.center for e in encs]).to(torch.float32)
    step = torch.stack([e.step for e in encs]).to(torch.float32)
    x = pixels.to(torch.float32).sub_(tf.PIXEL_ZERO).mul_(step).add_(center)  # in place: no temporaries
    if first["rotation_seed"] is not None:
        x = tf.unrotate(x, first["rotation_seed"])
    n = math.prod(first["shape"])
    return x.reshape(len(encs), -1)[:, :n].reshape(len(encs), *first["shape"]).to(dtype)
