"""On-disk layout of a vc_quant checkpoint (this list of names *is* the spec).

A quantized parameter ``<module>.weight`` is stored as four safetensors entries:

| name | dtype | content |
|---|---|---|
| ``<module>.weight`` | uint8 (1-D) | the frames' HEVC access units, back to back |
| ``<module>.weight_vc_center`` | float32/float16 | centre of the affine pixel map |
| ``<module>.weight_vc_step`` | float32/float16 | step of the affine pixel map |
| ``<module>.weight_vc_meta`` | uint8 (1-D) | UTF-8 JSON: shape, dtype, frame layout, frame sizes, QP, CRC32 |

The bitstream deliberately keeps the parameter's own name: a transformers that does
not know vc_quant then fails loudly on the shape mismatch instead of silently
initialising random weights. ``config.json`` carries ``quantization_config`` with
``quant_method: "vc"`` and ``format_version``.
"""

from __future__ import annotations

import torch

from vc_quant.codec.tensor_codec import FORMAT_VERSION, EncodedTensor

QUANT_METHOD = "vc"
COMPANIONS = {"center": "_vc_center", "step": "_vc_step", "meta": "_vc_meta"}
META_SUFFIX = COMPANIONS["meta"]

__all__ = ["COMPANIONS", "FORMAT_VERSION", "META_SUFFIX", "QUANT_METHOD", "from_state_dict", "to_state_dict"]


def to_state_dict(key: str, enc: EncodedTensor) -> dict[str, torch.Tensor]:
    """Entries written for the parameter ``key`` (e.g. ``model.layers.0.mlp.up_proj.weight``)."""
    record = enc.to_dict()
    out = {key: record["bitstream"]}
    out.update({key + suffix: record[field] for field, suffix in COMPANIONS.items()})
    return out


def from_state_dict(key: str, tensors: dict[str, torch.Tensor], verify: bool = True) -> EncodedTensor:
    """Rebuild and verify the record of ``key`` from its stored entries (raises on corruption).

    ``verify=False`` leaves the checksum to the caller (the loader runs it in its
    decode workers, off the loading thread)."""
    record = {"bitstream": tensors[key]}
    record.update({field: tensors[key + suffix] for field, suffix in COMPANIONS.items() if key + suffix in tensors})
    return EncodedTensor.from_dict(record, name=key, verify=verify)


def is_quantized_key(key: str, keys: set[str] | dict) -> bool:
    return key + META_SUFFIX in keys
