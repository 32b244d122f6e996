"""The interface every video backend implements, and the backend registry."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from vc_quant.errors import VcBackendUnavailableError, VcConfigError


@dataclass(frozen=True)
class EncoderSettings:
    """Encoder knobs that affect the bitstream (part of the determinism contract)."""

    preset: str = "medium"
    threads: int = 0  # 0 → the encoder's own choice (all cores)
    chroma_qp_match: bool = True  # offset chroma QP so chroma is quantised like luma
    # extra encoder parameters ("key=value:key=value", x265/x264 syntax), appended last
    # so they override vc_quant's own; the stream stays standard (any decoder reads it)
    extra_params: str = ""


class VideoBackend(ABC):
    """One video codec used as a picture codec for 8-bit 4:2:0 frames.

    ``encode`` turns frames into one self-contained intra access unit each (its own
    parameter sets), so frames decode independently and in parallel.
    """

    name: str
    #: name of the decoder FFmpeg uses for this codec (CPU reference decoder)
    qp_min: int
    qp_max: int
    #: extra encoder parameters used when the caller gives none (``encoder_params=None``)
    default_params: str = ""

    @staticmethod
    def log2_step(qp: int) -> float:
        """log2 of the quantiser step size at ``qp`` (H.26x: doubles every 6 QP)."""
        return (qp - 4) / 6.0

    #: extra encoder parameters a caller may set: ``{key: regex the value must fullmatch}``. An
    #: allowlist of knobs that were measured (encoder_knobs.py): anything else — file, log, stats or
    #: analysis outputs in particular — is refused, so a config can never make the encoder touch
    #: the filesystem.
    allowed_params: dict[str, str] = {}  # noqa: RUF012 (read-only class data)

    @staticmethod
    def check_preset(preset: str) -> object:
        """Raise ``VcConfigError`` if ``preset`` means nothing to this encoder."""
        return preset

    @classmethod
    def check_params(cls, params: str) -> None:
        """Raise ``VcConfigError`` unless every ``key=value`` of ``params`` is on the allowlist."""
        for item in (p for p in params.split(":") if p):
            key, _, value = item.partition("=")
            pattern = cls.allowed_params.get(key)
            if pattern is None:
                allowed = ", ".join(sorted(cls.allowed_params)) or "none"
                raise VcConfigError(
                    f"encoder_params: {key!r} is not an allowed {cls.name} parameter (allowed: {allowed})"
                )
            if not re.fullmatch(pattern, value):
                raise VcConfigError(f"encoder_params: {key}={value!r} is not a valid value for {cls.name}")

    @abstractmethod
    def encode(self, frames: list[np.ndarray], qp: int, settings: EncoderSettings) -> list[bytes]:
        """Encode ``(1.5H, W)`` uint8 yuv420p frames at a constant QP; one packet per frame."""

    @abstractmethod
    def decode(self, packets: list[bytes], width: int, height: int, threads: int = 1) -> list[np.ndarray]:
        """Decode packets back into ``(1.5H, W)`` uint8 frames.

        ``threads``: decoder threads, inside the picture for one packet, across pictures for several.
        """


_FACTORIES: dict[str, Callable[[], VideoBackend]] = {}
_INSTANCES: dict[str, VideoBackend] = {}


def register_backend(name: str, factory: Callable[[], VideoBackend]) -> None:
    _FACTORIES[name] = factory


def available_backends() -> list[str]:
    return sorted(_FACTORIES)


def backend_class(codec: str) -> type[VideoBackend]:
    """The backend class registered as ``codec`` (nothing is started); raises for unknown codecs."""
    factory = _FACTORIES.get(codec)
    if not (isinstance(factory, type) and issubclass(factory, VideoBackend)):
        raise VcConfigError(f"codec={codec!r} is not a known backend; choose one of {available_backends()}")
    return factory


def get_backend(name: str) -> VideoBackend:
    """Return the (cached) backend called ``name``; raise a clear error if unknown/unavailable."""
    if name not in _FACTORIES:
        raise VcConfigError(f"codec={name!r} is not a known backend; choose one of {available_backends()}")
    if name not in _INSTANCES:
        try:
            _INSTANCES[name] = _FACTORIES[name]()
        except ImportError as exc:  # a missing optional library
            raise VcBackendUnavailableError(f"codec backend {name!r} cannot run here: {exc}") from exc
    return _INSTANCES[name]
