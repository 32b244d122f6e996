"""NVDEC decoding through PyNvVideoCodec: bitstreams → CUDA tensors, no CPU pixels.

Importing this module never fails. :func:`nvdec_status` says whether NVDEC can run
here and, if not, why (no CUDA device, PyNvVideoCodec or driver library missing,
no HEVC decoder on the GPU); callers then fall back to the CPU (FFmpeg) decoder.

Decoding: each worker thread owns a decoder session bound to its own CUDA stream
(reconfigured between picture sizes); access units are fed from host memory, the NV12
surfaces NVDEC writes are copied through DLPack straight into the tensor's pixel
canvas (HEVC decoding is normative: the same samples as the CPU decoder's), and
unpacking, dequantisation and the inverse rotation run on the GPU in torch.
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

from vc_quant.codec.record import EncodedTensor
from vc_quant.codec.video import frames as fr
from vc_quant.errors import VcBackendUnavailableError, VcCodecError

logger = logging.getLogger(__name__)

ENV_SESSIONS = "VC_QUANT_NVDEC_SESSIONS"
_DEFAULT_MAX_SIDE = 2048  # the default tile: NVDEC surfaces of a session are sized for it


# Codecs the NVDEC path decodes: our codec name -> PyNvVideoCodec's cudaVideoCodec member.
_NV_CODECS = {"hevc": "HEVC", "av1": "AV1"}
NVDEC_CODECS = tuple(_NV_CODECS)
# Codecs "auto" sends to NVDEC: verified bit-identical to the CPU decoder on a GPU (HEVC:
# H100, every layout). The AV1 path is built the same way and has the same GPU tests, but
# has not run on a GPU yet: it is used only when asked for (decode_backend="nvdec").
NVDEC_VERIFIED = ("hevc",)


@dataclass(frozen=True)
class NvdecStatus:
    """Whether NVDEC can decode a codec here, and why not when it cannot."""

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


@lru_cache(maxsize=4)
def nvdec_status(codec: str = "hevc") -> NvdecStatus:
    """Check, once per process and codec, every layer NVDEC needs; never raises."""
    if codec not in _NV_CODECS:
        return NvdecStatus(False, f"the NVDEC path decodes {NVDEC_CODECS}, not {codec!r}")
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
        # cudaVideoChromaFormat's 4:2:0 member is named "420" (not an identifier)
        chroma420 = getattr(nvc.cudaVideoChromaFormat, "420")
        caps = nvc.GetDecoderCaps(
            gpuid=torch.cuda.current_device(), codec=getattr(nvc.cudaVideoCodec, _NV_CODECS[codec]),
            chromaformat=chroma420, bitdepth=8,
        )  # fmt: skip
    except Exception as exc:
        return NvdecStatus(False, f"GetDecoderCaps failed: {exc}", library_version=version)
    # e.g. {'supported': 1, 'num_decoder_engines': 7, 'width_max': 8192, 'height_max': 8192, ...}
    if not caps.get("supported"):
        return NvdecStatus(False, f"this GPU has no {codec.upper()} 8-bit 4:2:0 decoder", library_version=version)
    max_w, max_h = int(caps.get("width_max", 0)), int(caps.get("height_max", 0))
    if min(max_w, max_h) < _DEFAULT_MAX_SIDE:
        return NvdecStatus(False, f"NVDEC max {codec.upper()} picture {max_w}x{max_h} is below 2048x2048")
    engines = caps.get("num_decoder_engines")
    return NvdecStatus(
        True, "ok", engines=int(engines) if engines else None, max_width=max_w, max_height=max_h,
        library_version=version,
    )  # fmt: skip


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

    def __init__(self, device: torch.device, max_side: int, codec: str = "hevc") -> None:
        nvc = _load_pynvvideocodec()
        self.nvc = nvc
        self.device = device
        self.max_side = max_side
        self.size: tuple[int, int] | None = None  # picture size the decoder is set up for
        torch.cuda.set_device(device)
        torch.cuda.current_stream(device)  # makes torch's primary context current here
        self.stream = torch.cuda.Stream(device)
        self.decoder = nvc.CreateDecoder(
            gpuid=device.index or 0,
            codec=getattr(nvc.cudaVideoCodec, _NV_CODECS[codec]),
            cudacontext=_current_context(),
            cudastream=self.stream.cuda_stream,
            usedevicememory=True,
            maxwidth=max_side,
            maxheight=max_side,
            latency=nvc.DisplayDecodeLatencyType.LOW,  # intra only: no reordering to wait for
        )

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

    def decode_canvas(self, enc: EncodedTensor, layout: fr.FrameLayout, name: str) -> torch.Tensor:
        """The ``(n_frames·1.5H, W)`` pixel canvas of ``enc`` (see :mod:`frames`), on this stream.

        Each NV12 surface is copied into the canvas before the next Decode call may
        reuse it (the copies are queued on this stream, after NVDEC's own work).
        """
        data = enc.bitstream.contiguous().cpu()  # NVDEC reads host memory
        offsets = list(itertools.accumulate(enc.meta["frame_bytes"], initial=0))
        count = 0
        with torch.cuda.stream(self.stream):
            canvas = torch.empty(layout.n_frames * layout.height * 3 // 2, layout.width, dtype=torch.uint8,
                                 device=self.device)  # fmt: skip

            def take(frames) -> None:
                nonlocal count
                for frame in frames:
                    if count >= layout.n_frames:
                        raise VcCodecError(f"{name}: NVDEC returned more frames than the record's {layout.n_frames}")
                    fr.nv12_into_canvas(self._nv12(frame, layout), canvas, count, layout)
                    count += 1

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
        return canvas

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


_LOCAL = threading.local()


def _session(device: torch.device, width: int, height: int, codec: str = "hevc") -> _Session:
    """This thread's session on ``device``, able to hold a ``width × height`` picture.

    Sessions reconfigure between picture sizes up to the size they were created for
    (NVDEC allocates surfaces for it): the default tile (2048) covers most models;
    a larger picture replaces the session by one for the largest side allowed.
    """
    sessions = getattr(_LOCAL, "sessions", None)
    if sessions is None:
        sessions = _LOCAL.sessions = {}
    key = (device.index or 0, codec)
    need = max(width, height)
    if key not in sessions or sessions[key].max_side < need:
        sessions[key] = _Session(device, _DEFAULT_MAX_SIDE if need <= _DEFAULT_MAX_SIDE else fr.MAX_SIDE, codec)
    return sessions[key]


def _cuda_device(device) -> torch.device:
    device = torch.device(device if device is not None else "cuda")
    if device.type != "cuda":
        raise VcBackendUnavailableError(f"NVDEC decodes to CUDA devices, not {device}")
    return torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())


def _require_nvdec(codec: str) -> None:
    status = nvdec_status(codec)
    if not status:
        raise VcBackendUnavailableError(f"NVDEC cannot run here: {status.reason}")


def _decode_canvas(enc: EncodedTensor, device, name: str) -> tuple[torch.Tensor, fr.FrameLayout, _Session]:
    """Checks, then this thread's session decodes ``enc``'s canvas (queued on its stream)."""
    codec = enc.meta.get("codec")
    if codec not in NVDEC_CODECS:
        raise VcBackendUnavailableError(f"{name}: NVDEC path decodes {NVDEC_CODECS}, not {codec!r}")
    _require_nvdec(codec)
    layout = fr.FrameLayout.from_dict(enc.meta["layout"])
    session = _session(_cuda_device(device), layout.width, layout.height, codec)
    return session.decode_canvas(enc, layout, name), layout, session


def decode_canvas_nvdec(enc: EncodedTensor, device=None, name: str = "tensor") -> torch.Tensor:
    """Every decoded sample of ``enc`` as the ``(n_frames·1.5H, W)`` uint8 canvas on ``device``.

    Equal bit for bit to ``frames.frames_to_canvas(decode.decode_frames(enc))``
    (HEVC and AV1 decoding are normative). The caller's current stream waits for the decode.
    """
    canvas, _, session = _decode_canvas(enc, device, name)
    caller = torch.cuda.current_stream(canvas.device)
    caller.wait_stream(session.stream)
    canvas.record_stream(caller)  # allocated on the session stream, used on the caller's
    return canvas


def decode_pixels_nvdec(enc: EncodedTensor, device=None, name: str = "tensor") -> torch.Tensor:
    """The decoded uint8 ``(rows, cols)`` pixel matrix (what ``decode_tensor_nvdec`` dequantises)."""
    return fr.canvas_to_matrix(decode_canvas_nvdec(enc, device, name), fr.FrameLayout.from_dict(enc.meta["layout"]))


def decode_tensor_nvdec(
    enc: EncodedTensor, device=None, dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
    name: str = "tensor",
) -> torch.Tensor:  # fmt: skip
    """Decode ``enc`` to a dense CUDA tensor (into ``out`` when given); returns when it is ready.

    Everything (NVDEC, unpacking, dequantisation, inverse rotation) runs on this
    thread's session stream, so threads decoding side by side never wait on each other.
    """
    canvas, layout, session = _decode_canvas(enc, device if out is None else out.device, name)
    with torch.cuda.stream(session.stream):
        dense = enc.dequantize(fr.canvas_to_matrix(canvas, layout), dtype or (out.dtype if out is not None else None))
        if out is not None:
            out.copy_(dense.reshape(out.shape))
            dense = out
    session.stream.synchronize()
    return dense


class NvdecDecoderPool(ThreadPoolExecutor):
    """Worker threads for NVDEC, one decoder session each (default: one per engine).

    ``decode(enc, out)`` returns a future that completes once ``out`` holds the
    decoded tensor (the worker's stream is synchronised), so the caller may use
    ``out`` from any stream afterwards; ``submit`` runs any job on a worker.
    """

    def __init__(self, sessions: int | None = None) -> None:
        self.sessions = sessions or default_sessions()
        super().__init__(max_workers=self.sessions, thread_name_prefix="vc-nvdec")

    def decode(self, enc: EncodedTensor, out: torch.Tensor, name: str = "tensor") -> Future:
        return self.submit(decode_tensor_nvdec, enc, out=out, name=name)
