"""The video family's decoders: access units → frames (FFmpeg/dav1d on the CPU, NVDEC on CUDA) → samples.

Frames decode in parallel (one picture per worker); :func:`decode_tensors_alike` decodes
many small records of one shape at once (KV-cache blocks).
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from vc_quant.codec import transform as tf
from vc_quant.codec.record import EncodedTensor
from vc_quant.codec.video import frames as fr
from vc_quant.codec.video import pixels as px
from vc_quant.codec.video.backends import get_backend
from vc_quant.errors import VcConfigError

_FRAME_POOL: ThreadPoolExecutor | None = None
_FRAME_POOL_LOCK = threading.Lock()


def _frame_pool() -> ThreadPoolExecutor:
    global _FRAME_POOL
    with _FRAME_POOL_LOCK:  # first use can come from two threads (the KV cache decodes on a background one)
        if _FRAME_POOL is None:
            _FRAME_POOL = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="vc-frames")
        return _FRAME_POOL


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


def pixels_cpu(enc: EncodedTensor, threads: int | None) -> torch.Tensor:
    return fr.unpack(decode_frames(enc, threads), enc.layout)


def pixels(enc: EncodedTensor, device: torch.device, backend: str, threads: int | None, name: str) -> torch.Tensor:
    if backend == "nvdec":
        from vc_quant.codec.backends.nvcodec import decode_pixels_nvdec

        return decode_pixels_nvdec(enc, device, name=name)
    return pixels_cpu(enc, threads).to(device)


def pixels_to_samples(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels → int8 ``pixel − 128`` (flipping the top bit is the two's-complement shift)."""
    return pixels.contiguous().bitwise_xor_(px.PIXEL_ZERO_INT).view(torch.int8)


def decode_tensors_alike(encs: list[EncodedTensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode records of one shape and codec setting (video: one frame each) to a ``(len(encs), *shape)`` tensor.

    rANS records are handed to :func:`vc_quant.codec.rans.decode.decode_alike_rans`.

    One decoder for all pictures and one vectorised dequantise + inverse rotation:
    the per-tensor fixed costs of :func:`decode_tensor` dominate for small tensors
    decoded often (the KV cache decodes every block at every step). Same result as
    stacking :func:`decode_tensor` outputs.
    """
    first = encs[0].meta
    same = ("codec", "shape", "rotation_seed", "scale") + (("layout",) if first["codec"] != "rans" else ())
    if any(any(e.meta.get(k) != first.get(k) for k in same) for e in encs):
        raise VcConfigError(f"decode_tensors_alike: records differ in one of {same}")
    if first["codec"] == "rans":
        from vc_quant.codec.rans.decode import decode_alike_rans

        return decode_alike_rans(encs, dtype)
    layout = encs[0].layout
    packets = [e.bitstream.numpy().tobytes() for e in encs]
    frames = get_backend(first["codec"]).decode(packets, layout.width, layout.height, threads=os.cpu_count() or 1)
    pixels = fr.unpack_single_frames(torch.from_numpy(np.stack(frames)), layout)
    center = torch.stack([e.center for e in encs]).to(torch.float32)
    step = torch.stack([e.step for e in encs]).to(torch.float32)
    x = pixels.to(torch.float32).sub_(px.PIXEL_ZERO).mul_(step).add_(center)  # in place: no temporaries
    if first["rotation_seed"] is not None:
        x = tf.unrotate(x, first["rotation_seed"])
    n = math.prod(first["shape"])
    return x.reshape(len(encs), -1)[:, :n].reshape(len(encs), *first["shape"]).to(dtype)
