"""The in-flight codec: tensors crossing a process boundary as bitstreams (gradients, activations).

One encode per tensor at a *predicted* quantiser step (no rate search): a
:class:`~vc_quant.codec.ratecontrol.StepPredictor` per stream — the mechanism the KV
cache uses — learns from the rates the codec actually produced, so the running rate
lands on ``bits``. A record travels as one flat uint8 tensor (:func:`pack` /
:func:`unpack`): a 4-byte metadata length, a 2-byte gain exponent, a flags byte (which of
centre and step are per row, whether segment gains follow), the JSON metadata, the segment
gains (a uint32 count, the lengths as uint32, the exponents as int8), the affine map and the
bitstream. Every byte of it is counted as sent.

Gradients are tiny (activation gradients of a mean loss: ~1e-6 and below), and the per-row
affine map is fp16, whose steps underflow there: the decoder then returns noise (measured:
relative error ~1e3-1e4 on SmolLM2 activation gradients). So each tensor is first scaled by
a power of two that brings its RMS to ~1 — exact in floating point — and the exponent
travels with the record. A tensor made of parts of different scales (a DDP bucket: one
gradient per parameter) can take one such gain per part (``segments``): the codec's one step
then gives every part about the same *relative* error, where one gain for the whole bucket
zeroes the small parts (measured on the bench model's bucket at step 5, 1.5 bits: a tenth of
the parameters decoded to zero; docs/results.md).

Defaults per codec (:data:`INFLIGHT_DEFAULTS`; choosing a codec takes that codec's defaults,
never another's): rANS with one step per tensor (rows too large for int8 get their own) and
the trellis quantizer; the video codecs with one affine map per row of the folded tensor
(gradients mix parameters of very different scales) at their fastest presets, no encoder
extras. The default codec was chosen by scripts/bench_ddp.py (docs/results.md). Hidden states
and DDP gradient buckets take :data:`UNROTATED_DEFAULTS` on top (no rotation with rANS: see there).
"""

from __future__ import annotations

import json
import math
import struct
import threading
from dataclasses import dataclass, field

import torch

from vc_quant.codec.decode import decode_tensor
from vc_quant.codec.encode import encode_matrix, pad_folded
from vc_quant.codec.options import CodecOptions, check_bits, merge_defaults
from vc_quant.codec.ratecontrol import StepPredictor
from vc_quant.codec.record import MAX_META_BYTES, EncodedTensor, dump_meta, matrix_shape
from vc_quant.errors import VcConfigError, VcCorruptDataError, VcInputError

#: codec options for tensors in flight, per codec (see the module docstring); callers may override any
INFLIGHT_DEFAULTS = {
    "rans": {},
    "av1": {"preset": "12", "scale": "row", "encoder_params": ""},
    "hevc": {"preset": "ultrafast", "scale": "row", "encoder_params": ""},
    "h264": {"preset": "ultrafast", "scale": "row"},
}
INFLIGHT_CODEC = "rans"
#: options over :data:`INFLIGHT_DEFAULTS` for pipeline hidden states and DDP gradient buckets: no
#: rotation with rANS. Both mix values of very different scales along a row (hidden states: a few
#: channels far larger than the rest, SmolLM2 layer 15: 2 channels hold 46% of the energy; a bucket:
#: the embedding's gradient beside the norms'), and the rotation spreads the large ones' energy — so
#: their quantisation noise — over every value of the row. Measured (docs/results.md): hidden states
#: at layer 15, 3.5 bits, +2.5% perplexity rotated vs -0.05% unrotated; a 7.3 M gradient bucket at
#: 1.5 bits, median per-parameter relative error 0.31 rotated vs 0.035 unrotated.
UNROTATED_DEFAULTS = {"rans": {"rotation": False}}
_HEADER = struct.Struct("<IhB")  # metadata length, gain exponent, map layout flags
_CENTER_PER_ROW, _STEP_PER_ROW, _SEGMENT_GAINS = 1, 2, 4
_FLAGS = _CENTER_PER_ROW | _STEP_PER_ROW | _SEGMENT_GAINS
_COUNT = struct.Struct("<I")
_MAX_EXP = 120  # |gain exponent|: keeps 2**exp and its inverse finite in float32


@dataclass
class WireStats:
    """What went over the wire, summed: messages, elements, bytes and seconds per phase.

    ``bytes`` is everything a rank handed to the collectives or sends (sizes, headers,
    padding, payloads); ``payload_bytes`` the packed records alone.
    """

    messages: int = 0
    elements: int = 0
    bytes: int = 0
    payload_bytes: int = 0
    encode_s: float = 0.0
    transfer_s: float = 0.0
    decode_s: float = 0.0

    @property
    def bits_per_element(self) -> float:
        """All-in bits per element sent."""
        return 8.0 * self.bytes / max(self.elements, 1)


@dataclass
class InflightRecord:
    """A tensor in flight: its codec record and the power-of-two gain(s) applied before encoding.

    ``segments``: ``(length, exponent)`` per consecutive part of the flattened tensor when each
    part had its own gain (then ``gain_exp`` is 0); empty for one gain."""

    enc: EncodedTensor
    gain_exp: int = 0
    segments: tuple[tuple[int, int], ...] = ()


def pack(record: InflightRecord) -> torch.Tensor:
    """A record as one flat uint8 tensor (what is sent)."""
    enc = record.enc
    meta = dump_meta(enc.meta)
    # per row = fp16 (a one-row tensor's per-row map is (1, 1) too)
    flags = (_CENTER_PER_ROW if enc.center.dtype == torch.float16 else 0)
    flags |= _STEP_PER_ROW if enc.step.dtype == torch.float16 else 0
    flags |= _SEGMENT_GAINS if record.segments else 0
    header = _HEADER.pack(len(meta), record.gain_exp, flags)
    parts = [torch.frombuffer(bytearray(header + meta), dtype=torch.uint8)]
    if record.segments:
        lengths, exps = zip(*record.segments, strict=True)
        parts += [
            torch.frombuffer(bytearray(_COUNT.pack(len(lengths))), dtype=torch.uint8),
            torch.tensor(lengths, dtype=torch.int32).view(torch.uint8),
            torch.tensor(exps, dtype=torch.int8).view(torch.uint8),
        ]
    parts += [
        enc.center.contiguous().reshape(-1).view(torch.uint8),
        enc.step.contiguous().reshape(-1).view(torch.uint8),
        enc.bitstream.reshape(-1),
    ]
    return torch.cat(parts)


def unpack(buf: torch.Tensor, name: str = "tensor") -> InflightRecord:
    """Inverse of :func:`pack`; the record is verified (sizes, layout, checksum) before it is returned."""
    data = buf.detach().cpu().contiguous()
    if data.dtype != torch.uint8 or data.dim() != 1 or data.numel() < _HEADER.size:
        raise VcCorruptDataError(f"{name}: a packed record is a 1-D uint8 tensor")
    meta_len, gain_exp, flags = _HEADER.unpack(bytes(data[: _HEADER.size].numpy()))
    if meta_len > min(MAX_META_BYTES, data.numel() - _HEADER.size):
        raise VcCorruptDataError(f"{name}: packed record claims {meta_len} bytes of metadata")
    if abs(gain_exp) > _MAX_EXP or flags & ~_FLAGS:
        raise VcCorruptDataError(f"{name}: packed record has a gain exponent of {gain_exp} / flags {flags}")
    start = _HEADER.size + meta_len
    try:
        meta = json.loads(bytes(data[_HEADER.size : start].numpy()).decode("utf-8"))
        rows, _ = matrix_shape(meta["shape"])
        numel = math.prod(int(d) for d in meta["shape"])
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise VcCorruptDataError(f"{name}: packed record metadata is malformed ({exc})") from exc
    segments: tuple[tuple[int, int], ...] = ()
    if flags & _SEGMENT_GAINS:
        segments, start = _unpack_segments(data, start, numel, name)
    maps = []
    for per_row in (flags & _CENTER_PER_ROW, flags & _STEP_PER_ROW):
        dtype, count = (torch.float16, rows) if per_row else (torch.float32, 1)
        width = count * (2 if per_row else 4)
        if data.numel() < start + width:
            raise VcCorruptDataError(f"{name}: packed record is truncated")
        maps.append(data[start : start + width].clone().view(dtype).reshape(count, 1))
        start += width
    center, step = maps
    enc = EncodedTensor(data[start:].clone(), center, step, meta)
    enc.verify(name)
    return InflightRecord(enc, gain_exp, segments)


def _unpack_segments(data: torch.Tensor, start: int, numel: int, name: str) -> tuple[tuple, int]:
    """The segment gains at ``start``: checked (count against the bytes left, lengths against the
    tensor, exponents against the float32 range) before anything is sized by them."""
    if data.numel() < start + _COUNT.size:
        raise VcCorruptDataError(f"{name}: packed record is truncated")
    (count,) = _COUNT.unpack(bytes(data[start : start + _COUNT.size].numpy()))
    start += _COUNT.size
    if count == 0 or count > numel or 5 * count > data.numel() - start:
        raise VcCorruptDataError(f"{name}: packed record claims {count} segment gains")
    lengths = data[start : start + 4 * count].clone().view(torch.int32).tolist()
    exps = data[start + 4 * count : start + 5 * count].clone().view(torch.int8).tolist()
    if min(lengths) < 0 or sum(lengths) != numel or max(abs(e) for e in exps) > _MAX_EXP:
        raise VcCorruptDataError(f"{name}: packed record's segment gains do not fit its {numel} values")
    return tuple(zip(lengths, exps, strict=True)), start + 5 * count


def _scale_segments(pieces: tuple[torch.Tensor, ...], segments: tuple[tuple[int, int], ...], sign: int) -> None:
    """Multiply each piece (a view) in place by ``2**(sign * exponent)`` of its segment."""
    for piece, (_, exp) in zip(pieces, segments, strict=True):
        if exp:
            piece.mul_(2.0 ** (sign * exp))


def unrotated_options(options: dict | None = None) -> dict:
    """``options`` over :data:`UNROTATED_DEFAULTS` for the codec they choose (what the user set wins)."""
    options = dict(options or {})
    return {**UNROTATED_DEFAULTS.get(options.get("codec", INFLIGHT_CODEC), {}), **options}


def gain_exponent(x: torch.Tensor) -> int:
    """The power of two that brings ``x``'s RMS to ~1 (0 for an all-zero tensor)."""
    rms = float(torch.linalg.vector_norm(x.float())) / math.sqrt(max(x.numel(), 1))
    if not math.isfinite(rms) or rms == 0.0:
        return 0
    return max(-_MAX_EXP, min(_MAX_EXP, -round(math.log2(rms))))


@dataclass
class InflightCodec:
    """Encode/decode tensors in flight at a target rate, one encode each (see the module docstring).

    ``bits``: target all-in bits per element on the wire (metadata and map included).
    ``options``: codec options over the chosen codec's :data:`INFLIGHT_DEFAULTS` (e.g. ``{"codec": "av1"}``).
    """

    bits: float = 2.0
    options: dict = field(default_factory=dict)
    predictor: StepPredictor = field(default_factory=StepPredictor)
    _scratch: torch.Tensor = field(default_factory=lambda: torch.empty(0), init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self.bits = check_bits(self.bits, "bits")
        self.options = merge_defaults(self.options, INFLIGHT_DEFAULTS, INFLIGHT_CODEC)
        try:
            CodecOptions.from_kwargs(**self.options)  # bad options fail here, not at the first step
        except VcConfigError as exc:
            raise VcConfigError(f"in-flight codec: {exc}") from exc

    def __getstate__(self) -> dict:  # copies and pickles (accelerate deep-copies its handlers) start a new scratch
        return {k: v for k, v in self.__dict__.items() if k not in ("_scratch", "_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _scratch=torch.empty(0), _lock=threading.Lock())

    def encode(
        self, tensor: torch.Tensor, stream: str = "", bits: float | None = None, segments: list[int] | None = None
    ) -> tuple[torch.Tensor, InflightRecord]:
        """``(packed bytes, record)`` of ``tensor`` at ``bits`` (default ``self.bits``).

        ``segments``: lengths of consecutive parts of the flattened tensor that each get their
        own power-of-two gain (e.g. one per parameter of a DDP bucket); they must sum to its size."""
        name = stream or "tensor"
        if not tensor.is_floating_point():
            raise VcInputError(f"{name}: in-flight compression needs a float tensor, got {tensor.dtype}")
        target = self.bits if bits is None else check_bits(bits, "bits")
        if tensor.numel() == 0:
            raise VcInputError(f"{name}: cannot send an empty tensor of shape {tuple(tensor.shape)}")
        x = tensor.detach().to("cpu", torch.float32)
        lengths = list(segments) if segments is not None and len(segments) > 1 else [x.numel()]
        if any(not 0 <= n < 2**31 for n in lengths) or sum(lengths) != x.numel():
            raise VcInputError(f"{name}: segments {lengths[:4]}... do not split its {x.numel()} values")
        with self._lock:  # one scratch matrix, reused: a fresh one costs its page faults at every step
            rows, cols = matrix_shape(tuple(x.shape))
            if self._scratch.numel() < rows * cols:
                self._scratch = torch.empty(rows * cols, dtype=torch.float32)
            mat = self._scratch[: rows * cols].view(rows, cols)
            flat = mat.reshape(-1)[: x.numel()]
            flat.copy_(x.reshape(-1))  # the caller's tensor is never scaled in place
            pieces = flat.split(lengths)
            gains = tuple((p.numel(), gain_exponent(p)) for p in pieces)
            _scale_segments(pieces, gains, 1)  # exact: powers of two (see the module docstring)
            if x.dim() < 2:
                pad_folded(mat, x.numel())
            enc = encode_matrix(mat, tuple(x.shape), target, name=name, keep_samples=True,
                                **self.predictor.encode_options(stream), **self.options)  # fmt: skip
        # one gain travels in the header, several as the record's segment table
        record = InflightRecord(enc, 0, gains) if len(gains) > 1 else InflightRecord(enc, gains[0][1])
        packed = pack(record)
        self.predictor.update(stream, 8.0 * packed.numel() / enc.numel, target, enc.stats)
        return packed, record

    @staticmethod
    def decode(
        record: InflightRecord, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        enc = record.enc
        out = decode_tensor(enc, device=device, dtype=torch.float32, name=enc.meta.get("name", "tensor"))
        out = out.contiguous()  # the decoder's fresh output, unscaled in place
        gains = record.segments or ((out.numel(), record.gain_exp),)
        _scale_segments(out.reshape(-1).split([n for n, _ in gains]), gains, -1)
        return out if dtype is None or dtype == torch.float32 else out.to(dtype)
