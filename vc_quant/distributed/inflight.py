"""The in-flight codec: tensors crossing a process boundary as bitstreams (gradients, activations).

One encode per tensor at a *predicted* quantiser step (no rate search): a
:class:`~vc_quant.codec.ratecontrol.StepPredictor` per stream — the mechanism the KV
cache uses — learns from the rates the codec actually produced, so the running rate
lands on ``bits``. A record travels as one flat uint8 tensor (:func:`pack` /
:func:`unpack`): a 4-byte metadata length, the JSON metadata, the affine map and the
bitstream. Every byte of it is counted as sent.

Defaults measured for in-flight use (scripts/bench_ddp.py): AV1 at SVT-AV1 preset 12
(the fastest), one affine map per row of the folded tensor (gradients mix parameters of
very different scales), no encoder extras.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

import torch

from vc_quant.codec.decode import decode_tensor
from vc_quant.codec.encode import encode_tensor
from vc_quant.codec.options import CodecOptions, check_bits
from vc_quant.codec.ratecontrol import StepPredictor
from vc_quant.codec.record import MAX_META_BYTES, EncodedTensor, dump_meta, matrix_shape
from vc_quant.errors import VcConfigError, VcCorruptDataError, VcInputError

#: codec options for tensors in flight (see the module docstring); callers may override any
INFLIGHT_DEFAULTS = {"codec": "av1", "preset": "12", "scale": "row", "encoder_params": ""}
_HEADER = struct.Struct("<I")


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


def pack(enc: EncodedTensor) -> torch.Tensor:
    """A record as one flat uint8 tensor (what is sent)."""
    meta = dump_meta(enc.meta)
    parts = [
        torch.frombuffer(bytearray(_HEADER.pack(len(meta)) + meta), dtype=torch.uint8),
        enc.center.contiguous().reshape(-1).view(torch.uint8),
        enc.step.contiguous().reshape(-1).view(torch.uint8),
        enc.bitstream.reshape(-1),
    ]
    return torch.cat(parts)


def unpack(buf: torch.Tensor, name: str = "tensor") -> EncodedTensor:
    """Inverse of :func:`pack`; the record is verified (sizes, layout, checksum) before it is returned."""
    data = buf.detach().cpu().contiguous()
    if data.dtype != torch.uint8 or data.dim() != 1 or data.numel() < _HEADER.size:
        raise VcCorruptDataError(f"{name}: a packed record is a 1-D uint8 tensor")
    (meta_len,) = _HEADER.unpack(bytes(data[: _HEADER.size].numpy()))
    if meta_len > min(MAX_META_BYTES, data.numel() - _HEADER.size):
        raise VcCorruptDataError(f"{name}: packed record claims {meta_len} bytes of metadata")
    start = _HEADER.size + meta_len
    try:
        meta = json.loads(bytes(data[_HEADER.size : start].numpy()).decode("utf-8"))
        rows, _ = matrix_shape(meta["shape"])
        per_row = meta["scale"] == "row"
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise VcCorruptDataError(f"{name}: packed record metadata is malformed ({exc})") from exc
    dtype, count = (torch.float16, rows) if per_row else (torch.float32, 1)
    width = count * (2 if per_row else 4)
    if data.numel() < start + 2 * width:
        raise VcCorruptDataError(f"{name}: packed record is truncated")
    center = data[start : start + width].clone().view(dtype).reshape(count, 1)
    step = data[start + width : start + 2 * width].clone().view(dtype).reshape(count, 1)
    enc = EncodedTensor(data[start + 2 * width :].clone(), center, step, meta)
    enc.verify(name)
    return enc


@dataclass
class InflightCodec:
    """Encode/decode tensors in flight at a target rate, one encode each (see the module docstring).

    ``bits``: target all-in bits per element on the wire (metadata and map included).
    ``options``: codec options over :data:`INFLIGHT_DEFAULTS` (e.g. ``codec="hevc"``).
    """

    bits: float = 2.0
    options: dict = field(default_factory=dict)
    predictor: StepPredictor = field(default_factory=StepPredictor)

    def __post_init__(self) -> None:
        self.bits = check_bits(self.bits, "bits")
        self.options = {**INFLIGHT_DEFAULTS, **self.options}
        try:
            CodecOptions.from_kwargs(**self.options)  # bad options fail here, not at the first step
        except VcConfigError as exc:
            raise VcConfigError(f"in-flight codec: {exc}") from exc

    def encode(
        self, tensor: torch.Tensor, stream: str = "", bits: float | None = None
    ) -> tuple[torch.Tensor, EncodedTensor]:
        """``(packed bytes, record)`` of ``tensor`` at ``bits`` (default ``self.bits``)."""
        if not tensor.is_floating_point():
            raise VcInputError(f"{stream or 'tensor'}: in-flight compression needs a float tensor, got {tensor.dtype}")
        target = self.bits if bits is None else check_bits(bits, "bits")
        enc = encode_tensor(tensor.detach(), target, name=stream or "tensor", **self.predictor.encode_options(stream),
                            **self.options)  # fmt: skip
        packed = pack(enc)
        self.predictor.update(stream, 8.0 * packed.numel() / enc.numel, target, enc.stats)
        return packed, enc

    @staticmethod
    def decode(
        enc: EncodedTensor, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        return decode_tensor(enc, device=device, dtype=dtype, name=enc.meta.get("name", "tensor"))
