"""Decoding records: the one decode entry point of both codec families, its backend policy, a pool.

* :func:`decode_tensor` — a record → the dense tensor on any device (its dtype or another).
* :func:`decode_samples` — a record → its decoded samples as an int8 ``(rows, cols)`` matrix
  in the rotated domain (video: ``pixel − 128``; rANS: the reconstruction integers): what a
  compressed-resident linear layer keeps (``W_rot = center + samples · step``).
* :class:`DecodePool` — many records decoded side by side (one tensor per CPU worker, or one
  NVDEC session per worker on a GPU); it reports the backend it used and, when the GPU path
  was wanted but could not run, why.

Backend policy (:func:`choose_backend`), by family:

* video: ``"auto"`` decodes on NVDEC when the target is a CUDA device and NVDEC can decode the
  record's codec there (codecs verified on a GPU: HEVC), else with FFmpeg / dav1d on the CPU;
  ``"nvdec"`` fails if NVDEC cannot run (and is how the AV1 NVDEC path is opted into).
* rANS: ``"triton"`` decodes with the Triton kernel on a CUDA device (fails if it cannot run);
  ``"auto"`` decodes with the native CPU decoder and copies to the device until the Triton path
  has been verified on a GPU (:data:`~vc_quant.codec.rans.triton_decode.TRITON_VERIFIED`).

``"cpu"`` always decodes on the CPU.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from vc_quant.codec.record import EncodedTensor
from vc_quant.codec.video import decode as vd
from vc_quant.errors import VcBackendUnavailableError, VcConfigError, VcCorruptDataError

DECODE_BACKENDS = ("auto", "cpu", "nvdec", "triton")
#: the GPU backend of each family
GPU_BACKEND = {"video": "nvdec", "rans": "triton"}

# re-exported: the video family's decoders that callers (KV cache, benchmarks) use directly
decode_frames = vd.decode_frames
decode_tensors_alike = vd.decode_tensors_alike
pixels_to_samples = vd.pixels_to_samples


def _family(codec: str) -> str:
    return "rans" if codec == "rans" else "video"


def choose_backend(device: torch.device | str, codec: str, requested: str = "auto") -> tuple[str, str | None]:
    """``("cpu" | "nvdec" | "triton", reason the GPU path was not used or None)`` for ``codec`` on ``device``."""
    if requested not in DECODE_BACKENDS:
        raise VcConfigError(f"decode_backend={requested!r}: expected one of {DECODE_BACKENDS}")
    family = _family(codec)
    gpu = GPU_BACKEND[family]
    if requested not in ("auto", "cpu", gpu):
        raise VcConfigError(
            f"decode_backend={requested!r} does not decode codec={codec!r}; its GPU decoder is {gpu!r}"
        )
    device = torch.device(device)
    if requested == "cpu":
        return "cpu", None
    if device.type != "cuda":
        if requested == gpu:
            raise VcBackendUnavailableError(f"decode_backend={gpu!r} decodes to CUDA devices, not {device}")
        return "cpu", None
    if family == "rans":
        from vc_quant.codec.rans.triton_decode import TRITON_VERIFIED, triton_status

        status = triton_status()
        if requested == "auto" and not TRITON_VERIFIED:
            reason = "the Triton rANS decoder has not been verified on a GPU yet; decode_backend='triton' opts in"
        elif status:
            return "triton", None
        else:
            reason = status.reason
    else:
        from vc_quant.codec.video.backends.nvcodec import NVDEC_CODECS, NVDEC_VERIFIED, nvdec_status

        if codec not in NVDEC_CODECS:
            reason = f"the NVDEC path decodes {NVDEC_CODECS} streams, not {codec!r}"
        elif requested == "auto" and codec not in NVDEC_VERIFIED:
            reason = f"{codec} on NVDEC has not been verified on a GPU yet; decode_backend='nvdec' opts in"
        else:
            status = nvdec_status(codec)
            if status:
                return "nvdec", None
            reason = status.reason
    if requested == gpu:
        raise VcBackendUnavailableError(f"decode_backend={gpu!r} cannot run here: {reason}")
    return "cpu", reason


def _finite(x: torch.Tensor, name: str) -> torch.Tensor:
    # min/max propagate NaN and reach Inf: one pass, no temporary (torch.isfinite(x).all() is ~20x slower)
    if x.numel() and not math.isfinite(float(torch.stack(torch.aminmax(x)).abs().max())):
        raise VcCorruptDataError(f"{name}: decoded values are not finite (corrupted scales or metadata)")
    return x


def decode_tensor(
    enc: EncodedTensor, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None, backend: str = "auto", threads: int | None = None, name: str = "tensor",
) -> torch.Tensor:  # fmt: skip
    """Decode ``enc`` to a dense tensor on ``device`` (default CPU, or ``out``'s) in its original dtype.

    The record is assumed verified (:meth:`EncodedTensor.verify`); the result is
    checked to be finite. ``threads``: CPU threads for this one tensor (default: all cores).
    """
    device = torch.device(out.device if out is not None else (device or "cpu"))
    dtype = out.dtype if out is not None else dtype
    chosen, _ = choose_backend(device, enc.meta["codec"], backend)
    if enc.is_rans:
        from vc_quant.codec.rans.decode import decode_tensor_rans

        dense = _finite(decode_tensor_rans(enc, device, dtype, chosen, threads, name), name)
    elif chosen == "nvdec":
        from vc_quant.codec.video.backends.nvcodec import decode_tensor_nvdec

        dense = decode_tensor_nvdec(enc, device=device, dtype=dtype, out=out, name=name)
        return dense if out is not None else _finite(dense, name)
    else:
        dense = _finite(enc.dequantize(vd.pixels_cpu(enc, threads), dtype), name).to(device)
    if out is None:
        return dense
    out.copy_(dense.reshape(out.shape))
    return out


def decode_samples(
    enc: EncodedTensor, device: torch.device | str = "cpu", backend: str = "auto", threads: int | None = None,
    name: str = "tensor", out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """The decoded samples as an int8 ``(rows, cols)`` matrix in the rotated domain (into ``out`` if given)."""
    device = torch.device(out.device if out is not None else device)
    chosen, _ = choose_backend(device, enc.meta["codec"], backend)
    if enc.is_rans:
        from vc_quant.codec.rans.decode import decode_samples_rans

        return decode_samples_rans(enc, device, chosen, threads, name, out=out)
    samples = vd.pixels_to_samples(vd.pixels(enc, device, chosen, threads, name))
    return samples if out is None else out.copy_(samples)


class DecodePool:
    """Decode many records side by side; reports the backend used and any fallback reason.

    CPU: one tensor per worker (one decoder thread each), as many workers as cores.
    CUDA targets: NVDEC sessions (one per engine) or the Triton decoder when they can run,
    else the CPU workers and a copy to the device. Each job verifies its record first, so a
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
                from vc_quant.codec.video.backends.nvcodec import NvdecDecoderPool

                self._nvdec = NvdecDecoderPool()
            return self._nvdec
        if self._cpu is None:  # CPU decoding, and the Triton launches (they queue on the GPU)
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
                decode_samples(enc, backend=backend, threads=1, name=name, out=out)
            else:
                decode_tensor(enc, out=out, backend=backend, threads=1, name=name)
            return out

        return self._executor(backend).submit(job)

    def submit_call(self, fn, device: torch.device, codec: str) -> Future:
        """Run ``fn`` (a caller's decode job, e.g. on its own CUDA stream) on the workers that decode ``codec``."""
        backend, reason = choose_backend(device, codec, self.requested)
        self.used.add(backend)
        if reason and self.fallback_reason is None:
            self.fallback_reason = reason
        return self._executor(backend).submit(fn)

    def shutdown(self, cancel: bool = False) -> None:
        for pool in (self._cpu, self._nvdec):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=cancel)
        self._cpu = self._nvdec = None
