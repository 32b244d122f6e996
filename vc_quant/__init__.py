"""vc_quant: video codecs as tensor codecs for Hugging Face Transformers.

``import vc_quant`` registers the ``vc`` quantization method with transformers,
so checkpoints written by vc_quant load with plain ``from_pretrained``.
"""

from vc_quant.codec import CodecOptions, EncodedTensor, decode_tensor, encode_tensor
from vc_quant.config import VcQuantizationConfig
from vc_quant.errors import (
    VcBackendUnavailableError,
    VcCodecError,
    VcConfigError,
    VcCorruptDataError,
    VcInputError,
    VcQuantError,
)
from vc_quant.hf import memory_bytes, save_atomic
from vc_quant.hf import register as _register
from vc_quant.integrations import peft as _peft
from vc_quant.kv_cache import VcQuantizedCache, cache_kwargs
from vc_quant.nn import VcLinear

__version__ = "0.2.0"
_register()
_peft.install_when_imported()

__all__ = [
    "CodecOptions",
    "EncodedTensor",
    "VcBackendUnavailableError",
    "VcCodecError",
    "VcConfigError",
    "VcCorruptDataError",
    "VcInputError",
    "VcLinear",
    "VcQuantError",
    "VcQuantizationConfig",
    "VcQuantizedCache",
    "__version__",
    "cache_kwargs",
    "decode_tensor",
    "encode_tensor",
    "memory_bytes",
    "save_atomic",
]
