"""NVDEC decoding through PyNvVideoCodec: bitstreams → CUDA tensors, no CPU pixels.

Importing this module never fails. :func:`nvdec_status` says whether NVDEC can run
here and, if not, why (no CUDA device, PyNvVideoCodec or driver library missing,
no HEVC decoder on the GPU); callers then fall back to the CPU (FFmpeg) decoder.

Decoding: each worker thread owns a decoder session bound to its own CUDA stream
(reconfigured between picture sizes); access units are fed from host memory, the NV12
surfaces NVDEC writes are copied out through DLPack as the 4:2:0 planar frames
the CPU decoder returns (HEVC decoding is normative: the pixels are identical),
and unpacking, dequantisation and the inverse rotation run on the GPU in torch.
:class:`NvdecDecoderPool` keeps several sessions busy at once (H100/H200 carry 7
NVDEC engines).
"""

from __future__ import annotations

import ctypes
import importlib.util
import itertools
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import torch

from vc_quant.codec import frames as fr
from vc_quant.codec.tensor_codec import EncodedTensor, pixels_to_tensor
from vc_quant.errors import VcBackendUnavailableError, VcCodecError

logger = logging.getLogger(__name__)

ENV_SESSIONS = "VC_QUANT_NVDEC_SESSIONS"
_DEFAULT_MAX_SIDE = 2048  # the default tile: NVDEC surfaces of a session are sized for it


@dataclass(frozen=True)
class NvdecStatus:
    """Whether NVDEC HEVC decoding can run here, and why not when it cannot."""

    usable: bool
    reason: str
    engines: int | None = None  # NVDEC engines reported by the driver, when known
    max_width: int | None = None
    max_height: int | None = None
    library_version: str | None = None

    def __bool__(self) -> bool:
        return self.usable


def _load_pynvvideocodec():
    # PyNvVideoCodec logs a long troubleshooting text at ERROR level when the driver's
    # video libraries are missing; our status reports the reason instead
    logging.getLogger("PyNvVideoCodec").setLevel(logging.CRITICAL)
    import PyNvVideoCodec as nvc

    return nvc


def _enum(owner, *names: str):
    for name in names:
        if hasattr(owner, name):
            return getattr(owner, name)
    raise AttributeError(f"{owner!r} has none of {names}")


def _field(obj, *names: str):
    for name in names:
        if isinstance(obj, dict) and name in obj:
            return obj[name]
        if hasattr(obj, name):
            return getattr(obj, name)
    return None


@lru_cache(maxsize=1)
def nvdec_status() -> NvdecStatus:
    """Check, once per process, every layer NVDEC needs; never raises."""
    if not torch.cuda.is_available():
        return NvdecStatus(False, "no CUDA device visible to torch")
    if importlib.util.find_spec("PyNvVideoCodec") is None:
        return NvdecStatus(False, "PyNvVideoCodec is not installed (pip install 'vc_quant[gpu]')")
    for lib in ("libnvcuvid.so.1", "libnvidia-encode.so.1"):  # PyNvVideoCodec loads both on import
        try:
            ctypes.CDLL(lib)
        except OSError:
            return NvdecStatus(
                False,
                f"driver library {lib} not found (in containers: NVIDIA_DRIVER_CAPABILITIES must include 'video')",
            )
    try:
        nvc = _load_pynvvideocodec()
    except Exception as exc:  # any import failure means "unusable", with its text
        return NvdecStatus(False, f"PyNvVideoCodec failed to import: {str(exc).splitlines()[0]}")
    version = getattr(nvc, "__version__", None)
    try:
        caps = nvc.GetDecoderCaps(
            gpuid=torch.cuda.current_device(),
            codec=_enum(nvc.cudaVideoCodec, "HEVC"),
            chromaformat=_enum(nvc.cudaVideoChromaFormat, "420", "YUV420"),
            bitdepth=8,
        )
    except Exception as exc:
        return NvdecStatus(False, f"GetDecoderCaps failed: {exc}", library_version=version)
    supported = _field(caps, "supported", "bIsSupported", "is_supported")
    max_w, max_h = _field(caps, "max_width", "nMaxWidth"), _field(caps, "max_height", "nMaxHeight")
    engines = _field(caps, "num_decoder_engines", "nNumNVDECs", "num_nvdecs")
    if supported is not None and not bool(supported):
        return NvdecStatus(False, "this GPU has no HEVC 8-bit 4:2:0 decoder", library_version=version)
    if max_w is not None and max_h is not None and min(int(max_w), int(max_h)) < 2048:
        return NvdecStatus(False, f"NVDEC max HEVC picture {max_w}x{max_h} is below 2048x2048")
    return NvdecStatus(
        True,
        "ok",
        engines=int(engines) if engines is not None else None,
        max_width=int(max_w) if max_w is not None else None,
        max_height=int(max_h) if max_h is not None else None,
        library_version=version,
    )


def default_sessions() -> int:
    """Decoder sessions to run side by side: one per NVDEC engine.

    Measured on an H100 (7 engines, TinyLlama-1.1B shapes at 2.5 bpw): NVDEC alone
    scales to 14 sessions (3.8 GB/s of samples), but the whole decode peaks at 7
    (2.0 GB/s; 1.3 GB/s at 14, the per-tensor torch work contends for the GIL).
    """
    if os.environ.get(ENV_SESSIONS):
        return max(1, int(os.environ[ENV_SESSIONS]))
    status = nvdec_status()
    return status.engines or 7


def _current_context() -> int:
    """The CUDA driver context current on this thread (torch's primary context)."""
    libcuda = ctypes.CDLL("libcuda.so.1")
    ctx = ctypes.c_void_p()
    if libcuda.cuCtxGetCurrent(ctypes.byref(ctx)) != 0 or not ctx.value:
        raise VcCodecError("no current CUDA context on this thread (torch did not initialise CUDA)")
    return int(ctx.value)


class _Session:
    """One NVDEC decoder session bound to one CUDA stream (used by one thread)."""

    def __init__(self, device: torch.device, max_side: int) -> None:
        nvc = _load_pynvvideocodec()
        self.nvc = nvc
        self.device = device
        self.max_side = max_side
        self.size: tuple[int, int] | None = None  # picture size the decoder is set up for
        torch.cuda.set_device(device)
        torch.cuda.current_stream(device)  # makes torch's primary context current here
        self.stream = torch.cuda.Stream(device)
        kwargs = dict(
            gpuid=device.index or 0,
            codec=_enum(nvc.cudaVideoCodec, "HEVC"),
            cudacontext=_current_context(),
            cudastream=self.stream.cuda_stream,
            usedevicememory=True,
            maxwidth=max_side,
            maxheight=max_side,
        )
        latency = getattr(nvc, "DisplayDecodeLatencyType", None)
        if latency is not None and hasattr(latency, "LOW"):
            kwargs["latency"] = latency.LOW  # intra-only: every access unit is output as soon as decoded
        self.decoder = nvc.CreateDecoder(**kwargs)

    def set_size(self, width: int, height: int) -> None:
        # Measured on PyNvVideoCodec 2.2.4 (H100): without setReconfigParams a session
        # fed a stream of another picture size keeps returning surfaces of the old size.
        if self.size != (width, height):
            self.decoder.setReconfigParams(width, height)
            self.size = (width, height)

    def _decode(self, data: torch.Tensor, offset: int, size: int) -> list:
        packet = self.nvc.PacketData()
        packet.bsl_data = data.data_ptr() + offset
        packet.bsl = size
        return list(self.decoder.Decode(packet))

    def _flush(self) -> list:
        return list(self.decoder.Decode(self.nvc.PacketData()))

    def _surfaces(self, enc: EncodedTensor, name: str, consume) -> None:
        """Feed every access unit of ``enc``; ``consume(index, nv12)`` each surface at once.

        A surface may be reused by the next Decode call, so ``consume`` copies it out
        (the copies are queued on this session's stream, after NVDEC's own work).
        """
        layout = fr.FrameLayout.from_dict(enc.meta["layout"])
        data = enc.bitstream.contiguous()
        if data.device.type != "cpu":
            data = data.cpu()
        offsets = list(itertools.accumulate(enc.meta["frame_bytes"], initial=0))
        count = 0

        def take(frames) -> None:
            nonlocal count
            for frame in frames:
                if count >= layout.n_frames:
                    raise VcCodecError(f"{name}: NVDEC returned more frames than the record's {layout.n_frames}")
                consume(count, self._nv12(frame, layout))
                count += 1

        with torch.cuda.stream(self.stream):
            try:
                self.set_size(layout.width, layout.height)
                for a, b in itertools.pairwise(offsets):
                    take(self._decode(data, a, b - a))
                if count < layout.n_frames:  # the parser holds the last picture until end of stream
                    take(self._flush())
            except VcCodecError:
                raise
            except Exception as exc:  # name the tensor whatever the binding raised
                raise VcCodecError(f"{name}: NVDEC decode failed: {exc}") from exc
        if count != layout.n_frames:
            raise VcCodecError(f"{name}: NVDEC returned {count} frames, the record has {layout.n_frames}")

    def decode_canvas(self, enc: EncodedTensor, name: str) -> torch.Tensor:
        """The ``(n_frames·1.5H, W)`` pixel canvas of ``enc`` (see :mod:`frames`), on this stream."""
        layout = fr.FrameLayout.from_dict(enc.meta["layout"])
        with torch.cuda.stream(self.stream):
            canvas = torch.empty(layout.n_frames * layout.height * 3 // 2, layout.width, dtype=torch.uint8,
                                 device=self.device)  # fmt: skip
        self._surfaces(enc, name, lambda i, nv12: fr.nv12_into_canvas(nv12, canvas, i, layout))
        return canvas

    def decode_frames(self, enc: EncodedTensor, name: str) -> list[torch.Tensor]:
        """All frames of ``enc`` as ``(1.5H, W)`` uint8 planar 4:2:0 tensors (FFmpeg's layout)."""
        layout = fr.FrameLayout.from_dict(enc.meta["layout"])
        out: list[torch.Tensor] = []
        self._surfaces(enc, name, lambda i, nv12: out.append(_nv12_to_planar(nv12, layout)))
        return out

    @staticmethod
    def _nv12(frame, layout: fr.FrameLayout) -> torch.Tensor:
        w, h = layout.width, layout.height
        nv12 = torch.from_dlpack(frame)
        if nv12.dim() == 3 and nv12.shape[-1] == 1:
            nv12 = nv12[..., 0]
        if tuple(nv12.shape) != (h * 3 // 2, w) or nv12.dtype != torch.uint8:
            raise VcCodecError(
                f"NVDEC surface is {tuple(nv12.shape)} {nv12.dtype}, expected NV12 {(h * 3 // 2, w)} uint8"
            )
        return nv12


def _nv12_to_planar(nv12: torch.Tensor, layout: fr.FrameLayout) -> torch.Tensor:
    """NV12 surface (Y plane, then interleaved UV) → yuv420p ``(1.5H, W)`` copy."""
    w, h = layout.width, layout.height
    planar = torch.empty(h * 3 // 2, w, dtype=torch.uint8, device=nv12.device)
    flat = planar.view(-1)
    q = h * w // 4
    flat[: h * w].view(h, w).copy_(nv12[:h])
    uv = nv12[h:].reshape(h // 2, w // 2, 2)
    flat[h * w : h * w + q].view(h // 2, w // 2).copy_(uv[..., 0])
    flat[h * w + q :].view(h // 2, w // 2).copy_(uv[..., 1])
    return planar


_LOCAL = threading.local()


def _session(device: torch.device, width: int, height: int) -> _Session:
    """This thread's session on ``device``, able to hold a ``width × height`` picture.

    Sessions reconfigure between picture sizes up to the size they were created for
    (NVDEC allocates surfaces for it): the default tile (2048) covers most models;
    a larger picture replaces the session by one for the largest side allowed.
    """
    sessions = getattr(_LOCAL, "sessions", None)
    if sessions is None:
        sessions = _LOCAL.sessions = {}
    key = device.index or 0
    need = max(width, height)
    if key not in sessions or sessions[key].max_side < need:
        sessions[key] = _Session(device, _DEFAULT_MAX_SIDE if need <= _DEFAULT_MAX_SIDE else fr.MAX_SIDE)
    return sessions[key]


def _cuda_device(device) -> torch.device:
    device = torch.device(device if device is not None else "cuda")
    if device.type != "cuda":
        raise VcBackendUnavailableError(f"NVDEC decodes to CUDA devices, not {device}")
    return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())


def _require_nvdec() -> None:
    status = nvdec_status()
    if not status:
        raise VcBackendUnavailableError(f"NVDEC cannot run here: {status.reason}")


def _checked_session(enc: EncodedTensor, device, name: str) -> _Session:
    if enc.meta.get("codec") != "hevc":
        raise VcBackendUnavailableError(f"{name}: NVDEC path decodes codec 'hevc', not {enc.meta.get('codec')!r}")
    layout = fr.FrameLayout.from_dict(enc.meta["layout"])
    return _session(device, layout.width, layout.height)


def decode_frames_nvdec(enc: EncodedTensor, device=None, name: str = "tensor") -> list[torch.Tensor]:
    """Decode the access units of ``enc`` on NVDEC into uint8 frames on ``device``.

    The frames equal :func:`vc_quant.codec.tensor_codec.decode_frames`'s bit for bit.
    The caller's current stream is made to wait for the decode.
    """
    _require_nvdec()
    device = _cuda_device(device)
    session = _checked_session(enc, device, name)
    frames = session.decode_frames(enc, name)
    caller = torch.cuda.current_stream(device)
    caller.wait_stream(session.stream)
    for f in frames:  # allocated on the session stream, used on the caller's
        f.record_stream(caller)
    return frames


def decode_pixels_nvdec(enc: EncodedTensor, device=None, name: str = "tensor") -> torch.Tensor:
    """The decoded uint8 ``(rows, cols)`` pixel matrix (what ``decode_tensor_nvdec`` dequantises)."""
    _require_nvdec()
    device = _cuda_device(device)
    session = _checked_session(enc, device, name)
    layout = fr.FrameLayout.from_dict(enc.meta["layout"])
    pixels = fr.canvas_to_matrix(session.decode_canvas(enc, name), layout)
    caller = torch.cuda.current_stream(device)
    caller.wait_stream(session.stream)
    pixels.record_stream(caller)
    return pixels


def decode_tensor_nvdec(
    enc: EncodedTensor, device=None, dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
    name: str = "tensor",
) -> torch.Tensor:  # fmt: skip
    """Decode ``enc`` to a dense CUDA tensor (into ``out`` when given); returns when it is ready.

    Everything (NVDEC, unpacking, dequantisation, inverse rotation) runs on this
    thread's session stream, so threads decoding side by side never wait on each other.
    """
    _require_nvdec()
    device = _cuda_device(device if out is None else out.device)
    session = _checked_session(enc, device, name)
    layout = fr.FrameLayout.from_dict(enc.meta["layout"])
    canvas = session.decode_canvas(enc, name)
    with torch.cuda.stream(session.stream):
        pixels = fr.canvas_to_matrix(canvas, layout)
        dense = pixels_to_tensor(enc, pixels, dtype or (out.dtype if out is not None else None))
        if out is not None:
            out.copy_(dense.reshape(out.shape))
            dense = out
    session.stream.synchronize()
    return dense


class NvdecDecoderPool:
    """Decode many tensors side by side, one NVDEC session per worker thread.

    ``submit(enc, out)`` returns a future that completes once ``out`` holds the
    decoded tensor (the worker's stream is synchronised), so the caller may use
    ``out`` from any stream afterwards.
    """

    def __init__(self, sessions: int | None = None) -> None:
        self.sessions = sessions or default_sessions()
        self._pool = ThreadPoolExecutor(max_workers=self.sessions, thread_name_prefix="vc-nvdec")

    def submit(self, enc: EncodedTensor, out: torch.Tensor, name: str = "tensor", verify: bool = False) -> Future:
        """Queue one decode; ``verify`` checks the record's checksum in the worker first."""

        def job() -> torch.Tensor:
            if verify:
                enc.verify(name)
            return decode_tensor_nvdec(enc, out=out, name=name)

        return self._pool.submit(job)

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)

    def __enter__(self) -> NvdecDecoderPool:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
