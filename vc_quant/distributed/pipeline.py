"""Activations and activation gradients crossing pipeline stages as bitstreams (point-to-point).

    # stage 0 (rank 0)                                  # stage 1 (rank 1)
    boundary = StageBoundary(peer=1, forward_bits=3.5)  boundary = StageBoundary(peer=0, forward_bits=3.5)
    h = first_half(ids)                                 h = boundary.recv_forward()   # decoded, requires grad
    boundary.send_forward(h)                            loss = second_half(h, labels); loss.backward()
    boundary.backward(h)   # receives dL/dh, runs it    boundary.send_backward(h)     # sends h.grad

Each message is a size, then the bytes: a one-byte kind, then a packed record
(:func:`~vc_quant.distributed.inflight.pack`) or, with ``bits=None``, the raw tensor
(the uncompressed baseline goes through the same path, so its bytes are counted the same
way). Encoding shares the in-flight path of the gradient hook (one encode per tensor at a
predicted step). Activation gradients may use error feedback: the sender keeps what its
codec dropped and adds it to the next gradient it sends.

``torch.distributed.pipelining`` (``PipelineStage`` + schedules) cannot carry this: its
stages exchange buffers whose shapes are fixed before the first step (shape inference,
``batch_isend_irecv`` into pre-allocated receive buffers); a variable-length bitstream
would have to be padded to a worst case, which gives the saving back. Hence these
point-to-point messages, which any hand-written or custom schedule can use.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from vc_quant.codec.options import check_bits
from vc_quant.distributed.inflight import InflightCodec, unpack
from vc_quant.errors import VcConfigError, VcCorruptDataError, VcInputError

_RAW_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_RAW, _PACKED = 0, 1  # the first byte of every message


@dataclass
class LinkStats:
    """One direction of a boundary: messages, elements, bytes sent and seconds per phase."""

    messages: int = 0
    elements: int = 0
    bytes: int = 0  # everything sent: sizes, headers, payloads
    encode_s: float = 0.0
    send_s: float = 0.0
    decode_s: float = 0.0

    @property
    def bits_per_element(self) -> float:
        return 8.0 * self.bytes / max(self.elements, 1)


def _check_float(tensor: torch.Tensor, what: str) -> None:
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
        kind = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise VcInputError(f"{what}: pipeline boundaries carry float tensors, got {kind}")


def _raw_message(tensor: torch.Tensor) -> torch.Tensor:
    """An uncompressed tensor as bytes: a JSON header (dtype, shape) and the raw values."""
    header = json.dumps({"dtype": str(tensor.dtype).removeprefix("torch."), "shape": list(tensor.shape)}).encode()
    head = bytes([_RAW]) + len(header).to_bytes(4, "little") + header
    body = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return torch.cat([torch.frombuffer(bytearray(head), dtype=torch.uint8), body])


def _from_raw(buf: torch.Tensor) -> torch.Tensor:
    n = int.from_bytes(bytes(buf[:4].tolist()), "little")
    try:
        header = json.loads(bytes(buf[4 : 4 + n].tolist()))
        dtype = _RAW_DTYPES[header["dtype"]]
        shape = [int(s) for s in header["shape"]]
        return buf[4 + n :].clone().view(dtype).reshape(shape)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise VcCorruptDataError(f"uncompressed pipeline message is malformed ({exc})") from exc


def send_compressed(
    tensor: torch.Tensor, dst: int, bits: float | None = 3.5, *, codec: InflightCodec | None = None,
    stream: str = "activations", group: dist.ProcessGroup | None = None, stats: LinkStats | None = None,
) -> torch.Tensor | None:  # fmt: skip
    """Send ``tensor`` to rank ``dst`` at ``bits`` per element (``None``: uncompressed).

    Returns the tensor as the receiver will decode it (``None`` when uncompressed), so the
    sender can keep an error-feedback residual.
    """
    _check_float(tensor, "send_compressed")
    t0 = time.perf_counter()
    decoded = None
    if bits is None:
        message = _raw_message(tensor)
    else:
        codec = codec or InflightCodec(check_bits(bits, "send_compressed: bits"))
        packed, enc = codec.encode(tensor.float(), stream=stream, bits=bits)
        message = torch.cat([torch.tensor([_PACKED], dtype=torch.uint8), packed])
        decoded = codec.decode(enc).reshape(tensor.shape)
    t1 = time.perf_counter()
    device = tensor.device if dist.get_backend(group) == "nccl" else torch.device("cpu")
    size = torch.tensor([message.numel()], dtype=torch.int64, device=device)
    dist.send(size, dst, group=group)
    dist.send(message.to(device), dst, group=group)
    if stats is not None:
        stats.messages += 1
        stats.elements += tensor.numel()
        stats.bytes += size.numel() * size.element_size() + message.numel()
        stats.encode_s += t1 - t0
        stats.send_s += time.perf_counter() - t1
    return decoded


def recv_compressed(
    src: int, *, shape: tuple[int, ...] | None = None, device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None, group: dist.ProcessGroup | None = None, stats: LinkStats | None = None,
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
    buf = buf.cpu()
    kind = int(buf[0])
    if kind == _RAW:
        out = _from_raw(buf[1:])
    elif kind == _PACKED:
        out = InflightCodec.decode(unpack(buf[1:], name=f"message from rank {src}"))
    else:
        raise VcCorruptDataError(f"recv_compressed: message from rank {src} has an unknown kind {kind}")
    if shape is not None and tuple(out.shape) != tuple(shape):
        raise VcInputError(
            f"recv_compressed: expected a tensor of shape {tuple(shape)}, rank {src} sent {tuple(out.shape)}"
        )
    out = out.to(device=device, dtype=dtype or out.dtype)
    if stats is not None:
        stats.decode_s += time.perf_counter() - t1
        stats.send_s += t1 - t0
    return out


@dataclass
class StageBoundary:
    """The link between this stage and ``peer``: activations forward, their gradients backward.

    ``forward_bits`` / ``backward_bits``: bits per element of each direction (``None``:
    uncompressed). ``error_feedback``: the gradient sender keeps what its codec dropped
    and adds it to the next gradient (the paper's residual compensation for activation
    gradients). ``codec``: in-flight codec options (e.g. ``{"codec": "hevc"}``).
    """

    peer: int
    forward_bits: float | None = 3.5
    backward_bits: float | None = None
    error_feedback: bool = True
    codec: dict = field(default_factory=dict)
    group: dist.ProcessGroup | None = None
    forward_link: LinkStats = field(default_factory=LinkStats)  # activations (counted by their sender)
    backward_link: LinkStats = field(default_factory=LinkStats)  # activation gradients

    def __post_init__(self) -> None:
        for name in ("forward_bits", "backward_bits"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, check_bits(value, f"StageBoundary: {name}"))
        self._fwd = InflightCodec(self.forward_bits or 8.0, dict(self.codec))
        self._bwd = InflightCodec(self.backward_bits or 8.0, dict(self.codec))
        self._residual: torch.Tensor | None = None

    # sender side of the activations
    def send_forward(self, hidden: torch.Tensor) -> None:
        send_compressed(hidden, self.peer, self.forward_bits, codec=self._fwd, stream="activations",
                        group=self.group, stats=self.forward_link)  # fmt: skip

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

    def send_backward(self, hidden: torch.Tensor) -> None:
        """Send ``hidden.grad`` (this stage's gradient of its input) back to the peer."""
        if hidden.grad is None:
            raise VcConfigError("StageBoundary.send_backward: the received activations have no gradient yet "
                                "(run backward first; recv_forward(requires_grad=True))")  # fmt: skip
        grad = hidden.grad
        residual = self._residual if self.backward_bits is not None and self.error_feedback else None
        if residual is not None and residual.shape == grad.shape:
            grad = grad + residual
        sent = send_compressed(grad, self.peer, self.backward_bits, codec=self._bwd, stream="gradients",
                               group=self.group, stats=self.backward_link)  # fmt: skip
        if sent is not None and self.error_feedback:
            self._residual = (grad.float() - sent.float()).to(grad.dtype)
