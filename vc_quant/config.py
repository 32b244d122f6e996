"""VcQuantizationConfig: what users pass to ``from_pretrained(quantization_config=...)``."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from vc_quant.codec.tensor_codec import FORMAT_VERSION, CodecOptions
from vc_quant.errors import VcConfigError
from vc_quant.format import QUANT_METHOD

#: module names never quantized unless a user override names them explicitly
DEFAULT_MODULES_TO_NOT_CONVERT = ["lm_head", "embed_tokens", "wte", "wpe", "embed_positions"]
_CODEC_FIELDS = ("codec", "preset", "rotation", "seed", "scale", "tile", "encoder_params")
_DECODE_BACKENDS = ("auto", "cpu", "nvdec")
_ALLOCATIONS = ("uniform", "fisher")


class VcQuantizationConfig(QuantizationConfigMixin):
    """Video-codec quantization of the linear layers of a transformers model.

    Args:
        bits: target all-in bits per weight (bitstream + scales + metadata), fractional,
            in [1, 8]; the average over all quantized weights lands on it.
        codec, preset, rotation, seed, scale, tile, encoder_params: tensor-codec options
            (see :class:`vc_quant.CodecOptions`; defaults are the measured best).
            ``codec``: ``"hevc"`` (default; NVDEC-decoded on load), ``"av1"`` (SVT-AV1
            → dav1d: lower error per bit and faster encodes, decoded on the CPU) or
            ``"h264"``. ``encoder_params`` passes extra encoder parameters; ``None``
            (default) means the codec's measured default: for HEVC ``"rdoq-level=2"``
            (rate-distortion-optimised quantisation, 97.6 → 80.2 perplexity at 2.5 bpw
            on SmolLM2 for ~1.6x the quantize time; ``""`` turns it off).
        modules_to_not_convert: extra module names (or name fragments) kept in full
            precision. They are **merged** with the defaults (``lm_head``, embeddings,
            tied weights), never replace them.
        overrides: ``{name_or_regex: bits}``; the first key that equals a module name
            or ``re.fullmatch``-es it sets that module's bits (``0`` = keep in full
            precision).
        min_numel: weights with fewer values stay in full precision.
        allocation: ``"fisher"`` (default; equal-slope
            allocation under the same average, weighted by the model's own Fisher
            information on self-generated text; calibration-free; see
            :mod:`vc_quant.allocation`; measured 10x lower perplexity than uniform at 2.5
            bits on SmolLM2-135M) or ``"uniform"`` (every tensor at ``bits``). Tensors
            named in ``overrides`` keep their bits.
        calibration: optional path of a UTF-8 text file: the Fisher allocation then
            uses 8 windows × 128 tokens of it (the model's tokenizer) instead of text
            the model generates itself. Never required (see README for its measured effect).
        decode_backend: ``"auto"`` (NVDEC on a CUDA device when available, else FFmpeg
            on the CPU), ``"cpu"`` or ``"nvdec"`` (fail if unavailable).
    """

    def __init__(
        self,
        bits: float = 2.5,
        codec: str = "hevc",
        preset: str = "superfast",
        rotation: bool = True,
        seed: int = 0,
        scale: str = "tensor",
        tile: int = 2048,
        encoder_params: str | None = None,
        modules_to_not_convert: list[str] | None = None,
        overrides: dict[str, float] | None = None,
        min_numel: int = 0,
        decode_backend: str = "auto",
        allocation: str = "fisher",
        calibration: str | None = None,
        format_version: int = FORMAT_VERSION,
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
        self.modules_to_not_convert = list(modules_to_not_convert or [])
        self.overrides = dict(overrides or {})
        self.min_numel = min_numel
        self.decode_backend = decode_backend
        self.allocation = allocation
        self.calibration = calibration
        self.format_version = format_version
        unknown = sorted(k for k in kwargs if k not in ("quant_method",))
        if unknown:
            raise VcConfigError(f"VcQuantizationConfig: unknown field(s) {unknown}")
        self.post_init()

    def post_init(self) -> None:
        """Validate every field; raise VcConfigError (a ValueError) naming the bad one."""
        if isinstance(self.bits, bool) or not isinstance(self.bits, int | float) or not 1.0 <= self.bits <= 8.0:
            raise VcConfigError(f"bits={self.bits!r}: expected a number of bits per weight in [1, 8]")
        if self.format_version != FORMAT_VERSION:
            raise VcConfigError(
                f"format_version={self.format_version!r}: this vc_quant reads format {FORMAT_VERSION}; upgrade vc_quant"
            )
        if self.decode_backend not in _DECODE_BACKENDS:
            raise VcConfigError(f"decode_backend={self.decode_backend!r}: expected one of {_DECODE_BACKENDS}")
        if self.allocation not in _ALLOCATIONS:
            raise VcConfigError(f"allocation={self.allocation!r}: expected one of {_ALLOCATIONS}")
        if self.calibration is not None and (not isinstance(self.calibration, str) or self.allocation != "fisher"):
            raise VcConfigError(
                f"calibration={self.calibration!r}: expected the path of a text file, used with allocation='fisher'"
            )
        if not isinstance(self.min_numel, int) or self.min_numel < 0:
            raise VcConfigError(f"min_numel={self.min_numel!r}: expected an integer >= 0")
        if not isinstance(self.modules_to_not_convert, list) or not all(
            isinstance(m, str) for m in self.modules_to_not_convert
        ):
            raise VcConfigError("modules_to_not_convert: expected a list of module names")
        for pattern, bits in self.overrides.items():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise VcConfigError(f"overrides: {pattern!r} is not a valid regex ({exc})") from exc
            if isinstance(bits, bool) or not isinstance(bits, int | float) or not (bits == 0 or 1.0 <= bits <= 8.0):
                raise VcConfigError(f"overrides[{pattern!r}]={bits!r}: expected 0 (skip) or bits in [1, 8]")
        try:
            self.codec_options()
        except VcConfigError as exc:
            raise VcConfigError(f"VcQuantizationConfig: {exc}") from exc
        from vc_quant.codec.backends import available_backends

        if self.codec not in available_backends():
            raise VcConfigError(f"codec={self.codec!r}: expected one of {available_backends()}")

    def get_loading_attributes(self) -> dict[str, Any]:
        """Fields a config passed to ``from_pretrained`` of a compressed checkpoint may change."""
        return {"decode_backend": self.decode_backend}

    def codec_kwargs(self) -> dict[str, Any]:
        """The tensor-codec options of this config, as ``encode_tensor`` keyword arguments."""
        return {f: getattr(self, f) for f in _CODEC_FIELDS}

    def codec_options(self) -> CodecOptions:
        return CodecOptions(**self.codec_kwargs())

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
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise VcConfigError(f"{path}: expected a mapping of config fields")
        data.pop("description", None)
        data.update({k: v for k, v in changes.items() if v is not None})
        return cls(**data)
