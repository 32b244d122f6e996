"""Video backends behind a small registry: ``get_backend(name)``."""

from vc_quant.codec.video.backends.base import (
    EncoderSettings,
    VideoBackend,
    available_backends,
    backend_class,
    get_backend,
    register_backend,
)
from vc_quant.codec.video.backends.pyav import Av1Backend, H264Backend, HevcBackend

register_backend("hevc", HevcBackend)
register_backend("h264", H264Backend)
register_backend("av1", Av1Backend)

__all__ = ["EncoderSettings", "VideoBackend", "available_backends", "backend_class", "get_backend", "register_backend"]
