"""The rANS codec's native kernels (``_native.c``), loaded with ctypes; :func:`status` says why not.

The library is built when vc_quant is installed (``setup.py``: a plain C shared library,
no Python API). ctypes releases the GIL during every call, so Python threads run kernels
side by side on all cores. When the library is missing, importing vc_quant still works:
decoding falls back to the NumPy reference decoder (:mod:`~vc_quant.codec.rans.reference`,
slow but exact) and encoding raises :class:`~vc_quant.errors.VcBackendUnavailableError`
naming the fix. ``VC_QUANT_NATIVE=0`` disables the library (to test the fallback).
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from vc_quant.errors import VcBackendUnavailableError

logger = logging.getLogger(__name__)

_HERE = Path(__file__).resolve().parent
#: decoder error codes (``_native.c``) → what they mean
DECODE_ERRORS = {
    1: "a lane needs more words than its segment holds (truncated or corrupted stream)",
    2: "words are left over after the last symbol of a segment (corrupted stream)",
    3: "a lane did not return to the encoder's initial state (corrupted stream)",
    4: "segment offsets are inconsistent with the tensor (corrupted header)",
}

_i64, _i32, _f32, _f64 = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_double
_p = ctypes.c_void_p
_SIGNATURES = {
    "vc_rotate_rows": (_i32, [_p, _p, _i64, _i64, _i64, _p, _p, _p]),
    "vc_unrotate_levels": (_i32, [_p, _f32, _p, _p, _i64, _i64, _i64, _p, _p, _p]),
    "vc_row_stats": (None, [_p, _i64, _i64, _p, _p]),
    "vc_sq_quantize": (None, [_p, _i64, _f32, _f64, _p, _p, _p, _p]),
    "vc_dq_quantize": (_i32, [_p, _i64, _f32, _i32, _i64, _f64, _p, _p, _p, _p, _p]),
    "vc_dq_reconstruct": (None, [_p, _p, _i64, _p]),
    "vc_rans_encode": (_i64, [_p, _p, _i64, _i32, _i64, _p, _p, _p, _i64, _p, _p]),
    "vc_rans_decode": (_i32, [_p, _i64, _p, _i64, _i64, _i32, _i64, _p, _i32, _p, _i64, _i64]),
    "vc_rans_decode_many": (_i32, [_i64, _p, _p, _p, _i64, _i64, _i32, _i64, _p, _i32, _p]),
    "vc_rans_simd": (_i32, [_i32]),
}


@dataclass(frozen=True)
class NativeStatus:
    available: bool
    reason: str | None = None
    path: str | None = None

    def __bool__(self) -> bool:
        return self.available


def _library_path() -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = _HERE / f"_native{suffix}"
        if candidate.is_file():
            return candidate
    return None


@lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, NativeStatus]:
    if os.environ.get("VC_QUANT_NATIVE", "1") == "0":
        return None, NativeStatus(False, "disabled by VC_QUANT_NATIVE=0")
    path = _library_path()
    if path is None:
        return None, NativeStatus(
            False, f"the native library was not built (no _native*.so in {_HERE}); reinstall vc_quant with a C "
            "compiler present (`pip install -e .` or `pip install vc_quant`)",
        )  # fmt: skip
    try:
        lib = ctypes.CDLL(str(path))
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
    except (OSError, AttributeError) as exc:
        return None, NativeStatus(False, f"the native library {path} cannot be loaded ({exc}); reinstall vc_quant")
    return lib, NativeStatus(True, None, str(path))


def status() -> NativeStatus:
    """Whether the native kernels are available, and why not."""
    return _load()[1]


def lib() -> ctypes.CDLL:
    """The loaded library; raises VcBackendUnavailableError naming the fix when it is missing."""
    handle, st = _load()
    if handle is None:
        raise VcBackendUnavailableError(f"codec='rans' needs its native kernels to encode: {st.reason}")
    return handle


def simd_decoder(enabled: bool | None = None) -> bool:
    """Whether the decoder's SSE4.1 rounds run (x86-64 with SSE4.1); ``enabled`` turns them on or off.

    Both paths give the same integers (tests compare them); the scalar one is kept for CPUs
    without SSE4.1 and as the reference the vector one is checked against."""
    return bool(lib().vc_rans_simd(-1 if enabled is None else int(enabled)))


def ptr(a: np.ndarray | None) -> int | None:
    """The data pointer of a C-contiguous array (None stays NULL)."""
    if a is None:
        return None
    if not a.flags.c_contiguous:
        raise ValueError("native kernels need C-contiguous arrays")
    return a.ctypes.data
