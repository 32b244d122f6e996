"""Activations and activation gradients crossing pipeline stages as bitstreams (point-to-point).

    # stage 0 (rank 0)                                  # stage 1 (rank 1)
    boundary = StageBoundary(peer=1, forward_bits=3.5)  boundary = StageBoundary(peer=0, forward_bits=3.5)
    h = first_half(ids)                                 h = boundary.recv_forward()   # decoded, requires grad
    boundary.send_forward(h)                            loss = second_half(h, labels); loss.backward()
    boundary.backward(h)   # receives dL/dh, runs it    boundary.send_backward(h)     # sends h.grad

Each message is a size, then the bytes: a one-byte kind, then a packed record
(:func:`~vc_quant.distributed.inflight.pack`) or, with ``bits=None``, the raw tensor
(the uncompressed baseline goes through the same path, so its bytes are counted the same
way). Messages too small to carry a record's fixed cost (one token while generating) go
in fp16. Encoding shares the in-flight path of the gradient hook (one encode per tensor at a
predicted step). Activation gradients may use error feedback: the sender keeps what its
codec dropped and adds it to the next gradient it sends.

These variable-length point-to-point messages serve hand-written or custom schedules.
``torch.distributed.pipelining``'s own schedules (GPipe, 1F1B, …) exchange buffers of fixed
shapes; :mod:`vc_quant.distributed.engine` codes messages into fixed-size carriers for them
(the rANS coder's size is known before coding, so a target rate plus a small margin fits).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from vc_quant.codec.options import BITS_RANGE, check_bits
from vc_quant.distributed.inflight import InflightCodec, WireStats, unpack, unrotated_options
from vc_quant.errors import VcConfigError, VcCorruptDataError, VcInputError

_RAW_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_RAW, _PACKED, _SMALL = 0, 1, 2  # kinds of message part (_SMALL: fp16 on a compressed link, read as float32)
# below this many elements a compressed link sends fp16: a packed record's fixed cost (headers
# and metadata, ~300 bytes) exceeds the budget of e.g. one token's 576 values at 3.5 bits (252
# bytes), and the codec then decodes noise (measured on SmolLM2 hidden states: relative error
# ~1.0 at 4.5 bits for one token, 0.05 for 63 tokens)
MIN_PACKED_ELEMENTS = 8192
_LEN = 8  # every part: kind (1 byte) + length (8 bytes) + payload


def _check_float(tensor: torch.Tensor, what: str) -> None:
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        kind = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise VcInputError(f"{what}: pipeline boundaries carry float tensors, got {kind}")


def _part(kind: int, payload: torch.Tensor) -> torch.Tensor:
    head = bytes([kind]) + payload.numel().to_bytes(_LEN, "little")
    return torch.cat([torch.frombuffer(bytearray(head), dtype=torch.uint8), payload])


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    """An uncompressed tensor: a JSON header (dtype, shape) and the raw values."""
    header = json.dumps({"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape)}).encode()
    body = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return torch.cat([torch.frombuffer(bytearray(len(header).to_bytes(4, "little") + header), dtype=torch.uint8),
                      body])  # fmt: skip


def _from_raw(buf: torch.Tensor) -> torch.Tensor:
    n = int.from_bytes(bytes(buf[:4].tolist()), "little")
    try:
        header = json.loads(bytes(buf[4 : 4 + n].tolist()))
        dtype = _RAW_DTYPES[header["dtype"]]
        shape = [int(s) for s in header["shape"]]
        return buf[4 + n :].clone().view(dtype).reshape(shape)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise VcCorruptDataError(f"uncompressed pipeline message is malformed ({exc})") from exc


def _parts(buf: torch.Tensor, src: int) -> list[torch.Tensor]:
    """Decode the parts of one message (raw tensors and packed records)."""
    out, at = [], 0
    while at < buf.numel():
        kind, n = int(buf[at]), int.from_bytes(bytes(buf[at + 1 : at + 1 + _LEN].tolist()), "little")
        payload = buf[at + 1 + _LEN : at + 1 + _LEN + n]
        if payload.numel() != n or kind not in (_RAW, _PACKED, _SMALL):
            raise VcCorruptDataError(f"recv_compressed: message from rank {src} is truncated or malformed")
        if kind == _PACKED:
            out.append(InflightCodec.decode(unpack(payload, f"rank {src}")))
        else:
            out.append(_from_raw(payload).float() if kind == _SMALL else _from_raw(payload))
        at += 1 + _LEN + n
    return out


def send_compressed(
    tensor: torch.Tensor, dst: int, bits: float | None = 3.5, *, sink_tokens: int = 0,
    codec: InflightCodec | None = None, stream: str = "activations", group: dist.ProcessGroup | None = None,
    stats: WireStats | None = None,
) -> torch.Tensor | None:  # fmt: skip
    """Send ``tensor`` to rank ``dst`` at ``bits`` per element, all-in (``None``: uncompressed).

    ``sink_tokens``: the first tokens along dimension -2 go in fp16 (the sequence's first
    token carries activations ~300x larger than the others in SmolLM2; measured
    perplexity at 3.5 bits: +4.5% without, +0.7% with one), the rest compressed at the
    rate that keeps the whole message at ``bits``. Tensors of fewer than
    :data:`MIN_PACKED_ELEMENTS` elements (e.g. one token while generating) go in fp16.
    Returns the tensor as the receiver will decode it (``None`` when uncompressed), so the
    sender can keep an error-feedback residual.
    """
    _check_float(tensor, "send_compressed")
    t0 = time.perf_counter()
    decoded = None
    if bits is None:
        message = _part(_RAW, _raw(tensor))
    elif tensor.numel() < MIN_PACKED_ELEMENTS:  # too small to carry a record: fp16 (see MIN_PACKED_ELEMENTS)
        small = tensor.detach().to(torch.float16)
        message, decoded = _part(_SMALL, _raw(small)), small.float()
    else:
        if codec is None:
            options = unrotated_options() if stream == "activations" else {}
            codec = InflightCodec(check_bits(bits, "send_compressed: bits"), options)
        k = min(sink_tokens, tensor.shape[-2]) if tensor.dim() >= 2 else 0
        sink, body = tensor[..., :k, :].to(torch.float16), tensor[..., k:, :] if k else tensor
        parts = [_part(_RAW, _raw(sink))] if k else []
        if body.numel():
            sink_bits = 8 * (parts[0].numel() if parts else 0)
            body_bits = min(max((bits * tensor.numel() - sink_bits) / body.numel(), BITS_RANGE[0]), BITS_RANGE[1])
            packed, enc = codec.encode(body.float(), stream=stream, bits=body_bits)
            parts.append(_part(_PACKED, packed))
            body = codec.decode(enc).reshape(body.shape)
        message = torch.cat(parts)
        decoded = torch.cat([sink.to(body.dtype), body], dim=-2) if k else body
    t1 = time.perf_counter()
    device = tensor.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    size = torch.tensor([message.numel()], dtype=torch.int64, device=device)
    dist.send(size, dst, group=group)
    dist.send(message.to(device), dst, group=group)
    if stats is not None:
        stats.messages += 1
        stats.elements += tensor.numel()
        stats.bytes += size.numel() * size.element_size() + message.numel()
        stats.payload_bytes += message.numel()
        stats.encode_s += t1 - t0
        stats.transfer_s += time.perf_counter() - t1
    return decoded


def recv_compressed(
    src: int, *, shape: tuple[int, ...] | None = None, device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None, group: dist.ProcessGroup | None = None, stats: WireStats | None = None,
) -> torch.Tensor:  # fmt: skip
    """Receive a tensor sent by :func:`send_compressed` from rank ``src`` (decoded; checked against ``shape``)."""
    link = torch.device(device) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    t0 = time.perf_counter()
    size = torch.empty(1, dtype=torch.int64, device=link)
    dist.recv(size, src, group=group)
    n = int(size)
    if not 0 < n < 1 << 40:
        raise VcCorruptDataError(f"recv_compressed: peer {src} announced a message of {n} bytes")
    buf = torch.empty(n, dtype=torch.uint8, device=link)
    dist.recv(buf, src, group=group)
    t1 = time.perf_counter()
    parts = _parts(buf.cpu(), src)
    out = parts[0] if len(parts) == 1 else torch.cat([p.float() for p in parts], dim=-2)
    if shape is not None and tuple(out.shape) != tuple(shape):
        raise VcInputError(
            f"recv_compressed: expected a tensor of shape {tuple(shape)}, rank {src} sent {tuple(out.shape)}"
        )
    out = out.to(device=device, dtype=dtype or (out.dtype if len(parts) == 1 else torch.float32))
    if stats is not None:
        stats.decode_s += time.perf_counter() - t1
        stats.transfer_s += t1 - t0
    return out


@dataclass
class StageBoundary:
    """The link between this stage and ``peer``: activations forward, their gradients backward.

    ``forward_bits`` / ``backward_bits``: bits per element of each direction (``None``:
    uncompressed). ``sink_tokens``: the sequence's first tokens cross in fp16 (see
    :func:`send_compressed`). ``error_feedback``: the gradient sender keeps what its codec
    dropped and adds it to the next gradient (the paper's residual compensation for
    activation gradients). ``codec``: in-flight codec options (e.g. ``{"codec": "hevc"}``); the
    activations take :data:`~vc_quant.distributed.inflight.UNROTATED_DEFAULTS` under them.
    """

    peer: int
    forward_bits: float | None = 3.5
    backward_bits: float | None = None
    sink_tokens: int = 1
    error_feedback: bool = True
    codec: dict = field(default_factory=dict)
    group: dist.ProcessGroup | None = None
    forward_link: WireStats = field(default_factory=WireStats)  # activations (bytes counted by their sender)
    backward_link: WireStats = field(default_factory=WireStats)  # activation gradients

    def __post_init__(self) -> None:
        if isinstance(self.sink_tokens, bool) or not isinstance(self.sink_tokens, int) or self.sink_tokens < 0:
            raise VcConfigError(f"StageBoundary: sink_tokens={self.sink_tokens!r}: expected an integer >= 0")
        for name in ("forward_bits", "backward_bits"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, check_bits(value, f"StageBoundary: {name}"))
        self._fwd = InflightCodec(self.forward_bits or 8.0, unrotated_options(self.codec))
        self._bwd = InflightCodec(self.backward_bits or 8.0, dict(self.codec))
        self._residual: torch.Tensor | None = None

    # sender side of the activations
    def send_forward(self, hidden: torch.Tensor, first_position: int = 0) -> None:
        """Send activations whose first token sits at ``first_position`` of the sequence."""
        send_compressed(hidden, self.peer, self.forward_bits, sink_tokens=max(0, self.sink_tokens - first_position),
                        codec=self._fwd, stream="activations", group=self.group, stats=self.forward_link)  # fmt: skip

    def backward(self, hidden: torch.Tensor) -> None:
        """Receive dL/d``hidden`` from the peer and run this stage's backward with it."""
        grad = recv_compressed(self.peer, shape=tuple(hidden.shape), device=hidden.device, dtype=hidden.dtype,
                               group=self.group, stats=self.backward_link)  # fmt: skip
        hidden.backward(grad)

    # receiver side of the activations
    def recv_forward(self, shape: tuple[int, ...] | None = None, requires_grad: bool = True,
                     device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:  # fmt: skip
        hidden = recv_compressed(self.peer, shape=shape, device=device, dtype=dtype, group=self.group,
                                 stats=self.forward_link)  # fmt: skip
        return hidden.requires_grad_(requires_grad)

    def send_backward(self, hidden: torch.Tensor, first_position: int = 0) -> torch.Tensor:
        """Send ``hidden.grad`` (this stage's gradient of its input) back; returns it as the peer decodes it."""
        if hidden.grad is None:
            raise VcConfigError("StageBoundary.send_backward: the received activations have no gradient yet "
                                "(run backward first; recv_forward(requires_grad=True))")  # fmt: skip
        grad = hidden.grad
        residual = self._residual if self.backward_bits is not None and self.error_feedback else None
        if residual is not None and residual.shape == grad.shape:
            grad = grad + residual
        sent = send_compressed(grad, self.peer, self.backward_bits, codec=self._bwd, stream="gradients",
                               sink_tokens=max(0, self.sink_tokens - first_position), group=self.group,
                               stats=self.backward_link)  # fmt: skip
        if sent is not None and self.error_feedback:
            self._residual = (grad.float() - sent.float()).to(grad.dtype)
        return sent if sent is not None else grad
