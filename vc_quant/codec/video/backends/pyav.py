"""CPU backends on PyAV: libx265 / libx264 / SVT-AV1 encoders, FFmpeg / dav1d decoders."""

from __future__ import annotations

import fractions
import os

import numpy as np

from vc_quant.codec.video.backends.base import EncoderSettings, VideoBackend
from vc_quant.errors import VcCodecError, VcConfigError

# HEVC 4:2:0 chroma QP as a function of qPi = QP + chroma offset (H.265 Table 8-10).
_HEVC_QPC = {30: 29, 31: 30, 32: 31, 33: 32, 34: 33, 35: 33, 36: 34, 37: 34, 38: 35, 39: 35, 40: 36, 41: 36, 42: 37}


def hevc_chroma_qp(qpi: int) -> int:
    if qpi < 30:
        return qpi
    if qpi > 42:
        return qpi - 6
    return _HEVC_QPC[qpi]


def hevc_chroma_offset(qp: int) -> int:
    """Chroma QP offset (−12..12) that makes chroma's effective QP closest to ``qp``."""
    return min(range(-12, 13), key=lambda o: (abs(hevc_chroma_qp(min(max(qp + o, 0), 57)) - qp), abs(o)))


X26X_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow",
                "placebo")  # fmt: skip


def _import_av():
    import av

    return av


class _PyAVBackend(VideoBackend):
    encoder: str
    decoder: str

    @staticmethod
    def check_preset(preset: str) -> str:
        if preset not in X26X_PRESETS:
            raise VcConfigError(f"preset={preset!r} is not an x265/x264 preset: use one of {list(X26X_PRESETS)}")
        return preset

    def __init__(self) -> None:
        self._av = _import_av()
        if self.encoder not in self._av.codecs_available:
            raise ImportError(f"this PyAV/FFmpeg build has no {self.encoder} encoder")

    def _options(self, qp: int, settings: EncoderSettings) -> dict[str, str]:
        raise NotImplementedError

    def encode(self, frames: list[np.ndarray], qp: int, settings: EncoderSettings) -> list[bytes]:
        av = self._av
        h2, w = frames[0].shape
        ctx = av.CodecContext.create(self.encoder, "w")
        ctx.width, ctx.height, ctx.pix_fmt = w, h2 * 2 // 3, "yuv420p"
        ctx.time_base = fractions.Fraction(1, 25)
        ctx.gop_size = 1
        ctx.options = self._options(qp, settings)
        packets = []
        try:
            for i, f in enumerate(frames):
                vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="yuv420p")
                vf.pts = i
                packets += [bytes(p) for p in ctx.encode(vf)]
            packets += [bytes(p) for p in ctx.encode(None)]
        except av.error.FFmpegError as exc:
            raise VcCodecError(f"{self.encoder} failed at qp={qp}: {exc}") from exc
        if len(packets) != len(frames):
            raise VcCodecError(f"{self.encoder} returned {len(packets)} packets for {len(frames)} frames")
        return packets

    def decode(self, packets: list[bytes], width: int, height: int, threads: int = 1) -> list[np.ndarray]:
        av = self._av
        ctx = av.CodecContext.create(self.decoder, "r")
        # one picture: slice threading decodes x265's wavefront (WPP) rows in parallel (~2x on
        # 2 cores); many small pictures (KV-cache blocks): frame threading decodes several
        # at once (measured 1.7x for HEVC, 1.9x for dav1d on 2 cores; same samples)
        ctx.thread_count, ctx.thread_type = threads, ("FRAME" if len(packets) > 1 else "SLICE")
        out = []
        try:
            for data in packets:
                out += [f.to_ndarray(format="yuv420p") for f in ctx.decode(av.Packet(data))]
            out += [f.to_ndarray(format="yuv420p") for f in ctx.decode(None)]
        except av.error.FFmpegError as exc:
            raise VcCodecError(f"{self.decoder} decoder failed: {exc}") from exc
        if len(out) != len(packets) or any(f.shape != (height * 3 // 2, width) for f in out):
            raise VcCodecError(
                f"{self.decoder} decoder returned {len(out)} frames of shape "
                f"{out[0].shape if out else None}, expected {len(packets)} of {(height * 3 // 2, width)}"
            )
        return out


class HevcBackend(_PyAVBackend):
    """H.265 Main profile, intra only (libx265 → FFmpeg hevc; NVDEC-decodable)."""

    name, encoder, decoder = "hevc", "libx265", "hevc"
    qp_min, qp_max = 0, 51
    # RDOQ, measured on SmolLM2 (encoder_knobs.py, rd_sweep): -4% weight MSE at 2.5 bpw,
    # -9% at 4.0, perplexity at 2.5 bpw 97.6 -> 80.2, at ~1.6x the encode time
    default_params = "rdoq-level=2"
    # the knobs measured in scripts/encoder_knobs.py (none but RDOQ helped; the rest stay settable)
    allowed_params = {  # noqa: RUF012
        "rdoq-level": "[0-2]", "tu-intra-depth": "[1-4]", "rd": "[1-6]", "ctu": "16|32|64",
        "signhide": "[01]", "no-signhide": "[01]",
    }  # fmt: skip

    def _options(self, qp: int, settings: EncoderSettings) -> dict[str, str]:
        params = [
            f"qp={qp}",
            "keyint=1",
            "repeat-headers=1",  # each frame a self-contained access unit
            "info=0",  # no encoder-version SEI: it costs ~1 kB per stream
            "aq-mode=0",  # no psycho-visual QP modulation: we want plain MSE
            "psy-rd=0",
            "psy-rdoq=0",
            "no-deblock=1",  # in-loop filters smooth picture edges: measured +11% MSE on weights
            "no-sao=1",
            "log-level=error",
        ]
        if settings.chroma_qp_match:
            off = hevc_chroma_offset(qp)
            params += [f"cbqpoffs={off}", f"crqpoffs={off}"]
        if settings.threads:
            params.append(f"pools={settings.threads}")
        if settings.extra_params:
            params.append(settings.extra_params)
        return {"preset": settings.preset, "x265-params": ":".join(params)}


class H264Backend(_PyAVBackend):
    """H.264 High profile, intra only (libx264 → FFmpeg h264)."""

    name, encoder, decoder = "h264", "libx264", "h264"
    qp_min, qp_max = 0, 51
    allowed_params = {"trellis": "[0-2]"}  # noqa: RUF012

    def _options(self, qp: int, settings: EncoderSettings) -> dict[str, str]:
        params = ["keyint=1", "aq-mode=0", "psy=0", f"qp={qp}"]
        if settings.threads:
            params.append(f"threads={settings.threads}")
        if settings.extra_params:
            params.append(settings.extra_params)
        return {"preset": settings.preset, "x264-params": ":".join(params)}


# log2 of SVT-AV1's effective quantiser step (sqrt(12·MSE), pixels) at qp = 9, 12, …, 63,
# measured on uniform-noise pictures (scripts/av1_step_calibration.py). AV1's step is
# not exponential in qp as H.26x's is: ~0.07 per qp at the fine end, ~0.1 above qp 30.
_AV1_QP_KNOTS = (9, 12, 15, 18, 21, 24, 27, 30, 33, 36, 39, 42, 45, 48, 51, 54, 57, 60, 63)
_AV1_LOG2_STEP = (0.823, 1.040, 1.286, 1.453, 1.633, 1.811, 2.067, 2.285, 2.555, 2.856,
                  3.162, 3.487, 3.783, 4.108, 4.429, 4.760, 5.082, 5.378, 5.809)  # fmt: skip

# x265/x264 preset names → SVT-AV1 presets (digits pass through). "superfast" (vc_quant's
# default) → 8: on SmolLM2 weights 4% lower MSE than 10 and still ~3x faster than x265
# superfast + RDOQ (results/codec/av1_vs_hevc.md); the rest keep the order.
_SVT_PRESETS = {"ultrafast": 12, "superfast": 8, "veryfast": 7, "faster": 6, "fast": 5, "medium": 4,
                "slow": 3, "slower": 2, "veryslow": 1, "placebo": 0}  # fmt: skip

# SVT-AV1 hangs on some thin pictures (measured: 128x8, 512x16); the frame planner keeps
# both sides >= 144, this guards direct callers.
_AV1_MIN_SIDE = 64


def av1_log2_step(qp: int) -> float:
    """log2 of the effective quantiser step of SVT-AV1 at ``qp`` (piecewise-linear in the measured knots)."""
    knots, values = _AV1_QP_KNOTS, _AV1_LOG2_STEP
    if qp <= knots[0]:
        return values[0] + (qp - knots[0]) * (values[1] - values[0]) / (knots[1] - knots[0])
    i = min(next(k for k in range(1, len(knots)) if qp <= knots[k]), len(knots) - 1)
    t = (qp - knots[i - 1]) / (knots[i] - knots[i - 1])
    return values[i - 1] + t * (values[i] - values[i - 1])


def svt_preset(preset: str) -> int:
    """An SVT-AV1 preset number from a digit string or an x265-style name."""
    if preset.isdigit() and 0 <= int(preset) <= 13:
        return int(preset)
    if preset in _SVT_PRESETS:
        return _SVT_PRESETS[preset]
    raise VcConfigError(f"preset={preset!r} is not an SVT-AV1 preset: use 0..13 or one of {sorted(_SVT_PRESETS)}")


class Av1Backend(_PyAVBackend):
    """AV1, intra only (SVT-AV1 → dav1d; NVDEC on Ampere and later decodes AV1 too).

    Measured on Gaussian pictures at 2–4 bits per sample: ~10% lower MSE than x265
    with RDOQ at the same rate, at a fraction of the encode time (results/codec/).
    Every frame is encoded by its own encoder, so every packet carries its sequence
    header and decodes on its own (frames decode in parallel).
    """

    name, encoder, decoder = "av1", "libsvtav1", "libdav1d"
    qp_min, qp_max = 1, 63
    allowed_params = {"enable-dlf": "[0-2]", "tune": "[0-2]", "enable-qm": "[01]", "sharpness": "-?[0-7]"}  # noqa: RUF012
    log2_step = staticmethod(av1_log2_step)
    check_preset = staticmethod(svt_preset)

    def __init__(self) -> None:
        os.environ.setdefault("SVT_LOG", "1")  # SVT-AV1 prints its configuration per encoder unless told
        super().__init__()

    def _options(self, qp: int, settings: EncoderSettings) -> dict[str, str]:
        params = [
            "rc=0",  # constant QP
            f"qp={qp}",
            "aq-mode=0",  # no QP modulation inside the picture: plain MSE
            "enable-tf=0",
            "enable-cdef=0",  # in-loop filters smooth picture edges (see HEVC's no-deblock)
            "enable-restoration=0",
            "film-grain=0",
        ]
        if settings.threads:
            params.append(f"lp={settings.threads}")
        if settings.extra_params:
            params.append(settings.extra_params)
        return {"preset": str(svt_preset(settings.preset)), "svtav1-params": ":".join(params)}

    def encode(self, frames: list[np.ndarray], qp: int, settings: EncoderSettings) -> list[bytes]:
        h2, w = frames[0].shape
        if min(w, h2 * 2 // 3) < _AV1_MIN_SIDE:
            raise VcCodecError(f"av1: frame {w}x{h2 * 2 // 3} below {_AV1_MIN_SIDE} pixels a side (SVT-AV1 can hang)")
        packets = []
        with _keep_scheduling():
            for f in frames:  # one encoder per frame: self-contained packets
                packets += super().encode([f], qp, settings)
        return packets


class _keep_scheduling:
    """Restore the calling thread's scheduling policy after SVT-AV1 ran.

    Run as root, SVT-AV1 switches the thread that creates an encoder to SCHED_FIFO
    priority 99 (measured) and leaves it so; every thread and process started from it
    afterwards inherits real-time priority, and busy-waiting threads at that priority
    starved a 2-core machine (a CI test hung). The encoder's own threads end with it.
    """

    def __enter__(self) -> None:
        self.saved = (os.sched_getscheduler(0), os.sched_getparam(0)) if hasattr(os, "sched_getscheduler") else None

    def __exit__(self, *exc) -> None:
        if self.saved and (os.sched_getscheduler(0), os.sched_getparam(0)) != self.saved:
            os.sched_setscheduler(0, *self.saved)
