"""Decoding records: the one decode entry point, its backend policy and a pool that reports it.

* :func:`decode_tensor` — a record → the dense tensor on any device (its dtype or another).
* :func:`decode_samples` — a record → its decoded 8-bit samples as an int8 ``(rows, cols)``
  matrix in the rotated domain (``pixel − 128``): what a compressed-resident linear layer
  keeps (``W_rot = center + samples · step``).
* :class:`DecodePool` — many records decoded side by side (one tensor per CPU worker,
  or one NVDEC session per worker on a GPU); it reports the backend it used and, when
  NVDEC was wanted but could not run, why.

Backend policy (:func:`choose_backend`): ``"auto"`` decodes on NVDEC when the target
is a CUDA device and NVDEC can decode the record's codec there (codecs verified on a GPU:
HEVC), else with FFmpeg / dav1d on the CPU; ``"cpu"`` always uses the CPU; ``"nvdec"``
fails if NVDEC cannot run (and is how the AV1 NVDEC path is opted into).
"""

from __future__ import annotations

import itertools
import math
import os
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from vc_quant.codec import frames as fr
from vc_quant.codec import transform as tf
from vc_quant.codec.backends import get_backend
from vc_quant.codec.record import EncodedTensor
from vc_quant.errors import VcBackendUnavailableError, VcConfigError, VcCorruptDataError

DECODE_BACKENDS = ("auto", "cpu", "nvdec")

_FRAME_POOL: ThreadPoolExecutor | None = None


def _frame_pool() -> ThreadPoolExecutor:
    global _FRAME_POOL
    if _FRAME_POOL is None:
        _FRAME_POOL = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="vc-frames")
    return _FRAME_POOL


def choose_backend(device: torch.device | str, codec: str, requested: str = "auto") -> tuple[str, str | None]:
    """``("cpu" | "nvdec", reason NVDEC was not used or None)`` for decoding ``codec`` to ``device``."""
    if requested not in DECODE_BACKENDS:
        raise VcConfigError(f"decode_backend={requested!r}: expected one of {DECODE_BACKENDS}")
    device = torch.device(device)
    if requested == "cpu":
        return "cpu", None
    if device.type != "cuda":
        if requested == "nvdec":
            raise VcBackendUnavailableError(f"decode_backend='nvdec' decodes to CUDA devices, not {device}")
        return "cpu", None
    from vc_quant.codec.backends.nvcodec import NVDEC_CODECS, NVDEC_VERIFIED, nvdec_status

    if codec not in NVDEC_CODECS:
        reason = f"the NVDEC path decodes {NVDEC_CODECS} streams, not {codec!r}"
    elif requested == "auto" and codec not in NVDEC_VERIFIED:
        reason = f"{codec} on NVDEC has not been verified on a GPU yet; decode_backend='nvdec' opts in"
    else:
        status = nvdec_status(codec)
        if status:
            return "nvdec", None
        reason = status.reason
    if requested == "nvdec":
        raise VcBackendUnavailableError(f"decode_backend='nvdec' cannot run here: {reason}")
    return "cpu", reason


def decode_frames(enc: EncodedTensor, threads: int | None = None) -> list[torch.Tensor]:
    """Decode the access units of ``enc`` into uint8 ``(1.5H, W)`` frames on the CPU.

    ``threads``: decoder threads inside a single frame (default: all cores); pass 1
    when several tensors are decoded side by side. Several frames decode in parallel.
    """
    layout = enc.layout
    backend = get_backend(enc.meta["codec"])
    data = enc.bitstream.cpu().numpy().tobytes()
    offsets = np.cumsum([0, *enc.meta["frame_bytes"]])
    packets = [data[a:b] for a, b in itertools.pairwise(offsets)]
    if len(packets) == 1:  # one frame: threads inside it
        out = backend.decode(packets, layout.width, layout.height, threads=threads or os.cpu_count() or 1)
    else:  # several frames: one per worker
        jobs = [_frame_pool().submit(backend.decode, [pk], layout.width, layout.height) for pk in packets]
        out = [f for j in jobs for f in j.result()]
    return [torch.from_numpy(f) for f in out]


def _pixels_cpu(enc: EncodedTensor, threads: int | None) -> torch.Tensor:
    return fr.unpack(decode_frames(enc, threads), enc.layout)


def _pixels(enc: EncodedTensor, device: torch.device, backend: str, threads: int | None, name: str) -> torch.Tensor:
    if backend == "nvdec":
        from vc_quant.codec.backends.nvcodec import decode_pixels_nvdec

        return decode_pixels_nvdec(enc, device, name=name)
    return _pixels_cpu(enc, threads).to(device)


def _finite(x: torch.Tensor, name: str) -> torch.Tensor:
    if not bool(torch.isfinite(x).all()):
        raise VcCorruptDataError(f"{name}: decoded values are not finite (corrupted scales or metadata)")
    return x


def decode_tensor(
    enc: EncodedTensor, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None, backend: str = "auto", threads: int | None = None, name: str = "tensor",
) -> torch.Tensor:  # fmt: skip
    """Decode ``enc`` to a dense tensor on ``device`` (default CPU, or ``out``'s) in its original dtype.

    The record is assumed verified (:meth:`EncodedTensor.verify`); the result is
    checked to be finite.
    """
    device = torch.device(out.device if out is not None else (device or "cpu"))
    dtype = out.dtype if out is not None else dtype
    chosen, _ = choose_backend(device, enc.meta["codec"], backend)
    if chosen == "nvdec":
        from vc_quant.codec.backends.nvcodec import decode_tensor_nvdec

        dense = decode_tensor_nvdec(enc, device=device, dtype=dtype, out=out, name=name)
        return dense if out is not None else _finite(dense, name)
    dense = _finite(enc.dequantize(_pixels_cpu(enc, threads), dtype), name)
    if out is None:
        return dense.to(device)
    out.copy_(dense.reshape(out.shape))
    return out


def decode_samples(
    enc: EncodedTensor, device: torch.device | str = "cpu", backend: str = "auto", threads: int | None = None,
    name: str = "tensor",
) -> torch.Tensor:  # fmt: skip
    """The decoded samples as an int8 ``(rows, cols)`` matrix, ``pixel − 128`` (rotated domain)."""
    device = torch.device(device)
    chosen, _ = choose_backend(device, enc.meta["codec"], backend)
    pixels = _pixels(enc, device, chosen, threads, name)
    return pixels_to_samples(pixels)


def pixels_to_samples(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels → int8 ``pixel − 128`` (flipping the top bit is the two's-complement shift)."""
    return pixels.contiguous().bitwise_xor_(tf.PIXEL_ZERO_INT).view(torch.int8)


class DecodePool:
    """Decode many records side by side; reports the backend used and any fallback reason.

    CPU: one tensor per worker (one decoder thread each), as many workers as cores.
    CUDA targets: NVDEC sessions (one per engine) when NVDEC can run, else the CPU
    workers and a copy to the device. Each job verifies its record first, so a
    corrupt bitstream is never decoded.
    """

    def __init__(self, backend: str = "auto", workers: int | None = None) -> None:
        if backend not in DECODE_BACKENDS:
            raise VcConfigError(f"decode_backend={backend!r}: expected one of {DECODE_BACKENDS}")
        self.requested = backend
        self.workers = workers or max(1, os.cpu_count() or 1)
        self.used: set[str] = set()
        self.fallback_reason: str | None = None
        self._cpu: ThreadPoolExecutor | None = None
        self._nvdec = None

    @property
    def backend_used(self) -> str:
        return "+".join(sorted(self.used)) or "none"

    def _executor(self, backend: str):
        if backend == "nvdec":
            if self._nvdec is None:
                from vc_quant.codec.backends.nvcodec import NvdecDecoderPool

                self._nvdec = NvdecDecoderPool()
            return self._nvdec
        if self._cpu is None:
            self._cpu = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="vc-decode")
        return self._cpu

    def submit(
        self, enc: EncodedTensor, out: torch.Tensor, *, samples: bool = False, name: str = "tensor",
        expect_name: str | None = None, verify: bool = True,
    ) -> Future:  # fmt: skip
        """Decode ``enc`` into ``out`` (dense, or int8 samples with ``samples=True``) in a worker."""
        backend, reason = choose_backend(out.device, enc.meta["codec"], self.requested)
        self.used.add(backend)
        if reason and self.fallback_reason is None:
            self.fallback_reason = reason

        def job() -> torch.Tensor:
            if verify:
                enc.verify(name, expect_name=expect_name)
            if samples:
                out.copy_(pixels_to_samples(_pixels(enc, out.device, backend, 1, name)))
            else:
                decode_tensor(enc, out=out, backend=backend, threads=1, name=name)
            return out

        return self._executor(backend).submit(job)

    def shutdown(self, cancel: bool = False) -> None:
        for pool in (self._cpu, self._nvdec):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=cancel)
        self._cpu = self._nvdec = None


def decode_tensors_alike(encs: list[EncodedTensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode records of one shape and codec setting (one frame each) to a ``(len(encs), *shape)`` tensor.

    One decoder for all pictures and one vectorised dequantise + inverse rotation:
    the per-tensor fixed costs of :func:`decode_tensor` dominate for small tensors
    decoded often (the KV cache decodes every block at every step). Same result as
    stacking :func:`decode_tensor` outputs.
    """
    first = encs[0].meta
    same = ("codec", "layout", "shape", "rotation_seed", "scale")
    if any(any(e.meta[k] != first[k] for k in same) for e in encs):
        raise VcConfigError(f"decode_tensors_alike: records differ in one of {same}")
    layout = encs[0].layout
    packets = [e.bitstream.numpy().tobytes() for e in encs]
    frames = get_backend(first["codec"]).decode(packets, layout.width, layout.height, threads=os.cpu_count() or 1)
    pixels = fr.unpack_single_frames(torch.from_numpy(np.stack(frames)), layout)
    center = torch.stack([e.center for e in encs]).to(torch.float32)
    step = torch.stack([e.step for e in encs]).to(torch.float32)
    x = pixels.to(torch.float32).sub_(tf.PIXEL_ZERO).mul_(step).add_(center)  # in place: no temporaries
    if first["rotation_seed"] is not None:
        x = tf.unrotate(x, first["rotation_seed"])
    n = math.prod(first["shape"])
    return x.reshape(len(encs), -1)[:, :n].reshape(len(encs), *first["shape"]).to(dtype)
