"""Tensors compressed in flight on ``torch.distributed`` (independent of transformers).

* :mod:`~vc_quant.distributed.ddp` — a DDP communication hook for gradients
  (:class:`VcHookState`, :func:`vc_allreduce_hook`);
* :mod:`~vc_quant.distributed.pipeline` — activations and activation gradients between pipeline
  stages (:func:`send_compressed`, :func:`recv_compressed`, :class:`StageBoundary`);
* :mod:`~vc_quant.distributed.engine` — the same through ``torch.distributed.pipelining``'s
  schedules (:class:`FixedLink` carriers, :class:`CompressedStage`);
* :mod:`~vc_quant.distributed.inflight` — the shared in-flight codec (predicted step, one encode per
  tensor, packed records, measured bytes).
"""

from vc_quant.distributed.ddp import (
    VcHookState,
    ddp_kwargs,
    linear_schedule,
    register,
    use_in_trainer,
    use_with_accelerate,
    vc_allreduce_hook,
)
from vc_quant.distributed.engine import CompressedStage, FixedLink, build_stage
from vc_quant.distributed.inflight import (
    UNROTATED_DEFAULTS,
    InflightCodec,
    InflightRecord,
    WireStats,
    pack,
    unpack,
    unrotated_options,
)
from vc_quant.distributed.pipeline import StageBoundary, recv_compressed, send_compressed

__all__ = [
    "UNROTATED_DEFAULTS",
    "CompressedStage",
    "FixedLink",
    "InflightCodec",
    "InflightRecord",
    "StageBoundary",
    "VcHookState",
    "WireStats",
    "build_stage",
    "ddp_kwargs",
    "linear_schedule",
    "pack",
    "recv_compressed",
    "register",
    "send_compressed",
    "unpack",
    "unrotated_options",
    "use_in_trainer",
    "use_with_accelerate",
    "vc_allreduce_hook",
]
