"""Compressed activations through ``torch.distributed.pipelining``'s own schedules (GPipe, 1F1B, …).

torch's pipeline engine moves buffers of a fixed shape between stages. A :class:`FixedLink`
codes every tensor of one shape into a fixed-size **carrier** — a float32 tensor whose bytes
are ``[length (4 bytes) | packed record | zero padding]`` — so the engine can carry it like
any activation. The rANS coder's size is known before coding (its rate is computed from the
tables), so the capacity is the target rate plus a margin; a message that would not fit is
coded again at a lower rate (counted in :attr:`FixedLink.refits`).

:class:`CompressedStage` wraps a stage module: its output is coded into the forward link's
carrier, its input decoded from the previous stage's carrier. Autograd runs through the
boundary: the receiving stage codes the activation gradient into a carrier of the same
shape (the engine sends gradients with the shape of the output they belong to), and the
sending stage decodes it into the gradient of its output. Both directions therefore use
the same capacity: the larger of the two links'.

    fwd = FixedLink((mb, seq, hidden), bits=3.5)
    bwd = FixedLink((mb, seq, hidden), bits=4.0)
    stage = CompressedStage(DecoderStage(model, rank, 2), send=(fwd, bwd) if rank == 0 else None,
                            recv=(fwd, bwd) if rank == 1 else None)
    pipe = PipelineStage(stage, rank, 2, device, input_args=..., output_args=...)
    schedule = ScheduleGPipe(pipe, n_microbatches=4, loss_fn=...)

Messages below :data:`~vc_quant.distributed.pipeline.MIN_PACKED_ELEMENTS` go as fp16 (a record's
fixed cost would not fit their budget; :class:`~vc_quant.distributed.StageBoundary` does the same).
Activation gradients get no error feedback here (StageBoundary has it).
"""

from __future__ import annotations

import math
import struct

import torch
from torch import nn

from vc_quant.codec.options import check_bits
from vc_quant.distributed.inflight import InflightCodec, WireStats, unpack, unrotated_options
from vc_quant.distributed.pipeline import MIN_PACKED_ELEMENTS
from vc_quant.errors import VcConfigError, VcCorruptDataError

_LENGTH = struct.Struct("<I")
_MARGIN_BITS = 0.15  # capacity above the target rate: the predicted step lands within ~0.05 bits
_SLACK_BYTES = 512  # for the record's metadata and headers
_REFITS = 4


class FixedLink:
    """Tensors of one ``shape`` ↔ fixed-size float32 carriers at ``bits`` per element (see module doc).

    ``bits=None``: an uncompressed link in the same carrier form (fp32 bytes), the baseline.
    ``capacity_bits``: carrier size in bits per element (default: ``bits`` + margin); links
    whose carriers must have one shape (the two directions of a boundary) share the larger.
    """

    def __init__(self, shape: tuple[int, ...], bits: float | None, codec: dict | None = None,
                 capacity_bits: float | None = None, stream: str = "activations") -> None:  # fmt: skip
        self.shape = tuple(int(s) for s in shape)
        self.numel = math.prod(self.shape)
        self.bits = None if bits is None else check_bits(bits, "FixedLink: bits")
        self.stream = stream
        self.small = self.bits is not None and self.numel < MIN_PACKED_ELEMENTS
        options = unrotated_options(codec) if stream == "activations" else dict(codec or {})
        self.codec = InflightCodec(self.bits, options) if self.bits is not None else None
        if self.bits is None:
            need = 4 * self.numel
        elif self.small:
            need = 2 * self.numel
        else:
            need = math.ceil((capacity_bits or self.bits + _MARGIN_BITS) * self.numel / 8) + _SLACK_BYTES
        self.capacity = _LENGTH.size + need  # bytes
        self.floats = math.ceil(self.capacity / 4)
        self.stats = WireStats()
        self.refits = 0

    @staticmethod
    def shared(shape: tuple[int, ...], forward_bits: float | None, backward_bits: float | None,
               codec: dict | None = None) -> tuple[FixedLink, FixedLink]:  # fmt: skip
        """The two links of one boundary, with one carrier shape (the larger capacity)."""
        cap = None
        if forward_bits is not None and backward_bits is not None:
            cap = max(forward_bits, backward_bits) + _MARGIN_BITS
        fwd = FixedLink(shape, forward_bits, codec, cap, "activations")
        bwd = FixedLink(shape, backward_bits, codec, cap, "gradients")
        if fwd.floats != bwd.floats:
            raise VcConfigError("FixedLink.shared: compress both directions or neither (one carrier shape)")
        return fwd, bwd

    def example(self, device: torch.device | str = "cpu", training: bool = True) -> torch.Tensor:
        """A carrier-shaped tensor (for ``PipelineStage(input_args=…, output_args=…)``); the engine reads
        from it whether gradients cross the boundary (``training``)."""
        return torch.zeros(self.floats, dtype=torch.float32, device=device).requires_grad_(training)

    def encode(self, tensor: torch.Tensor) -> torch.Tensor:
        if tuple(tensor.shape) != self.shape:
            raise VcConfigError(f"FixedLink: a {tuple(tensor.shape)} tensor on a link for {self.shape}")
        x = tensor.detach()
        if self.bits is None:
            payload = x.float().contiguous().reshape(-1).view(torch.uint8).cpu()
        elif self.small:
            payload = x.half().contiguous().reshape(-1).view(torch.uint8).cpu()
        else:
            payload = self._fit(x)
        buf = torch.zeros(self.floats * 4, dtype=torch.uint8)
        buf[: _LENGTH.size] = torch.frombuffer(bytearray(_LENGTH.pack(payload.numel())), dtype=torch.uint8)
        buf[_LENGTH.size : _LENGTH.size + payload.numel()] = payload
        self.stats.messages += 1
        self.stats.elements += self.numel
        self.stats.bytes += buf.numel()
        self.stats.payload_bytes += payload.numel()
        return buf.view(torch.float32).to(tensor.device)

    def _fit(self, x: torch.Tensor) -> torch.Tensor:
        """A packed record that fits the carrier: at the target, else coded again lower (counted)."""
        room = self.capacity - _LENGTH.size
        bits = self.bits
        for _ in range(_REFITS):
            packed, _ = self.codec.encode(x.float(), stream=self.stream, bits=bits)
            if packed.numel() <= room:
                return packed
            self.refits += 1
            bits = max(1.0, bits * room / packed.numel() - 0.05)
        raise VcConfigError(f"FixedLink: a {self.shape} message does not fit {room} bytes at {bits:.2f} bits")

    def decode(self, carrier: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        data = carrier.detach().contiguous().view(torch.uint8).cpu()
        if data.numel() != self.floats * 4:
            raise VcCorruptDataError(f"FixedLink: carrier of {data.numel()} bytes, expected {self.floats * 4}")
        (length,) = _LENGTH.unpack(bytes(data[: _LENGTH.size].numpy()))
        if length > data.numel() - _LENGTH.size:
            raise VcCorruptDataError(f"FixedLink: carrier claims {length} bytes")
        payload = data[_LENGTH.size : _LENGTH.size + length]
        if self.bits is None:
            out = payload.clone().view(torch.float32)
        elif self.small:
            out = payload.clone().view(torch.float16).float()
        else:
            out = InflightCodec.decode(unpack(payload, f"{self.stream} carrier"))
        if out.numel() != self.numel:
            raise VcCorruptDataError(f"FixedLink: decoded {out.numel()} values, the link carries {self.numel}")
        return out.reshape(self.shape).to(device=device, dtype=dtype)


class _SendOutput(torch.autograd.Function):
    """Sending stage: output → forward carrier; gradient carrier → output gradient."""

    @staticmethod
    def forward(ctx, output, fwd: FixedLink, bwd: FixedLink):
        ctx.bwd, ctx.dtype, ctx.device = bwd, output.dtype, output.device
        return fwd.encode(output)

    @staticmethod
    def backward(ctx, carrier):
        return ctx.bwd.decode(carrier, ctx.dtype, ctx.device), None, None


class _RecvInput(torch.autograd.Function):
    """Receiving stage: forward carrier → input; input gradient → gradient carrier."""

    @staticmethod
    def forward(ctx, carrier, fwd: FixedLink, bwd: FixedLink, dtype: torch.dtype):
        ctx.bwd = bwd
        return fwd.decode(carrier, dtype, carrier.device)

    @staticmethod
    def backward(ctx, grad):
        return ctx.bwd.encode(grad.contiguous()), None, None, None


class CompressedStage(nn.Module):
    """``stage`` with its output sent and/or its input received through fixed links (module doc).

    ``send`` / ``recv``: ``(forward link, backward link)`` of the boundary after / before this
    stage, or None. ``dtype``: the dtype of the decoded input (the stage's activation dtype).
    """

    def __init__(
        self, stage: nn.Module, send: tuple[FixedLink, FixedLink] | None = None,
        recv: tuple[FixedLink, FixedLink] | None = None, dtype: torch.dtype = torch.float32,
    ) -> None:  # fmt: skip
        super().__init__()
        self.stage, self.send, self.recv, self.dtype = stage, send, recv, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.recv is not None:
            x = _RecvInput.apply(x, *self.recv, self.dtype)
        y = self.stage(x)
        if self.send is not None:
            y = _SendOutput.apply(y, *self.send)
        return y


def build_stage(
    module: nn.Module, rank: int, links: list[tuple[FixedLink, FixedLink]], first_input: torch.Tensor,
    last_output: torch.Tensor, device: torch.device | str = "cpu", training: bool = True,
):  # fmt: skip
    """A ``torch.distributed.pipelining.PipelineStage`` for stage ``rank`` of ``len(links) + 1`` stages.

    ``links[i]``: the (forward, backward) links of the boundary between stages i and i + 1.
    ``first_input`` / ``last_output``: example microbatch input of the first stage and output of
    the last (the carriers' examples come from the links). ``training``: gradients cross.
    """
    from torch.distributed.pipelining import PipelineStage

    num_stages = len(links) + 1
    send = links[rank] if rank < num_stages - 1 else None
    recv = links[rank - 1] if rank > 0 else None
    wrapped = CompressedStage(module, send=send, recv=recv)
    ex_in = first_input if recv is None else recv[0].example(device, training)
    ex_out = last_output if send is None else send[0].example(device, training)
    return PipelineStage(wrapped, rank, num_stages, torch.device(device), input_args=(ex_in,), output_args=(ex_out,))
