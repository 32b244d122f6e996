"""Codec options and the bits range: declared once here, derived everywhere else.

:class:`CodecOptions` holds every option of :func:`vc_quant.codec.encode_tensor`. Options
belong to a codec *family*: the shared ones (rotation, seed, scale, rate control) to both,
``preset``/``tile``/``chroma_qp_match``/``encoder_params``/``qp`` to the video codecs
(``"hevc"``, ``"av1"``, ``"h264"``), ``quantizer`` to ``"rans"``. A family's options left at
``None`` take that codec's measured default; setting one for the other family is an error
(a video preset never reaches the rANS coder). :func:`merge_defaults` gives callers that
keep their own defaults per codec (the KV cache, tensors in flight) the defaults of the
codec the user chose. :data:`BITS_RANGE` is the one range of target bits per value.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from vc_quant.errors import VcConfigError

#: target all-in bits per value accepted by every entry point (codec, config, allocation, KV cache, hooks)
BITS_RANGE = (1.0, 8.0)
RANS = "rans"
#: options only the video family reads, and their defaults when left at None
VIDEO_ONLY = {"preset": "superfast", "tile": 2048, "chroma_qp_match": True, "encoder_params": None, "qp": None}
#: options only the rANS family reads, and their defaults
RANS_ONLY = {"quantizer": "dq"}
RANS_QUANTIZERS = ("dq", "scalar")
#: |achieved - target| all-in bits per value the rate control aims for, per family
TOLERANCE = {"video": 0.03, "rans": 0.01}


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


def codec_names() -> list[str]:
    from vc_quant.codec.video.backends import available_backends

    return sorted([*available_backends(), RANS])


def family_of(codec: str) -> str:
    """``"rans"`` or ``"video"``; raises VcConfigError for an unknown codec name."""
    if codec == RANS:
        return "rans"
    from vc_quant.codec.video.backends import backend_class

    if not isinstance(codec, str):
        raise VcConfigError(f"codec={codec!r}: expected a codec name, one of {codec_names()}")
    try:
        backend_class(codec)
    except VcConfigError:
        raise VcConfigError(f"codec={codec!r} is not a known codec; choose one of {codec_names()}") from None
    return "video"


@dataclass(frozen=True)
class CodecOptions:
    """Options of :func:`encode_tensor` (``None``: the chosen codec's measured default; docs/codec.md)."""

    # rANS: lower error at every rate and ~60x faster than the video codecs on both development
    # models (scripts/rd_sweep.py, scripts/bench_codec.py; docs/results.md)
    codec: str = "rans"
    rotation: bool = True
    seed: int = 0
    scale: str = "tensor"  # "tensor": one step/map per tensor (MSE-optimal); "row": one per row
    threads: int = 0
    tolerance: float | None = None  # allowed |achieved - target| all-in bits per value (TOLERANCE)
    # "search": the rate control finds the step; "predict": one encode at the model-predicted step
    # shifted by ``step_offset`` (callers that encode many similar tensors — KV-cache blocks,
    # gradients — learn the offset from earlier rates)
    rate_control: str = "search"
    step_offset: float = 0.0
    # --- video family ---
    preset: str | None = None  # x265: "superfast" (same MSE as medium at ~1.5x the speed)
    tile: int | None = None  # largest frame side (2048)
    chroma_qp_match: bool | None = None
    # extra encoder parameters, "key=value:key=value", from the backend's allowlist;
    # None: the backend's measured default (HEVC: rdoq-level=2, see HevcBackend)
    encoder_params: str | None = None
    qp: int | None = None  # fixed QP (amplitude 1): bypasses rate control
    # --- rANS family ---
    quantizer: str | None = None  # "dq" (trellis, default) or "scalar"

    def __post_init__(self) -> None:
        family = family_of(self.codec)
        others = RANS_ONLY if family == "video" else VIDEO_ONLY
        for name in others:
            if getattr(self, name) is not None:
                raise VcConfigError(
                    f"{name}={getattr(self, name)!r} is an option of the "
                    f"{'rANS' if family == 'video' else 'video'} codecs, not of codec={self.codec!r}"
                )
        _check_type("rotation", self.rotation, bool, "True or False")
        _check_type("seed", self.seed, int, "an integer")
        if not 0 <= self.seed < 2**63:
            raise VcConfigError(f"seed={self.seed!r}: expected an integer in [0, 2**63)")
        if self.scale not in ("tensor", "row"):
            raise VcConfigError(f"scale={self.scale!r}: expected 'tensor' or 'row'")
        _check_type("threads", self.threads, int, "an integer >= 0 (0 = all cores)")
        if self.threads < 0:
            raise VcConfigError(f"threads={self.threads!r}: expected >= 0 (0 = all cores)")
        if self.tolerance is not None:
            _check_type("tolerance", self.tolerance, int | float, "a number")
            if not 0 < self.tolerance < 1:
                raise VcConfigError(f"tolerance={self.tolerance!r}: expected a value in (0, 1) bits per value")
        if self.rate_control not in ("search", "predict"):
            raise VcConfigError(f"rate_control={self.rate_control!r}: expected 'search' or 'predict'")
        _check_type("step_offset", self.step_offset, int | float, "a number")
        if family == "video":
            self._check_video()
        elif self.quantizer is not None and self.quantizer not in RANS_QUANTIZERS:
            raise VcConfigError(f"quantizer={self.quantizer!r}: expected one of {RANS_QUANTIZERS}")

    def _check_video(self) -> None:
        from vc_quant.codec.video import frames as fr
        from vc_quant.codec.video.backends import backend_class

        backend = backend_class(self.codec)
        if self.preset is not None:
            _check_type("preset", self.preset, str, "a preset name")
            backend.check_preset(self.preset)
        if self.chroma_qp_match is not None:
            _check_type("chroma_qp_match", self.chroma_qp_match, bool, "True or False")
        if self.tile is not None:
            _check_type("tile", self.tile, int, f"an integer multiple of {fr.ALIGN}")
            fr.plan_layout(1, 1, self.tile)  # validates the range
        if self.encoder_params is not None:
            _check_type("encoder_params", self.encoder_params, str, "'key=value:key=value' or None")
            backend.check_params(self.encoder_params)
        if self.qp is not None:
            _check_type("qp", self.qp, int, "an integer or None")
            if not backend.qp_min <= self.qp <= backend.qp_max:
                raise VcConfigError(f"qp={self.qp}: outside [{backend.qp_min}, {backend.qp_max}] for {self.codec}")

    @property
    def family(self) -> str:
        return family_of(self.codec)

    def value(self, name: str) -> object:
        """Option ``name`` with ``None`` resolved to the chosen codec's default."""
        v = getattr(self, name)
        if v is not None:
            return v
        if name == "tolerance":
            return TOLERANCE[self.family]
        return {**VIDEO_ONLY, **RANS_ONLY}.get(name)

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


def merge_defaults(options: dict, defaults: dict[str, dict], default_codec: str) -> dict:
    """``options`` over the caller's defaults for the codec they choose (``default_codec`` if none).

    Callers with their own per-codec defaults (KV cache, tensors in flight) use it so that
    choosing a codec drops the defaults of the others (an AV1 preset never reaches rANS).
    """
    codec = options.get("codec", default_codec)
    return {"codec": codec, **defaults.get(codec, {}), **options}


def max_rate(opts: CodecOptions) -> float:
    """The highest all-in rate one tensor reaches with ``opts`` (the rANS quantizers' int8 reconstruction
    integers saturate below 8 bits; the video codecs reach the top of :data:`BITS_RANGE`)."""
    if opts.family == "rans":
        from vc_quant.codec.rans.quantizer import MAX_RATE

        return MAX_RATE[opts.value("quantizer")]
    return BITS_RANGE[1]
