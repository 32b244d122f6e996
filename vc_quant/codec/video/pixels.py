"""The video family's 8-bit front end: rotated values ↔ pixels through an affine map.

:func:`pixel_map` maps each row (or the whole tensor) onto 0..255; its amplitude is a
continuous knob the rate control uses between integer QPs. :func:`to_pixels` /
:func:`from_pixels` apply it with the *stored* map, so decoding matches encoding.
"""

from __future__ import annotations

import torch

PIXEL_ZERO = 128.0  # the pixel value that decodes to ``center``
PIXEL_ZERO_INT = 128


def pixel_map(x: torch.Tensor, amplitude: float, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine map of a 2-D float tensor onto pixels centred on 128: ``(center, step)``.

    ``x ≈ center + (pixel - 128) * step`` (a constant row decodes exactly). ``amplitude`` in (0, 1] scales the used
    range (1 → the extremes land on 0 and 255). ``center``/``step`` are float16 per
    row (``per_row``) or float32 scalars, shaped to broadcast against ``x``.
    """
    if per_row:
        lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
        store = torch.float16
    else:
        lo, hi = x.amin().reshape(1, 1), x.amax().reshape(1, 1)
        store = torch.float32
    center = ((hi + lo) * 0.5).to(store)
    c = center.to(x.dtype)
    half = torch.maximum(hi - c, c - lo)  # measured from the *stored* centre
    # round the step up so the extremes stay inside 0..255 after storage rounding
    step = (half / (127.5 * amplitude) * (1 + 2**-9)).to(store)
    step = torch.where(step > 0, step, torch.ones_like(step))  # constant rows
    return center, step


def to_pixels(x: torch.Tensor, center: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Quantise ``x`` to uint8 pixels with the *stored* map, so decode matches encode."""
    q = (x - center.to(x.dtype)) / step.to(x.dtype) + PIXEL_ZERO
    return q.round_().clamp_(0, 255).to(torch.uint8)


def from_pixels(
    pixels: torch.Tensor, center: torch.Tensor, step: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`to_pixels` (up to the rounding to whole pixels)."""
    if center.numel() == 1 and step.numel() == 1:  # one map per tensor: no host-to-device copies
        c, s = float(center.to(dtype).reshape(())), float(step.to(dtype).reshape(()))
        return (pixels.to(dtype) - PIXEL_ZERO) * s + c
    return (pixels.to(dtype) - PIXEL_ZERO) * step.to(pixels.device, dtype) + center.to(pixels.device, dtype)
