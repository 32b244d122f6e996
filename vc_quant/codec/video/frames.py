"""Packing of a uint8 matrix into 8-bit 4:2:0 frames and back.

A matrix ``(R, C)`` first becomes a *canvas* whose width suits a video frame:
wide matrices are cut into column strips stacked vertically, narrow ones put
``g`` consecutive rows side by side; the width is padded to a multiple of 16.
The canvas is then cut into frames of ``1.5·H`` canvas rows each: ``H`` rows fill
the luma plane and the next ``H/2`` rows fill both chroma planes (left half of
the columns → U, right half → V), so no sample of the 4:2:0 picture is wasted
and neighbouring values stay neighbours inside each plane. Strip/group padding
repeats the last column/row; frame padding is the flat mid-grey pixel 128, which
intra prediction codes almost for free.

Frames are returned in PyAV's ``yuv420p`` ndarray layout: shape ``(1.5·H, W)``
holding the Y, U and V planes back to back.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from vc_quant.errors import VcConfigError

ALIGN = 16  # frame sides are multiples of 16 (even chroma, whole 8x8 blocks)
MIN_SIDE = 144  # NVDEC's smallest HEVC picture side (H100/H200)
MAX_SIDE = 8192  # NVDEC's largest HEVC picture side
PAD_PIXEL = 128


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclass(frozen=True)
class FrameLayout:
    """Where every value of a ``rows × cols`` matrix sits in the frames."""

    rows: int
    cols: int
    strips: int  # column strips stacked vertically (wide matrices)
    group: int  # matrix rows placed side by side per canvas row (narrow matrices)
    canvas_rows: int  # canvas rows holding data (before frame padding)
    width: int  # frame width W
    height: int  # frame height H (luma rows)
    n_frames: int

    @property
    def samples(self) -> int:
        """Total 8-bit samples coded, padding included."""
        return self.n_frames * self.width * self.height * 3 // 2

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FrameLayout:
        return cls(**{k: int(d[k]) for k in cls.__dataclass_fields__})


def plan_layout(rows: int, cols: int, max_side: int = 2048) -> FrameLayout:
    """Choose strips/grouping and frame size for a ``rows × cols`` matrix."""
    if not (MIN_SIDE <= max_side <= MAX_SIDE) or max_side % ALIGN:
        raise VcConfigError(
            f"tile={max_side}: must be a multiple of {ALIGN} in [{MIN_SIDE}, {MAX_SIDE}] (NVDEC limits)"
        )
    if rows < 1 or cols < 1:
        raise VcConfigError(f"cannot lay out an empty {rows}x{cols} matrix")
    strips, group = 1, 1
    if cols > max_side:
        strips = math.ceil(cols / max_side)
        strip_w = math.ceil(cols / strips)
        canvas_rows, data_w = rows * strips, strip_w
    elif cols < MIN_SIDE and _round_up(cols * math.ceil(MIN_SIDE / cols), ALIGN) <= max_side:
        group = math.ceil(MIN_SIDE / cols)
        canvas_rows, data_w = math.ceil(rows / group), cols * group
    else:
        canvas_rows, data_w = rows, cols
    width = max(MIN_SIDE, _round_up(data_w, ALIGN))
    rows_per_frame_max = max_side * 3 // 2
    n_frames = math.ceil(canvas_rows / rows_per_frame_max)
    height = _round_up(math.ceil(canvas_rows * 2 / (3 * n_frames)), ALIGN)
    height = min(max(MIN_SIDE, height), max_side)
    return FrameLayout(rows, cols, strips, group, canvas_rows, width, height, n_frames)


def _pad_last(x: torch.Tensor, dim: int, size: int, value: int | None = None) -> torch.Tensor:
    """Pad ``dim`` up to ``size`` with ``value``, or by repeating the last slice."""
    extra = size - x.shape[dim]
    if extra <= 0:
        return x
    shape = [extra if d == dim else s for d, s in enumerate(x.shape)]
    if value is None:
        fill = x.narrow(dim, x.shape[dim] - 1, 1).expand(*shape)
    else:
        fill = torch.full(shape, value, dtype=x.dtype, device=x.device)
    return torch.cat([x, fill], dim)


def pack(mat: torch.Tensor, layout: FrameLayout) -> list[torch.Tensor]:
    """uint8 ``(rows, cols)`` matrix → list of ``(1.5H, W)`` yuv420p frames (uint8, CPU)."""
    if tuple(mat.shape) != (layout.rows, layout.cols):
        raise VcConfigError(f"pack: matrix shape {tuple(mat.shape)} != layout {(layout.rows, layout.cols)}")
    if layout.strips > 1:
        strip_w = math.ceil(layout.cols / layout.strips)
        mat = _pad_last(mat, 1, strip_w * layout.strips)
        canvas = torch.cat(torch.split(mat, strip_w, dim=1), dim=0)
    elif layout.group > 1:
        mat = _pad_last(mat, 0, layout.canvas_rows * layout.group)
        canvas = mat.reshape(layout.canvas_rows, layout.cols * layout.group)
    else:
        canvas = mat
    w, h = layout.width, layout.height
    canvas = _pad_last(canvas, 1, w, PAD_PIXEL)
    canvas = _pad_last(canvas, 0, layout.n_frames * h * 3 // 2, PAD_PIXEL)
    frames = []
    for f in canvas.split(h * 3 // 2, dim=0):
        y, uv = f[:h], f[h:]
        u, v = uv[:, : w // 2], uv[:, w // 2 :]
        frames.append(torch.cat([y.reshape(-1), u.reshape(-1), v.reshape(-1)]).reshape(h * 3 // 2, w))
    return frames


def unpack(frames: list[torch.Tensor], layout: FrameLayout) -> torch.Tensor:
    """Inverse of :func:`pack` (frames may live on any device)."""
    return canvas_to_matrix(frames_to_canvas(frames, layout), layout)


def frames_to_canvas(frames: list[torch.Tensor], layout: FrameLayout) -> torch.Tensor:
    """yuv420p frames → the ``(n_frames·1.5H, W)`` canvas (luma rows, then ``[U | V]`` rows)."""
    if len(frames) != layout.n_frames:
        raise VcConfigError(f"unpack: got {len(frames)} frames, layout expects {layout.n_frames}")
    return _frame_canvases(torch.stack([f.reshape(-1) for f in frames]), layout).reshape(-1, layout.width)


def _frame_canvases(flat: torch.Tensor, layout: FrameLayout, luma_only: bool = False) -> torch.Tensor:
    """``(B, 1.5H·W)`` yuv420p pictures → ``(B, 1.5H, W)`` canvas pieces (``(B, H, W)`` with ``luma_only``)."""
    w, h = layout.width, layout.height
    y = flat[:, : h * w].reshape(-1, h, w)
    if luma_only:
        return y
    u = flat[:, h * w : h * w + h * w // 4].reshape(-1, h // 2, w // 2)
    v = flat[:, h * w + h * w // 4 :].reshape(-1, h // 2, w // 2)
    return torch.cat([y, torch.cat([u, v], dim=2)], dim=1)


def nv12_into_canvas(nv12: torch.Tensor, canvas: torch.Tensor, index: int, layout: FrameLayout) -> None:
    """Copy frame ``index`` from an NV12 surface (Y rows, then interleaved U/V) into the canvas.

    The GPU decoder's native output: two copies per frame, no planar intermediate.
    """
    w, h = layout.width, layout.height
    base = index * (h * 3 // 2)
    canvas[base : base + h].copy_(nv12[:h])
    # chroma row r: [U_r | V_r] in the canvas, U_r[i] = uv[r, i, 0], V_r[i] = uv[r, i, 1]
    uv = nv12[h:].reshape(h // 2, w // 2, 2).permute(0, 2, 1)
    canvas[base + h : base + h * 3 // 2].view(h // 2, 2, w // 2).copy_(uv)


def canvas_to_matrix(canvas: torch.Tensor, layout: FrameLayout) -> torch.Tensor:
    """The canvas → the ``(rows, cols)`` uint8 matrix (undo strips / row grouping / padding).

    Leading dimensions are kept: ``(..., canvas rows, W)`` → ``(..., rows, cols)``.
    """
    lead = canvas.shape[:-2]
    if layout.strips > 1:
        strip_w = math.ceil(layout.cols / layout.strips)
        strips = canvas[..., : layout.canvas_rows, :strip_w].split(layout.rows, dim=-2)
        return torch.cat(strips, dim=-1)[..., : layout.cols]
    if layout.group > 1:
        data = canvas[..., : layout.canvas_rows, : layout.cols * layout.group]
        return data.reshape(*lead, layout.canvas_rows * layout.group, layout.cols)[..., : layout.rows, :]
    return canvas[..., : layout.rows, : layout.cols]


def unpack_single_frames(frames: torch.Tensor, layout: FrameLayout) -> torch.Tensor:
    """``(B, 1.5H, W)`` yuv420p frames of B matrices sharing a one-frame ``layout`` → ``(B, rows, cols)``.

    The batched form of :func:`unpack` for many small tensors (KV-cache blocks).
    """
    if layout.n_frames != 1:
        raise VcConfigError(f"unpack_single_frames: layout has {layout.n_frames} frames per matrix, expected 1")
    # the data may fit in the luma plane: then no chroma to gather
    canvas = _frame_canvases(frames.reshape(frames.shape[0], -1), layout, luma_only=layout.canvas_rows <= layout.height)
    return canvas_to_matrix(canvas, layout)
