"""On-disk layout of a vc_quant checkpoint (this list of names *is* the spec).

A quantized parameter ``<module>.weight`` is stored as four safetensors entries:

| name | dtype | content |
|---|---|---|
| ``<module>.weight`` | uint8 (1-D) | the frames' access units, back to back |
| ``<module>.weight_vc_center`` | float32/float16 | centre of the affine pixel map |
| ``<module>.weight_vc_step`` | float32/float16 | step of the affine pixel map |
| ``<module>.weight_vc_meta`` | uint8 (1-D) | UTF-8 JSON: name, shape, dtype, layout + tile, frame sizes, QP, CRC32 |
| ``<module>.weight_vc_colscale`` | float16 (in,) | optional: input-column scales applied before encoding |

Every other tensor is stored plainly. Every shard's safetensors metadata carries:

| key | content |
|---|---|
| ``vc_quant_format`` | the record format version |
| ``vc_save_id`` | drawn for each save, also in ``config.json`` (``quantization_config.save_id``): shards of |
| | different saves are never loaded together |
| ``vc_plain_crc32`` | JSON ``{name: crc32}`` of every plain (unquantized) tensor of the checkpoint |

The bitstream deliberately keeps the parameter's own name: a transformers that does
not know vc_quant then fails loudly on the shape mismatch instead of silently
initialising random weights. ``config.json`` carries ``quantization_config`` with
``quant_method: "vc"`` and ``format_version``.
"""

from __future__ import annotations

import json
import uuid
import zlib

import torch

from vc_quant.codec.record import FORMAT_VERSION, EncodedTensor

QUANT_METHOD = "vc"
COMPANIONS = {"center": "_vc_center", "step": "_vc_step", "meta": "_vc_meta", "col_scale": "_vc_colscale"}
REQUIRED_COMPANIONS = ("center", "step", "meta")
META_SUFFIX = COMPANIONS["meta"]
KEY_FORMAT, KEY_SAVE_ID, KEY_PLAIN_CRC = "vc_quant_format", "vc_save_id", "vc_plain_crc32"

__all__ = ["COMPANIONS", "FORMAT_VERSION", "META_SUFFIX", "QUANT_METHOD", "from_state_dict", "to_state_dict"]


def to_state_dict(key: str, enc: EncodedTensor) -> dict[str, torch.Tensor]:
    """Entries written for the parameter ``key`` (e.g. ``model.layers.0.mlp.up_proj.weight``)."""
    record = enc.to_dict()
    out = {key: record["bitstream"]}
    out.update({key + suffix: record[field] for field, suffix in COMPANIONS.items() if field in record})
    return out


def from_state_dict(key: str, tensors: dict[str, torch.Tensor], verify: bool = True) -> EncodedTensor:
    """Rebuild (and by default verify) the record of ``key`` from its stored entries."""
    record = {"bitstream": tensors[key]}
    record.update({field: tensors[key + suffix] for field, suffix in COMPANIONS.items() if key + suffix in tensors})
    enc = EncodedTensor.from_dict(record, name=key, verify=False)
    if verify:
        enc.verify(key, expect_name=key)
    return enc


def is_companion(key: str) -> bool:
    return any(key.endswith(s) for s in COMPANIONS.values())


def is_quantized_key(key: str, keys: set[str] | dict) -> bool:
    return key + META_SUFFIX in keys


def tensor_crc32(t: torch.Tensor) -> int:
    """CRC32 of a tensor's bytes (no copy for contiguous CPU tensors)."""
    return zlib.crc32(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def new_save_id() -> str:
    return uuid.uuid4().hex


def shard_metadata(save_id: str, plain_crc: dict[str, int]) -> dict[str, str]:
    """The safetensors metadata every shard of one save carries."""
    return {KEY_FORMAT: str(FORMAT_VERSION), KEY_SAVE_ID: save_id, KEY_PLAIN_CRC: json.dumps(plain_crc)}
