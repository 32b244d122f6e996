"""VcQuantizationConfig: what users pass to ``from_pretrained(quantization_config=...)``.

Configs are untrusted input (they come from ``config.json`` and preset files): every
field is type-checked here, before any weight is loaded, and codec options are
checked by :class:`~vc_quant.codec.CodecOptions` (encoder parameters are an
allowlist). Codec defaults are :class:`CodecOptions`'s, the bits range is
:data:`~vc_quant.codec.BITS_RANGE`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from vc_quant.codec.decode import DECODE_BACKENDS
from vc_quant.codec.options import CodecOptions, check_bits, max_rate
from vc_quant.codec.record import FORMAT_VERSION
from vc_quant.errors import VcConfigError
from vc_quant.format import QUANT_METHOD
from vc_quant.nn.linear import check_resident

#: module names never quantized unless a user override names them explicitly
DEFAULT_MODULES_TO_NOT_CONVERT = ["lm_head", "embed_tokens", "wte", "wpe", "embed_positions"]
_CODEC_FIELDS = ("codec", "preset", "rotation", "seed", "scale", "tile", "encoder_params", "quantizer")
ALLOCATIONS = ("uniform", "fisher")
SCALINGS = ("none", "fisher")
_D = CodecOptions.default


class VcQuantizationConfig(QuantizationConfigMixin):
    """Quantization of the linear layers of a transformers model with a tensor codec.

    Args:
        bits: target all-in bits per weight (bitstream + scales + metadata), fractional,
            in :data:`~vc_quant.codec.BITS_RANGE`; the average over all quantized weights lands on it.
        codec, rotation, seed, scale: tensor-codec options of both families (see
            :class:`vc_quant.CodecOptions`; defaults are the measured best).
            ``codec``: ``"rans"`` (default), the dedicated tensor codec (trellis quantization and
            interleaved rANS; decoded natively on the CPU, by Triton on GPUs once verified there),
            or a video codec — ``"hevc"`` (NVDEC-decoded on load), ``"av1"``, ``"h264"``.
        preset, tile, encoder_params: video codecs only (``None``: the codec's measured default;
            ``encoder_params`` is an allowlist, HEVC's default ``"rdoq-level=2"``).
        quantizer: ``codec="rans"`` only: ``"dq"`` (trellis-coded, default) or ``"scalar"``.
        modules_to_not_convert: extra module names (or name fragments) kept in full
            precision. They are **merged** with the defaults (``lm_head``, embeddings,
            tied weights), never replace them.
        overrides: ``{name_or_regex: bits}``; the first key that equals a module name
            or ``re.fullmatch``-es it sets that module's bits (``0`` = keep in full precision).
        min_numel: weights with fewer values stay in full precision.
        allocation: ``"fisher"`` (default; equal-slope allocation under the same average,
            weighted by the model's own Fisher information on self-generated text;
            calibration-free) or ``"uniform"`` (every tensor at ``bits``).
        scaling: ``"fisher"`` (default) scales each weight's input columns by their Fisher
            importance before the codec and back after (16 bits per column; calibration-free;
            measured 2x lower perplexity at 2.5 bpw on SmolLM2) or ``"none"``.
        calibration: optional path of a UTF-8 text file for the Fisher pass instead of
            self-generated text. Never required.
        resident: how quantized weights live in memory after loading: ``"int8"`` (the
            decoded 8-bit samples, 1 byte per weight, the rotation applied to the
            activations), ``"dense"`` (decoded float weights; fastest) or ``"bitstream"``
            (only the compressed bytes; decoded just in time, ``prefetch`` layers ahead).
            A loading attribute: it may be changed when loading a saved checkpoint.
        prefetch: bitstream mode: linear layers decoded ahead of the one running.
        decode_backend: ``"auto"`` (on a CUDA device NVDEC for video codecs when available;
            rANS decodes on the CPU until the Triton decoder has been verified on a GPU, see
            ``TRITON_VERIFIED``), ``"cpu"``, ``"nvdec"`` or ``"triton"`` (fail if unavailable).
            A loading attribute.
    """

    def __init__(
        self,
        bits: float = 2.5,
        codec: str = _D("codec"),
        preset: str | None = _D("preset"),
        rotation: bool = _D("rotation"),
        seed: int = _D("seed"),
        scale: str = _D("scale"),
        tile: int | None = _D("tile"),
        encoder_params: str | None = _D("encoder_params"),
        quantizer: str | None = _D("quantizer"),
        modules_to_not_convert: list[str] | None = None,
        overrides: dict[str, float] | None = None,
        min_numel: int = 0,
        decode_backend: str = "auto",
        allocation: str = "fisher",
        scaling: str = "fisher",
        calibration: str | None = None,
        resident: str = "int8",
        prefetch: int = 7,
        format_version: int = FORMAT_VERSION,
        save_id: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        self.bits = bits
        self.codec = codec
        self.preset = preset
        self.rotation = rotation
        self.seed = seed
        self.scale = scale
        self.tile = tile
        self.encoder_params = encoder_params
        self.quantizer = quantizer
        self.modules_to_not_convert = [] if modules_to_not_convert is None else modules_to_not_convert
        self.overrides = {} if overrides is None else overrides
        self.min_numel = min_numel
        self.decode_backend = decode_backend
        self.allocation = allocation
        self.scaling = scaling
        self.calibration = calibration
        self.resident = resident
        self.prefetch = prefetch
        self.format_version = format_version
        self.save_id = save_id
        unknown = sorted(k for k in kwargs if k != "quant_method")
        if unknown:
            raise VcConfigError(f"VcQuantizationConfig: unknown field(s) {unknown}")
        if kwargs.get("quant_method", QUANT_METHOD) != QUANT_METHOD:
            raise VcConfigError(f"quant_method={kwargs['quant_method']!r}: a VcQuantizationConfig is {QUANT_METHOD!r}")
        self.post_init()

    def post_init(self) -> None:
        """Validate every field; raise VcConfigError (a ValueError) naming the bad one."""
        check_bits(self.bits)
        if isinstance(self.format_version, bool) or self.format_version not in (1, FORMAT_VERSION):
            raise VcConfigError(
                f"format_version={self.format_version!r}: this vc_quant reads formats 1..{FORMAT_VERSION}; "
                "upgrade vc_quant"
            )
        if self.decode_backend not in DECODE_BACKENDS:
            raise VcConfigError(f"decode_backend={self.decode_backend!r}: expected one of {DECODE_BACKENDS}")
        if self.allocation not in ALLOCATIONS:
            raise VcConfigError(f"allocation={self.allocation!r}: expected one of {ALLOCATIONS}")
        if self.scaling not in SCALINGS:
            raise VcConfigError(f"scaling={self.scaling!r}: expected one of {SCALINGS}")
        check_resident(self.resident)
        if isinstance(self.prefetch, bool) or not isinstance(self.prefetch, int) or not 0 <= self.prefetch <= 1024:
            raise VcConfigError(f"prefetch={self.prefetch!r}: expected an integer in [0, 1024]")
        if self.calibration is not None and (not isinstance(self.calibration, str) or not self.uses_fisher()):
            raise VcConfigError(
                f"calibration={self.calibration!r}: expected the path of a text file, used by the Fisher pass "
                "(allocation='fisher' or scaling='fisher')"
            )
        if isinstance(self.min_numel, bool) or not isinstance(self.min_numel, int) or self.min_numel < 0:
            raise VcConfigError(f"min_numel={self.min_numel!r}: expected an integer >= 0")
        if not isinstance(self.modules_to_not_convert, list) or not all(
            isinstance(m, str) and m for m in self.modules_to_not_convert
        ):
            hint = f" (a string: write [{self.modules_to_not_convert!r}])" if isinstance(
                self.modules_to_not_convert, str) else ""  # fmt: skip
            raise VcConfigError(
                f"modules_to_not_convert={self.modules_to_not_convert!r}: expected a list of module names{hint}"
            )
        if not isinstance(self.overrides, dict):
            raise VcConfigError(f"overrides={self.overrides!r}: expected a dict {{module name or regex: bits}}")
        for pattern, bits in self.overrides.items():
            if not isinstance(pattern, str):
                raise VcConfigError(f"overrides: key {pattern!r} is not a module name or regex")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise VcConfigError(f"overrides: {pattern!r} is not a valid regex ({exc})") from exc
            if bits != 0 or isinstance(bits, bool):
                check_bits(bits, f"overrides[{pattern!r}]")
        valid_id = isinstance(self.save_id, str) and re.fullmatch(r"[0-9a-f]{32}", self.save_id)
        if self.save_id is not None and not valid_id:
            raise VcConfigError(f"save_id={self.save_id!r}: expected 32 hex digits (written by save_pretrained)")
        try:
            self.codec_options()
        except VcConfigError as exc:
            raise VcConfigError(f"VcQuantizationConfig: {exc}") from exc
        # decode_backend is a loading attribute: whether it decodes the codec is checked against the
        # checkpoint's records when they are decoded (codec.decode.choose_backend), not against this
        # config's codec, which a loading config does not set

    def uses_fisher(self) -> bool:
        """Whether quantizing runs the Fisher pass (for the allocation or the column scales)."""
        return self.allocation == "fisher" or self.scaling == "fisher"

    def check_calibration_file(self) -> None:
        """Quantize-on-load only: the calibration file must exist before any weight is loaded."""
        if self.calibration is not None and not Path(self.calibration).is_file():
            raise VcConfigError(f"calibration={self.calibration!r}: no such file")

    def get_loading_attributes(self) -> dict[str, Any]:
        """Fields a config passed to ``from_pretrained`` of a compressed checkpoint may change."""
        return {"decode_backend": self.decode_backend, "resident": self.resident, "prefetch": self.prefetch}

    def codec_kwargs(self) -> dict[str, Any]:
        """The tensor-codec options of this config, as ``encode_tensor`` keyword arguments."""
        return {f: getattr(self, f) for f in _CODEC_FIELDS}

    def codec_options(self) -> CodecOptions:
        return CodecOptions(**self.codec_kwargs())

    def max_rate(self) -> float:
        """The highest rate per tensor the codec reaches (the bit allocation plans below it)."""
        return max_rate(self.codec_options())

    def override_for(self, module_name: str) -> float | None:
        """Bits of the first override matching ``module_name``, or None."""
        for pattern, bits in self.overrides.items():
            if pattern == module_name or re.fullmatch(pattern, module_name):
                return float(bits)
        return None

    def bits_for(self, module_name: str) -> float:
        """Bits for one module: the first matching override, else ``bits``."""
        override = self.override_for(module_name)
        return float(self.bits) if override is None else override

    def skip_list(self) -> list[str]:
        """Defaults merged with the user's ``modules_to_not_convert``."""
        return sorted(set(DEFAULT_MODULES_TO_NOT_CONVERT) | set(self.modules_to_not_convert))

    @classmethod
    def from_file(cls, path: str | Path, **changes: Any) -> VcQuantizationConfig:
        """Load a preset (``configs/*.json`` or ``.yaml``); ``changes`` override its fields."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise VcConfigError(f"preset {path}: cannot be read ({exc})") from exc
        import yaml

        try:
            data = (yaml.safe_load(text) or {}) if path.suffix in (".yaml", ".yml") else json.loads(text)
        except (ValueError, RecursionError, yaml.YAMLError) as exc:
            raise VcConfigError(f"preset {path}: not valid {path.suffix.lstrip('.') or 'JSON'} ({exc})") from exc
        if not isinstance(data, dict):
            raise VcConfigError(f"{path}: expected a mapping of config fields")
        data.pop("description", None)
        data.update({k: v for k, v in changes.items() if v is not None})
        return cls(**data)
