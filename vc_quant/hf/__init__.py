"""transformers integration: registers the ``vc`` quantization method once."""

from __future__ import annotations

from transformers.quantizers import auto as hf_auto
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)

from vc_quant.config import VcQuantizationConfig
from vc_quant.format import QUANT_METHOD
from vc_quant.hf.quantizer import VcHfQuantizer
from vc_quant.hf.saving import memory_bytes, save_atomic


def register() -> None:
    """Register config and quantizer with transformers (idempotent: safe on re-import)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not VcQuantizationConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
        register_quantization_config(QUANT_METHOD)(VcQuantizationConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not VcHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(VcHfQuantizer)
    # Let a config passed to from_pretrained of a compressed checkpoint set how it is
    # decoded (decode_backend): transformers honours load-time attributes only for the
    # config types listed here, and ignores (with a warning) every other field.
    types = getattr(hf_auto, "LOADING_ATTRIBUTES_CONFIG_TYPES", None)
    if isinstance(types, tuple) and VcQuantizationConfig not in types:
        hf_auto.LOADING_ATTRIBUTES_CONFIG_TYPES = (*types, VcQuantizationConfig)


__all__ = ["VcHfQuantizer", "VcQuantizationConfig", "memory_bytes", "register", "save_atomic"]
