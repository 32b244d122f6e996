"""The EncodedTensor record both codec families write: bitstream + affine map + metadata, checks.

The map turns decoded int8 *samples* ``S`` (rotated domain) into values:
``W_rot = center + step · S`` — for the video family ``S`` is ``pixel − 128`` and the map
is the pixel map (per tensor, or per row with ``scale="row"``); for rANS ``S`` is the
decoded reconstruction integer, ``center`` is 0 and ``step`` the quantizer step (one
float32, or fp16 per row). An optional ``col_scale`` (one fp16 factor per input column,
> 0) multiplies the columns before the rotation and divides them after decoding: the
codec's error, white in the scaled domain, lands less on the columns whose errors cost the
loss more (:mod:`vc_quant.allocation`).

A record is untrusted input when it comes from a file: :meth:`EncodedTensor.verify`
checks, before a single sample is decoded, that the metadata is well formed, that the
bitstream's own layout is exactly the one the encoder plans for the tensor's shape (video:
the frame layout for the tile, frame byte counts adding up; rANS: header, tables and
segment offsets, :func:`vc_quant.codec.rans.bitstream.parse`), so nothing decoded can be
larger than the tensor plus its padding, and that the CRC32 — which covers bitstream,
scales and metadata, the tensor's name included — matches.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, field

import torch

from vc_quant.codec import transform as tf
from vc_quant.codec.video import frames as fr
from vc_quant.errors import VcCorruptDataError

#: format written by this version (3: the rANS codec); formats 1 (no name or tile in the
#: metadata) and 2 (video codecs only) are still read
FORMAT_VERSION = 3
READABLE_FORMATS = (1, 2, 3)
RANS_CODEC = "rans"
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: stored metadata larger than this is refused before it is parsed (real records: < 1 kB + 8 B per frame)
MAX_META_BYTES = 1 << 20
_MAX_NUMEL = 1 << 40
_MAX_DIMS = 8
_REQUIRED = {"format": int, "codec": str, "shape": list, "dtype": str, "scale": str,
             "rotation_seed": (int, type(None)), "crc32": int}  # fmt: skip
_REQUIRED_VIDEO = {"layout": dict, "frame_bytes": list, "qp": int}
_REQUIRED_RANS = {"quantizer": str}


def matrix_shape(shape: tuple[int, ...] | list[int]) -> tuple[int, int]:
    """The ``(rows, cols)`` matrix the codec sees for a tensor of ``shape``.

    Tensors of 2+ dimensions keep their last dimension as columns. 1-D/0-D tensors
    are folded into a near-square matrix (padded with their last value) so the codec
    sees a picture, not one long row.
    """
    n = math.prod(shape)
    if len(shape) >= 2:
        return n // shape[-1], shape[-1]
    width = min(fr.MAX_SIDE // 4, max(fr.MIN_SIDE, -(-math.isqrt(n) // fr.ALIGN) * fr.ALIGN))
    if n <= width:
        return 1, n
    return -(-n // width), width


@dataclass
class EncodedTensor:
    """A compressed tensor: bitstream bytes, the affine pixel map, and metadata.

    ``meta`` is JSON-able; ``to_dict``/``from_dict`` give the stored form (every
    stored byte counts in :attr:`bits_per_value`).
    """

    bitstream: torch.Tensor  # uint8, frame access units back to back
    center: torch.Tensor  # float16 (rows, 1) or float32 (1, 1)
    step: torch.Tensor
    meta: dict = field(default_factory=dict)
    #: encoder-side facts (not stored): number of full encodes, amplitude, …
    stats: dict = field(default_factory=dict, repr=False, compare=False)
    col_scale: torch.Tensor | None = None  # float16 (cols,): columns were multiplied by it before encoding
    #: decode-side state derived from the stored bytes (a parsed rANS stream), built once
    derived: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.meta["shape"])

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def layout(self) -> fr.FrameLayout:
        return fr.FrameLayout.from_dict(self.meta["layout"])

    @property
    def nbytes(self) -> int:
        """Bytes stored for this tensor: bitstream + scales + metadata."""
        return sum(t.numel() * t.element_size() for t in self.to_dict().values())

    @property
    def bits_per_value(self) -> float:
        """All-in bits per value: bitstream, scales, metadata and padding."""
        return 8.0 * self.nbytes / max(self.numel, 1)

    def to_dict(self) -> dict[str, torch.Tensor]:
        meta = torch.frombuffer(bytearray(dump_meta(self.meta)), dtype=torch.uint8)
        out = {"bitstream": self.bitstream, "center": self.center, "step": self.step, "meta": meta}
        if self.col_scale is not None:
            out["col_scale"] = self.col_scale
        return out

    @classmethod
    def from_dict(cls, d: dict[str, torch.Tensor], name: str = "tensor", verify: bool = True) -> EncodedTensor:
        """Rebuild a stored record; ``verify=False`` defers the checks to :meth:`verify`."""
        missing = {"bitstream", "center", "step", "meta"} - set(d)
        if missing:
            raise VcCorruptDataError(f"{name}: stored record lacks {sorted(missing)}")
        raw = d["meta"]
        if raw.dtype != torch.uint8 or raw.dim() != 1 or raw.numel() > MAX_META_BYTES:
            raise VcCorruptDataError(f"{name}: metadata entry is not a 1-D uint8 tensor of <= {MAX_META_BYTES} bytes")
        try:
            meta = json.loads(bytes(raw.cpu().numpy().tobytes()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise VcCorruptDataError(f"{name}: metadata is not valid JSON ({exc})") from exc
        if not isinstance(meta, dict):
            raise VcCorruptDataError(f"{name}: metadata is not a JSON object")
        enc = cls(d["bitstream"], d["center"], d["step"], meta, col_scale=d.get("col_scale"))
        if verify:
            enc.verify(name)
        return enc

    def verify(self, name: str = "tensor", expect_name: str | None = None) -> None:
        """Check the record before anything is decoded; raise VcCorruptDataError naming ``name``.

        ``expect_name``: the parameter this record is loaded into; a format-2 record
        written for another tensor (swapped entries) is refused. A stored name and the
        expected one may differ by a module prefix (``model.`` added or removed).
        """
        meta = self.meta
        version = meta.get("format")
        if version not in READABLE_FORMATS:
            raise VcCorruptDataError(
                f"{name}: format version {version!r} is not one of {READABLE_FORMATS}; upgrade vc_quant"
            )
        rans = meta.get("codec") == RANS_CODEC
        if rans and version < 3:
            raise VcCorruptDataError(f"{name}: a {RANS_CODEC!r} record in format {version} (crafted metadata)")
        for key, kind in {**_REQUIRED, **(_REQUIRED_RANS if rans else _REQUIRED_VIDEO)}.items():
            if not isinstance(meta.get(key), kind) or isinstance(meta.get(key), bool):
                raise VcCorruptDataError(f"{name}: metadata field {key!r} is missing or malformed")
        self._check_common(name)
        if not rans:
            self._check_video(name)
        if checksum(self) != meta["crc32"]:
            raise VcCorruptDataError(f"{name}: checksum mismatch (the stored bitstream or scales are corrupted)")
        if rans:  # after the CRC (nothing here allocates): plain damage is reported as such
            self._check_rans(name)
        stored = meta.get("name")
        if version >= 2 and expect_name is not None and not _same_tensor(stored, expect_name):
            raise VcCorruptDataError(
                f"{name}: the record was written for {stored!r}, not {expect_name!r} (swapped or misplaced entries)"
            )

    def _check_common(self, name: str) -> None:
        """Shape, dtype, scale and column scales agree with each other."""
        meta = self.meta
        shape = meta["shape"]
        if len(shape) > _MAX_DIMS or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
            raise VcCorruptDataError(f"{name}: metadata shape {shape!r} is not a list of positive integers")
        if math.prod(shape) > _MAX_NUMEL:
            raise VcCorruptDataError(f"{name}: metadata shape {shape!r} is implausibly large")
        if meta["dtype"] not in FLOAT_DTYPES or meta["scale"] not in ("tensor", "row"):
            raise VcCorruptDataError(f"{name}: metadata dtype/scale {meta['dtype']!r}/{meta['scale']!r} not supported")
        _, cols = matrix_shape(shape)
        if bool(meta.get("col_scale")) != (self.col_scale is not None):
            raise VcCorruptDataError(f"{name}: the metadata and the stored entries disagree on a column scale")
        cs = self.col_scale
        if cs is not None and (
            cs.dtype != torch.float16 or tuple(cs.shape) != (cols,) or len(shape) < 2 or not bool((cs > 0).all())
            or not bool(torch.isfinite(cs).all())
        ):  # fmt: skip
            raise VcCorruptDataError(f"{name}: column scale is not {cols} positive finite fp16 values")
        if self.bitstream.dtype != torch.uint8 or self.bitstream.dim() != 1:
            raise VcCorruptDataError(f"{name}: bitstream is not a 1-D uint8 tensor")

    def _check_map(self, name: str, want_center: tuple, want_step: tuple) -> None:
        for label, t, want in (("center", self.center, want_center), ("step", self.step, want_step)):
            if (tuple(t.shape), t.dtype) != want:
                raise VcCorruptDataError(f"{name}: {label} is {tuple(t.shape)} {t.dtype}, expected {want[0]} {want[1]}")

    def _check_rans(self, name: str) -> None:
        """The rANS stream's header, tables and segment offsets fit the tensor; the map is a step."""
        from vc_quant.codec.rans.bitstream import parse

        meta = self.meta
        rows, cols = matrix_shape(meta["shape"])
        stream = parse(self.bitstream.cpu().numpy(), rows * cols, name)
        if stream.quantizer != meta["quantizer"]:
            raise VcCorruptDataError(f"{name}: the metadata says quantizer {meta['quantizer']!r}, the stream "
                                     f"{stream.quantizer!r}")  # fmt: skip
        # one float32 step, or an fp16 step per row (scale="row", or rows that needed a coarser step)
        per_row = tuple(self.step.shape) != (1, 1) or self.step.dtype == torch.float16  # one row: (1, 1) fp16
        self._check_map(name, ((1, 1), torch.float32), ((rows, 1), torch.float16) if per_row else ((1, 1),
                        torch.float32))  # fmt: skip
        if meta["scale"] == "row" and not per_row:
            raise VcCorruptDataError(f"{name}: scale='row' but one step for the tensor")
        if float(self.center.reshape(-1)[0]) != 0.0:
            raise VcCorruptDataError(f"{name}: a rANS record's center must be 0")
        step = self.step.float()
        if not bool(torch.isfinite(step).all()) or not bool((step > 0).all()):
            raise VcCorruptDataError(f"{name}: quantizer step is not positive and finite")

    def _check_video(self, name: str) -> None:
        """The frame layout is the planner's for (shape, tile) and the frames add up to the bitstream."""
        meta = self.meta
        rows, cols = matrix_shape(meta["shape"])
        try:
            layout = self.layout
        except (KeyError, TypeError, ValueError) as exc:
            raise VcCorruptDataError(f"{name}: frame layout in the metadata is malformed ({exc})") from exc
        tile = meta.get("tile")
        if meta["format"] >= 2:
            planned = [_plan(rows, cols, tile)] if isinstance(tile, int) and not isinstance(tile, bool) else []
        else:  # format 1 did not store the tile: any legal tile that plans this layout
            planned = [_plan(rows, cols, t) for t in range(fr.MIN_SIDE, fr.MAX_SIDE + 1, fr.ALIGN)]
        if layout not in planned:
            raise VcCorruptDataError(
                f"{name}: frame layout {layout.width}x{layout.height} x {layout.n_frames} frames is not the one the "
                f"encoder plans for a {rows}x{cols} matrix (crafted or corrupted metadata)"
            )
        frame_bytes = meta["frame_bytes"]
        if len(frame_bytes) != layout.n_frames or not all(
            isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in frame_bytes
        ):
            raise VcCorruptDataError(
                f"{name}: metadata lists {len(frame_bytes)} frame sizes for {layout.n_frames} frames"
            )
        if sum(frame_bytes) != self.bitstream.numel():
            raise VcCorruptDataError(
                f"{name}: bitstream has {self.bitstream.numel()} bytes, metadata expects {sum(frame_bytes)} "
                "(truncated or corrupted file)"
            )
        per_row = meta["scale"] == "row"
        want = ((rows, 1), torch.float16) if per_row else ((1, 1), torch.float32)
        self._check_map(name, want, want)

    @property
    def is_rans(self) -> bool:
        return self.meta.get("codec") == RANS_CODEC

    def dequantize(self, pixels: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Video records: the decoded uint8 ``(rows, cols)`` pixels → the tensor (on the pixels' device)."""
        from vc_quant.codec.video.pixels import from_pixels

        return self.finish(from_pixels(pixels, self.center, self.step, torch.float32), dtype)

    def dequantize_samples(self, samples: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The int8 rotated-domain ``(rows, cols)`` samples (either family) → the tensor (on their device)."""
        c, s = self.center.to(samples.device, torch.float32), self.step.to(samples.device, torch.float32)
        return self.finish(samples.to(torch.float32) * s + c, dtype)

    def finish(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rotated-domain float32 ``(rows, cols)`` values → the tensor: unrotate, unscale, reshape, cast."""
        meta = self.meta
        if meta["rotation_seed"] is not None:
            x = tf.unrotate(x, meta["rotation_seed"])
        if self.col_scale is not None:
            x = x / self.col_scale.to(x.device, torch.float32)
        out_dtype = dtype or FLOAT_DTYPES.get(meta["dtype"], torch.float32)
        n = math.prod(meta["shape"])
        return x.reshape(-1)[:n].reshape(meta["shape"]).to(out_dtype)


def _plan(rows: int, cols: int, tile: int) -> fr.FrameLayout | None:
    try:
        return fr.plan_layout(rows, cols, tile)
    except ValueError:
        return None


def _same_tensor(stored: object, expected: str) -> bool:
    """Names agree up to a leading module prefix (transformers adds or drops e.g. ``model.``)."""
    if not isinstance(stored, str) or not stored:
        return False
    return stored == expected or expected.endswith("." + stored) or stored.endswith("." + expected)


def dump_meta(meta: dict) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")


def checksum(enc: EncodedTensor) -> int:
    """CRC32 over bitstream, centre, step and the metadata (its own ``crc32`` field excluded)."""
    crc = 0
    for t in (enc.bitstream, enc.center, enc.step, enc.col_scale):
        if t is not None:
            crc = zlib.crc32(t.detach().cpu().contiguous().view(torch.uint8).numpy(), crc)  # no copy
    meta = {k: v for k, v in enc.meta.items() if k != "crc32"}
    return zlib.crc32(dump_meta(meta), crc)
