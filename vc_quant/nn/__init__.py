"""Torch modules that keep vc_quant weights compressed in memory (independent of transformers)."""

from vc_quant.nn.linear import RESIDENT_MODES, VcLinear, check_resident, int8_linear
from vc_quant.nn.prefetch import BitstreamWindow
from vc_quant.nn.source import CheckpointRecord, InMemoryRecord, RecordSource

__all__ = [
    "RESIDENT_MODES",
    "BitstreamWindow",
    "CheckpointRecord",
    "InMemoryRecord",
    "RecordSource",
    "VcLinear",
    "check_resident",
    "int8_linear",
]
