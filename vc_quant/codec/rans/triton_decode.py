"""The GPU rANS decoder (Triton): bit-identical to the native CPU decoder, samples straight to GPU memory.

One program decodes one segment; its lanes are one vector. At each position every lane
decodes one symbol, and the lanes that renormalise read consecutive words of the
segment's stream in lane order (an exclusive prefix sum of their flags), exactly as the
reference decoder (:mod:`~vc_quant.codec.rans.reference`) does, so the output is the same
integers. Each program also checks the stream's invariants (no overrun, every word used,
every lane back at the encoder's initial state) and reports an error code per segment.

Importing this module never fails; :func:`triton_status` says whether the kernel can run
(Triton installed and a CUDA device present). Tests run the kernel on the CPU through
Triton's interpreter (``TRITON_INTERPRET=1``, set before Triton is imported).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from vc_quant.codec.rans import native
from vc_quant.codec.rans.bitstream import RansStream
from vc_quant.codec.rans.tables import decode_lut
from vc_quant.errors import VcBackendUnavailableError, VcCorruptDataError

#: "auto" sends rANS records to this decoder once it has run bit-identical on a GPU
#: (scripts/gpu_check.sh); until then decode_backend="triton" opts in
TRITON_VERIFIED = False


@dataclass(frozen=True)
class TritonStatus:
    usable: bool
    reason: str

    def __bool__(self) -> bool:
        return self.usable


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@lru_cache(maxsize=1)
def triton_status() -> TritonStatus:
    """Whether the Triton decoder can run here (on a CUDA device, or interpreted on the CPU)."""
    if triton is None:
        return TritonStatus(False, "Triton is not installed (pip install triton)")
    if not torch.cuda.is_available() and not _interpreting():
        return TritonStatus(False, "no CUDA device (the Triton decoder runs on GPUs)")
    return TritonStatus(True, "ok")


try:  # Triton is optional: without it this module still imports, and triton_status() says why
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where Triton is absent
    triton = None

if triton is not None:

    @triton.jit
    def _add(a, b):
        return a + b

    @triton.jit
    def rans_decode_kernel(words_ptr, seg_end_ptr, lut_ptr, out_ptr, err_ptr, n, lanes, lane_len,
                           DQ: tl.constexpr, LANES: tl.constexpr):  # fmt: skip
        s = tl.program_id(0)
        lane = tl.arange(0, LANES)
        start = tl.where(s > 0, tl.load(seg_end_ptr + s - 1, mask=s > 0, other=0), 0).to(tl.int64)
        end = tl.load(seg_end_ptr + s).to(tl.int64)
        live = lane < lanes
        lo = tl.load(words_ptr + start + 2 * lane, mask=live, other=0).to(tl.int64)
        hi = tl.load(words_ptr + start + 2 * lane + 1, mask=live, other=0).to(tl.int64)
        x = lo | (hi << 16)
        st = tl.zeros([LANES], dtype=tl.int64)
        ptr = start + 2 * lanes
        bad = tl.zeros([LANES], dtype=tl.int32)
        first = s.to(tl.int64) * lanes * lane_len
        last = tl.minimum(first + lanes * lane_len, n)
        for t in range(0, lane_len):
            i = first + t * lanes + lane
            valid = live & (i < last)
            slot = x & 4095
            ctx = st >> 1  # always 0 without DQ (the state never moves)
            e = tl.load(lut_ptr + ctx * 4096 + slot, mask=valid, other=0)
            k = ((e & 0xFF) ^ 0x80) - 0x80
            xn = (((e >> 8) & 0xFFF) + 1) * (x >> 12) + slot - (e >> 20)
            need = (valid & (xn < 65536)).to(tl.int64)
            offset = ptr + tl.associative_scan(need, 0, _add) - need
            over = (need != 0) & (offset >= end)
            w = tl.load(words_ptr + offset, mask=(need != 0) & (offset < end), other=0).to(tl.int64)
            xn = tl.where(need != 0, (xn << 16) | w, xn)
            x = tl.where(valid, xn, x)
            ptr = ptr + tl.sum(need, axis=0)
            bad = tl.where(over, 1, bad)
            if DQ:
                r = tl.where(ctx == 1, 2 * k - tl.where(k > 0, 1, tl.where(k < 0, -1, 0)), 2 * k)
                st = tl.where(valid, ctx + 2 * ((st ^ k) & 1), st)
                tl.store(out_ptr + i, r.to(tl.int8), mask=valid)
            else:
                tl.store(out_ptr + i, k.to(tl.int8), mask=valid)
        code = tl.where(tl.max(bad, axis=0) > 0, 1, tl.where(ptr != end, 2, 0))
        code = tl.where((code == 0) & (tl.max(tl.where(live & (x != 65536), 1, 0), axis=0) > 0), 3, code)
        tl.store(err_ptr + s, code)


def decode_levels_triton(
    stream: RansStream, device: torch.device | str, name: str = "tensor", out: torch.Tensor | None = None
) -> torch.Tensor:
    """The stream's int8 reconstruction integers, decoded by the Triton kernel on ``device`` (into ``out``)."""
    status = triton_status()
    if not status:
        raise VcBackendUnavailableError(f"the Triton rANS decoder cannot run: {status.reason}")
    device = torch.device(device)
    segs = stream.n_segments
    lanes_p2 = 1 << max(0, (stream.lanes - 1).bit_length())
    words = torch.from_numpy(stream.words.astype(np.int32)).to(device)
    seg_end = torch.from_numpy(stream.seg_end.astype(np.int64)).to(device)
    lut = torch.from_numpy(decode_lut(stream.tables).astype(np.int64).reshape(-1)).to(device)
    out = torch.empty(stream.n_symbols, dtype=torch.int8, device=device) if out is None else out
    err = torch.zeros(segs, dtype=torch.int32, device=device)
    rans_decode_kernel[(segs,)](words, seg_end, lut, out, err, stream.n_symbols, stream.lanes, stream.lane_len,
                    DQ=stream.dq, LANES=lanes_p2)  # fmt: skip
    codes = err.cpu()
    if bool((codes != 0).any()):
        code = int(codes[codes != 0][0])
        raise VcCorruptDataError(f"{name}: {native.DECODE_ERRORS.get(code, f'decoder error {code}')}")
    return out
