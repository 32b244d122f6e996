"""NVDEC decoding through PyNvVideoCodec (GPU path).

Importing this module never fails: :func:`nvdec_status` says whether NVDEC can
run here and, if not, why (missing package, driver library or CUDA device). The
decode itself is the GPU issue's work; until it lands, callers fall back to the
CPU (FFmpeg) decoder and report the reason.
"""

from __future__ import annotations

import ctypes.util
import importlib.util
from functools import lru_cache

import torch


@lru_cache(maxsize=1)
def nvdec_status() -> tuple[bool, str]:
    """``(usable, reason)`` for hardware HEVC decoding on this machine."""
    if not torch.cuda.is_available():
        return False, "no CUDA device visible to torch"
    if importlib.util.find_spec("PyNvVideoCodec") is None:
        return False, "PyNvVideoCodec is not installed (pip install 'vc_quant[gpu]')"
    for lib in ("nvcuvid", "nvidia-encode"):
        if ctypes.util.find_library(lib) is None:
            return False, f"driver library lib{lib}.so.1 not found"
    return False, "the NVDEC decode path is not implemented in this version of vc_quant"


def decode_tensor_nvdec(enc, device, dtype):  # pragma: no cover - needs a GPU
    raise NotImplementedError("NVDEC decoding is not implemented yet; use decode_backend='cpu'")
