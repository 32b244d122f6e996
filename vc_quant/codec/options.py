"""Codec options and the bits range: declared once here, derived everywhere else.

:class:`CodecOptions` holds every option of :func:`vc_quant.codec.encode_tensor`
with its measured default; :class:`vc_quant.VcQuantizationConfig`, the KV cache
and the in-flight codecs take their defaults from it. :data:`BITS_RANGE` is the
one range of target bits per value accepted anywhere in vc_quant.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from vc_quant.codec import frames as fr
from vc_quant.codec.backends import backend_class
from vc_quant.errors import VcConfigError

#: target all-in bits per value accepted by every entry point (codec, config, allocation, KV cache, hooks)
BITS_RANGE = (1.0, 8.0)


def check_bits(bits: object, what: str = "bits") -> float:
    """``bits`` as a float inside :data:`BITS_RANGE`; raise ``VcConfigError`` naming ``what`` otherwise."""
    lo, hi = BITS_RANGE
    if isinstance(bits, bool) or not isinstance(bits, int | float) or not lo <= float(bits) <= hi:
        raise VcConfigError(f"{what}={bits!r}: expected a number of bits per value in [{lo:g}, {hi:g}]")
    return float(bits)


def _check_type(name: str, value: object, kind: type | tuple[type, ...], expected: str) -> None:
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise VcConfigError(f"{name}={value!r}: expected {expected}")
    if not isinstance(value, kind):
        raise VcConfigError(f"{name}={value!r}: expected {expected}")


@dataclass(frozen=True)
class CodecOptions:
    """Options of :func:`encode_tensor` (all have measured defaults; see docs/codec.md)."""

    codec: str = "hevc"
    preset: str = "superfast"  # x265: same MSE as medium at ~1.5x the speed; "slow" is ~5% better
    rotation: bool = True
    seed: int = 0
    scale: str = "tensor"  # "tensor": one affine map (MSE-optimal); "row": per-row min/max
    tile: int = 2048  # largest frame side
    chroma_qp_match: bool = True
    # extra encoder parameters, "key=value:key=value", from the backend's allowlist;
    # None: the backend's measured default (HEVC: rdoq-level=2, see HevcBackend)
    encoder_params: str | None = None
    threads: int = 0
    tolerance: float = 0.03  # allowed |achieved - target| in all-in bits per value
    qp: int | None = None  # fixed QP (amplitude 1): bypasses rate control
    # "search": probes + full encodes until the rate is within tolerance; "predict": one
    # encode at the model-predicted step shifted by ``step_offset`` (callers that encode
    # many similar tensors — KV-cache blocks, gradients — learn the offset from earlier rates)
    rate_control: str = "search"
    step_offset: float = 0.0

    def __post_init__(self) -> None:
        _check_type("codec", self.codec, str, "a codec name")
        backend = backend_class(self.codec)
        _check_type("preset", self.preset, str, "a preset name")
        backend.check_preset(self.preset)
        _check_type("rotation", self.rotation, bool, "True or False")
        _check_type("chroma_qp_match", self.chroma_qp_match, bool, "True or False")
        _check_type("seed", self.seed, int, "an integer")
        if not 0 <= self.seed < 2**63:
            raise VcConfigError(f"seed={self.seed!r}: expected an integer in [0, 2**63)")
        if self.scale not in ("tensor", "row"):
            raise VcConfigError(f"scale={self.scale!r}: expected 'tensor' or 'row'")
        _check_type("tile", self.tile, int, f"an integer multiple of {fr.ALIGN}")
        fr.plan_layout(1, 1, self.tile)  # validates the range
        if self.encoder_params is not None:
            _check_type("encoder_params", self.encoder_params, str, "'key=value:key=value' or None")
            backend.check_params(self.encoder_params)
        _check_type("threads", self.threads, int, "an integer >= 0 (0 = all cores)")
        if self.threads < 0:
            raise VcConfigError(f"threads={self.threads!r}: expected >= 0 (0 = all cores)")
        _check_type("tolerance", self.tolerance, int | float, "a number")
        if not 0 < self.tolerance < 1:
            raise VcConfigError(f"tolerance={self.tolerance!r}: expected a value in (0, 1) bits per value")
        if self.qp is not None:
            _check_type("qp", self.qp, int, "an integer or None")
            if not backend.qp_min <= self.qp <= backend.qp_max:
                raise VcConfigError(f"qp={self.qp}: outside [{backend.qp_min}, {backend.qp_max}] for {self.codec}")
        if self.rate_control not in ("search", "predict"):
            raise VcConfigError(f"rate_control={self.rate_control!r}: expected 'search' or 'predict'")
        _check_type("step_offset", self.step_offset, int | float, "a number")

    @classmethod
    def from_kwargs(cls, **options) -> CodecOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise VcConfigError(f"unknown codec option(s) {unknown}; known options: {sorted(known)}")
        return cls(**options)

    @classmethod
    def default(cls, name: str) -> object:
        """The declared default of option ``name``."""
        return next(f.default for f in fields(cls) if f.name == name)
