"""Saving a vc model: atomic saves, the model card, re-encode options and honest memory accounting."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from vc_quant.codec.options import RANS_ONLY, VIDEO_ONLY
from vc_quant.codec.record import EncodedTensor
from vc_quant.config import VcQuantizationConfig
from vc_quant.errors import VcQuantError

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
_CARD_MARK = "<!-- written by vc_quant -->"


def reencode_options(config: VcQuantizationConfig, old: EncodedTensor | None, module) -> tuple[float, dict[str, Any]]:
    """Bits and codec options (column scales included) to re-encode a changed weight like its stored record."""
    options = config.codec_kwargs()
    if old is None:
        return float(config.bits), options
    meta = old.meta
    # the record's codec decides the options; the config's options of the other family are dropped
    drop = VIDEO_ONLY if meta["codec"] == "rans" else RANS_ONLY
    options = {k: v for k, v in options.items() if k not in drop}
    options["col_scale"] = old.col_scale
    options.update(codec=meta["codec"], scale=meta["scale"], rotation=meta["rotation_seed"] is not None)
    if meta["rotation_seed"] is not None:
        options["seed"] = meta["rotation_seed"]
    if isinstance(meta.get("tile"), int):
        options["tile"] = meta["tile"]
    if isinstance(meta.get("quantizer"), str):
        options["quantizer"] = meta["quantizer"]
    bits = meta.get("bits") or old.bits_per_value
    return float(bits), options


def memory_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes a loaded model holds: parameters + buffers, records kept for saving, decoded windows."""
    from vc_quant.hf.quantizer import vc_linears

    tensors = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    held = sum(m.held_bytes() for _, m in vc_linears(model))
    window = getattr(model, "vc_bitstream_window", None)
    decoded = window.held_bytes() if window is not None else 0
    return {"tensors": tensors, "records": held, "window": decoded, "total": tensors + held + decoded}


def install_model_hooks(model) -> None:
    """Make ``get_memory_footprint`` count what vc_quant holds, and ``save_pretrained`` write a model card.

    Instance attributes, not a subclass: the model keeps its own class (``isinstance``,
    pickling and transformers' own checks are unaffected).
    """
    footprint, save = type(model).get_memory_footprint, type(model).save_pretrained

    def get_memory_footprint(return_buffers: bool = True) -> int:
        counts = memory_bytes(model)
        return footprint(model, return_buffers=return_buffers) + counts["records"] + counts["window"]

    def save_pretrained(save_directory, *args, **kwargs):
        out = save(model, save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_model_card(model, Path(save_directory))
        return out

    model.get_memory_footprint = get_memory_footprint
    model.save_pretrained = save_pretrained


def uninstall_model_hooks(model) -> None:
    """Back to the class's own methods (after ``dequantize()``)."""
    for name in ("get_memory_footprint", "save_pretrained"):
        model.__dict__.pop(name, None)


def write_model_card(model, folder: Path) -> None:
    """A README.md saying what was compressed and how to load it (a card of the user's is kept)."""
    card = folder / CARD_NAME
    if card.exists() and _CARD_MARK not in card.read_text(encoding="utf-8", errors="replace"):
        return
    report = getattr(model, "vc_quant_report", None)
    config = model.config.quantization_config
    rate = f"{report.bits_per_weight:.3f}" if report is not None else f"~{config.bits}"
    tensors = f"{report.tensors} linear weights ({report.values / 1e6:.1f} M values)" if report else "linear weights"
    text = f"""{_CARD_MARK}
---
library_name: transformers
tags: [vc_quant, quantized]
---
# {Path(str(getattr(model.config, "name_or_path", "") or folder.name)).name} — vc_quant {rate} bits per weight

{tensors} stored as {_codec_words(config.codec)} at {rate} bits per weight
(all overhead counted; `allocation={config.allocation!r}`, rotation {"on" if config.rotation else "off"}).
Embeddings, the output head and norms are stored in full precision.

Load it where `vc_quant` is installed (`pip install vc_quant`):

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("{folder.name}")  # weights stay compressed in memory (int8)
```

Residency and decoding can be chosen at load time, e.g.
`quantization_config=vc_quant.VcQuantizationConfig(resident="bitstream")`. `vc-quant verify {folder.name}`
checks every tensor of this checkpoint.
"""
    tmp = card.with_name(card.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(card)


def _codec_words(codec: str) -> str:
    if codec == "rans":
        return "**rANS** tensor bitstreams (trellis-coded quantization, interleaved rANS)"
    return f"intra-coded **{codec.upper()}** video bitstreams"


def save_atomic(model, path: str | Path, tokenizer=None, **save_kwargs) -> Path:
    """``model.save_pretrained`` that never leaves a half-written checkpoint at ``path``.

    Writes to ``PATH.partial``, then swaps it in: an existing ``path`` is renamed to
    ``PATH.old`` for the moment of the swap and removed after. A crash leaves either the
    old checkpoint at ``path`` or the new one (and, at worst, ``PATH.old`` to delete by hand).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise VcQuantError(f"{path}: exists and is not a folder")
    partial, old = path.with_name(path.name + ".partial"), path.with_name(path.name + ".old")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, **save_kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(partial)
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    partial.rename(path)
    shutil.rmtree(old, ignore_errors=True)
    return path
