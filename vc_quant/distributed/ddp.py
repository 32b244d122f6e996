"""A DDP communication hook that sends gradients as video bitstreams.

    from vc_quant.distributed import VcHookState, vc_allreduce_hook
    ddp_model.register_comm_hook(VcHookState(bits=2.0), vc_allreduce_hook)

Per gradient bucket: add the residual the codec dropped last step (error feedback), give
each parameter's gradient its own power-of-two gain (parameters differ in gradient scale by
orders of magnitude; one gain for the bucket zeroes the small ones), encode
once at the predicted step (:class:`~vc_quant.distributed.inflight.InflightCodec`), keep
the new residual, exchange the variable-length bitstreams with ``all_gather`` (sizes
first, then the payloads padded to the largest), decode every rank's stream and average.
Lossy bitstreams cannot be summed on the wire, hence a gather instead of an all-reduce.
Works on ``gloo`` (CPU tensors) and ``nccl`` (payloads copied to the bucket's device for
the collective; encoding and decoding run on the CPU — H100/H200 have no NVENC).
"""

# no `from __future__ import annotations`: DDP checks the hook's annotations as objects
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from vc_quant.codec.options import check_bits
from vc_quant.distributed.inflight import InflightCodec, WireStats, unpack, unrotated_options
from vc_quant.errors import VcConfigError, VcInputError


@dataclass
class VcHookState:
    """State of :func:`vc_allreduce_hook` (one per DDP model).

    Args:
        bits: target all-in bits per gradient element on the wire.
        error_feedback: keep what the codec dropped and add it to the next step's gradient
            (the paper's residual compensation).
        schedule: optional ``step -> bits`` (overrides ``bits``), e.g. :func:`linear_schedule`
            for stronger compression early and weaker later.
        process_group: the group to average over (default: the world).
        codec: codec options over the in-flight defaults and
            :data:`~vc_quant.distributed.inflight.UNROTATED_DEFAULTS` (e.g. ``{"codec": "hevc"}``).
        per_parameter: one power-of-two gain per parameter of the bucket (sent: 5 bytes each), so
            every parameter's gradient gets about the same relative error; False: one for the bucket.
    """

    bits: float = 2.0
    error_feedback: bool = True
    schedule: Callable[[int], float] | None = None
    process_group: dist.ProcessGroup | None = None
    codec: dict = field(default_factory=dict)
    per_parameter: bool = True
    stats: WireStats = field(default_factory=WireStats)  # this rank: sizes + padded payloads it gathered
    step: int = 0  # the iteration being reduced (0-based; advanced at bucket 0, reduced first in backward)
    _iterations: int = field(default=0, init=False, repr=False)
    _codec: InflightCodec = field(init=False, repr=False)
    _residuals: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.bits = check_bits(self.bits, "VcHookState: bits")
        if self.schedule is not None and not callable(self.schedule):
            raise VcConfigError("VcHookState: schedule must be a callable step -> bits")
        self._codec = InflightCodec(self.bits, unrotated_options(self.codec))

    def bits_now(self) -> float:
        return check_bits(self.schedule(self.step), "VcHookState: schedule(step)") if self.schedule else self.bits


def linear_schedule(start_bits: float, end_bits: float, steps: int) -> Callable[[int], float]:
    """Bits moving linearly from ``start_bits`` to ``end_bits`` over ``steps`` iterations, then constant."""
    check_bits(start_bits, "start_bits")
    check_bits(end_bits, "end_bits")
    return lambda step: start_bits + (end_bits - start_bits) * min(step, steps) / max(steps, 1)


def _parameter_lengths(bucket: dist.GradBucket) -> list[int] | None:
    """The bucket's per-parameter lengths (its buffer is their gradients end to end), or None."""
    lengths = [g.numel() for g in bucket.gradients()]
    return lengths if sum(lengths) == bucket.buffer().numel() else None


def _gather(tensor: torch.Tensor, group, world: int) -> list[torch.Tensor]:
    out = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(out, tensor, group=group)
    return out


def vc_allreduce_hook(state: VcHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average the bucket's gradients over the group, sent as bitstreams (see the module docstring)."""
    grad = bucket.buffer()
    if not grad.is_floating_point():
        raise VcInputError(f"vc_allreduce_hook: bucket {bucket.index()} holds {grad.dtype} gradients, not float")
    group = state.process_group or dist.group.WORLD
    world = dist.get_world_size(group)
    index = bucket.index()
    stats = state.stats

    if index == 0:
        state.step, state._iterations = state._iterations, state._iterations + 1
    t0 = time.perf_counter()
    x = grad.detach().float().cpu()
    residual = state._residuals.get(index)
    # DDP rebuilds its buckets after the first iteration (new sizes, new order): a residual of
    # the old layout cannot be mapped onto the new one and is dropped (once)
    if state.error_feedback and residual is not None and residual.shape == x.shape:
        x = residual.add_(x)  # the residual's buffer now holds gradient + residual (no new tensor)
    packed, enc = state._codec.encode(x, stream=f"bucket{index}", bits=state.bits_now(),
                                      segments=_parameter_lengths(bucket) if state.per_parameter else None)
    own = state._codec.decode(enc).reshape(x.shape)  # the encoder kept its samples: no entropy decode
    if state.error_feedback:
        state._residuals[index] = x.sub_(own) if x is residual else x - own
    t1 = time.perf_counter()

    # sizes first, then every rank's payload padded to the largest
    size = torch.tensor([packed.numel()], dtype=torch.int64, device=grad.device)
    sizes = [int(s) for s in _gather(size, group, world)]
    padded = torch.zeros(max(sizes), dtype=torch.uint8)
    padded[: packed.numel()] = packed
    payloads = _gather(padded.to(grad.device), group, world)
    t2 = time.perf_counter()

    rank = dist.get_rank(group)
    # summed in rank order on every rank: float sums depend on their order, and the replicas must
    # apply bit-identical gradients (rank 0's stream first; a fresh decoder tensor, summed into in place)
    total = None
    for r, (payload, n) in enumerate(zip(payloads, sizes, strict=True)):
        decoded = own if r == rank else state._codec.decode(unpack(payload[:n], name=f"bucket {index} of rank {r}"))
        total = decoded.reshape(x.shape) if total is None else total.add_(decoded.reshape(x.shape))
    grad.copy_(total.div_(world))
    t3 = time.perf_counter()

    stats.messages += 1
    stats.elements += grad.numel()
    stats.payload_bytes += packed.numel()
    stats.bytes += size.numel() * size.element_size() + padded.numel()
    stats.encode_s += t1 - t0
    stats.transfer_s += t2 - t1
    stats.decode_s += t3 - t2
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(grad)
    return fut


def register(ddp_model: torch.nn.parallel.DistributedDataParallel, state: VcHookState) -> None:
    """``ddp_model.register_comm_hook(state, vc_allreduce_hook)`` with the set-up checked first.

    DDP accepts a hook registered after training started, but the error-feedback residuals
    and the rate model would then start mid-run; gradients already present mean a backward
    ran. (accelerate: call it on the model ``accelerator.prepare`` returned, or use
    :class:`VcDDPKwargs`.)
    """
    if not isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
        raise VcConfigError(
            f"register: expected the DistributedDataParallel-wrapped model, got {type(ddp_model).__name__} "
            "(with accelerate: the model accelerator.prepare returned)"
        )
    if not isinstance(state, VcHookState):
        raise VcConfigError(f"register: expected a VcHookState, got {type(state).__name__}")
    if any(p.grad is not None for p in ddp_model.parameters()):
        raise VcConfigError(
            "register the vc_quant gradient hook before the first backward: this model already has gradients"
        )
    ddp_model.register_comm_hook(state, vc_allreduce_hook)


def _ddp_kwargs_class():
    from accelerate.utils import DistributedDataParallelKwargs

    @dataclass
    class VcDDPKwargs(DistributedDataParallelKwargs):
        """accelerate's DDP options + the vc_quant gradient hook, registered when accelerate wraps the
        model (set as ``accelerator.ddp_handler``: :func:`use_with_accelerate`, :func:`use_in_trainer`)."""

        vc_state: VcHookState | None = None

        def to_kwargs(self) -> dict:
            kwargs = super().to_kwargs()
            kwargs.pop("vc_state", None)  # not a DDP argument
            return kwargs

        def register_comm_hook(self, model) -> None:
            if self.vc_state is not None:
                register(model, self.vc_state)

    return VcDDPKwargs


def ddp_kwargs(state: VcHookState, **ddp_options):
    """An accelerate ``DistributedDataParallelKwargs`` that registers the vc_quant hook on the prepared model."""
    return _ddp_kwargs_class()(vc_state=state, **ddp_options)


def use_with_accelerate(accelerator, state: VcHookState) -> None:
    """Make ``accelerator.prepare`` register the vc_quant hook when it wraps a model in DDP.

    Call before ``prepare``. accelerate accepts only its own handler classes in
    ``kwargs_handlers``, so the handler is set on the accelerator; its DDP options
    (``find_unused_parameters``, bucket size, …) are kept.
    """
    from dataclasses import asdict

    current = getattr(accelerator, "ddp_handler", None)
    options = {k: v for k, v in asdict(current).items() if k != "vc_state"} if current is not None else {}
    accelerator.ddp_handler = ddp_kwargs(state, **options)


def use_in_trainer(trainer, state: VcHookState) -> None:
    """Make a ``transformers.Trainer`` register the vc_quant hook when it wraps the model in DDP
    (call before ``trainer.train()``; the trainer's own DDP options are kept)."""
    use_with_accelerate(trainer.accelerator, state)
