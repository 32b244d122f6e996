"""Interleaved rANS over quantized levels: encode to a :class:`RansStream`, decode to int8 levels.

The native kernels do the work; decoding splits the segments of one tensor over worker
threads (ctypes releases the GIL). Without the native library, decoding falls back to the
NumPy reference decoder (same integer steps, one NumPy step per lane position).
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np

from vc_quant.codec.rans import native, reference
from vc_quant.codec.rans import tables as tb
from vc_quant.codec.rans.bitstream import RansStream, n_segments
from vc_quant.codec.rans.quantizer import Levels
from vc_quant.errors import VcCodecError, VcCorruptDataError

logger = logging.getLogger(__name__)

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()
_MIN_SEGMENTS_PER_JOB = 2  # below this, one thread decodes all (thread hand-off costs ~50 us)
_warned_fallback = False


@lru_cache(maxsize=1)
def cpus() -> int:
    return max(1, os.cpu_count() or 1)  # asked once: the call reads the system (~60 us), the KV cache decodes per layer


def pool() -> ThreadPoolExecutor:
    global _POOL
    with _POOL_LOCK:  # first use can come from two threads at once (the KV cache's prefetch and the caller)
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=cpus(), thread_name_prefix="vc-rans")
        return _POOL


def run_split(run, bounds: list[int]) -> list[int]:
    """``run(lo, hi)`` over consecutive ``bounds``: the first part on the calling thread (which would
    otherwise sleep until the workers finish), the others on the pool; the parts' return codes in order."""
    jobs = [pool().submit(run, lo, hi) for lo, hi in itertools.pairwise(bounds[1:])]
    return [run(bounds[0], bounds[1])] + [job.result() for job in jobs]


def encode_stream(lv: Levels) -> RansStream:
    """The rANS stream of ``lv`` (its tables, lanes and segments)."""
    lib = native.lib()
    n, g, ln = lv.n, lv.lanes, lv.lane_len
    segs = n_segments(n, g, ln)
    freq, cum = tb.encoder_tables(lv.tables)
    cap = n + 2 * g * segs  # a symbol emits at most one word
    out = np.empty(cap, dtype=np.uint16)
    seg_end = np.empty(segs, dtype=np.uint32)
    scratch = np.empty(g * ln + 2 * g, dtype=np.uint16)
    words = lib.vc_rans_encode(native.ptr(lv.k), native.ptr(lv.ctx), n, g, ln, native.ptr(freq), native.ptr(cum),
                               native.ptr(out), cap, native.ptr(seg_end), native.ptr(scratch))  # fmt: skip
    if words < 0:
        raise VcCodecError(f"rANS encoder failed (code {words}): levels and tables disagree")
    return RansStream(lv.quantizer, g, ln, n, lv.tables, seg_end, out[:words].copy())


def decode_levels(stream: RansStream, out: np.ndarray, workers: int | None = None, name: str = "tensor") -> np.ndarray:
    """Decode ``stream`` into ``out`` (int8, ``n`` values): the reconstruction integers.

    ``workers``: threads splitting the segments (default: all cores; 1 when several tensors
    decode side by side). A damaged stream raises VcCorruptDataError naming ``name``.
    """
    if out.dtype != np.int8 or out.size != stream.n_symbols or not out.flags.c_contiguous:
        raise ValueError("decode_levels: out must be a contiguous int8 array of n values")
    if not native.status():
        _warn_fallback()
        reference.decode(stream, out, name)
        return out
    lib = native.lib()
    lut = stream.lut
    segs = stream.n_segments
    workers = max(1, min(workers or cpus(), segs // _MIN_SEGMENTS_PER_JOB))
    bounds = np.linspace(0, segs, workers + 1).round().astype(np.int64)

    def run(lo: int, hi: int) -> int:
        return lib.vc_rans_decode(native.ptr(stream.words), stream.words.size, native.ptr(stream.seg_end), segs,
                                  stream.n_symbols, stream.lanes, stream.lane_len, native.ptr(lut), int(stream.dq),
                                  native.ptr(out), lo, hi)  # fmt: skip

    codes = run_split(run, bounds.tolist())
    bad = next((c for c in codes if c), 0)
    if bad:
        raise VcCorruptDataError(f"{name}: {native.DECODE_ERRORS.get(bad, f'decoder error {bad}')}")
    return out


def _warn_fallback() -> None:
    global _warned_fallback
    if not _warned_fallback:
        logger.warning("vc_quant: rANS decoding with the slow NumPy reference decoder: %s", native.status().reason)
        _warned_fallback = True


def decode_many(streams: list[RansStream], out: np.ndarray, name: str = "tensor") -> np.ndarray:
    """Streams of one layout (same n, lanes, lane length, quantizer) → ``out`` (int8, ``(len, n)``), in one
    native call per worker thread (the KV cache's blocks: many small streams at every step)."""
    first = streams[0]
    same = all((s.n_symbols, s.lanes, s.lane_len, s.quantizer, s.n_segments) ==
               (first.n_symbols, first.lanes, first.lane_len, first.quantizer, first.n_segments) for s in streams)
    if not same or out.shape != (len(streams), first.n_symbols) or out.dtype != np.int8:
        raise ValueError("decode_many: streams of one layout into a (count, n) int8 array")
    if not native.status():
        for s, row in zip(streams, out, strict=True):
            decode_levels(s, row, 1, name)
        return out
    lib = native.lib()

    def run(lo: int, hi: int) -> int:
        part = streams[lo:hi]
        ptrs = lambda arrays: (ctypes.c_void_p * len(arrays))(*[native.ptr(a) for a in arrays])  # noqa: E731
        n_words = np.array([s.words.size for s in part], dtype=np.int64)
        rc = lib.vc_rans_decode_many(len(part), ptrs([s.words for s in part]), native.ptr(n_words),
                                     ptrs([s.seg_end for s in part]), first.n_segments, first.n_symbols, first.lanes,
                                     first.lane_len, ptrs([s.lut for s in part]), int(first.dq),
                                     ptrs(list(out[lo:hi])))  # fmt: skip
        return 0 if rc == 0 else rc % 16

    count = len(streams)
    workers = max(1, min(cpus(), count // 4))  # a few streams per thread: hand-off costs ~50 us
    bounds = np.linspace(0, count, workers + 1).round().astype(np.int64).tolist()
    codes = run_split(run, bounds)
    bad = next((c for c in codes if c), 0)
    if bad:
        raise VcCorruptDataError(f"{name}: {native.DECODE_ERRORS.get(bad, f'decoder error {bad}')}")
    return out
