"""Split a Llama-style transformers causal LM into pipeline stages by decoder layers.

For models laid out as ``model.model.{embed_tokens, layers, norm}`` + ``model.lm_head``
(Llama, Mistral, Qwen2, SmolLM2, …). Each process holds the stage it runs: the first
stage embeds tokens, the last applies the final norm and the head; in between, hidden
states cross the boundary (compressed by :class:`~vc_quant.distributed.StageBoundary`).
The stage's own layers are renumbered from 0 (their attention ``layer_idx`` and the
config's layer count), so an ordinary ``DynamicCache`` serves each stage for
token-by-token decoding.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from vc_quant.errors import VcConfigError
from vc_quant.kv_cache import cache_kwargs


def split_points(num_layers: int, num_stages: int) -> list[int]:
    """Layer index where each stage starts (equal shares, earlier stages one more when uneven)."""
    base, extra = divmod(num_layers, num_stages)
    starts, start = [], 0
    for stage in range(num_stages):
        starts.append(start)
        start += base + (1 if stage < extra else 0)
    return [*starts, num_layers]


class DecoderStage(nn.Module):
    """Stage ``stage`` of ``num_stages`` of ``model`` (modified in place: keep one stage per process)."""

    def __init__(self, model, stage: int, num_stages: int = 2) -> None:
        super().__init__()
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "layers") or not hasattr(model, "lm_head"):
            raise VcConfigError("DecoderStage: expected a Llama-style model (model.model.layers, model.lm_head)")
        if not 0 <= stage < num_stages <= len(inner.layers):
            raise VcConfigError(f"DecoderStage: stage {stage} of {num_stages} for {len(inner.layers)} layers")
        bounds = split_points(len(inner.layers), num_stages)
        lo, hi = bounds[stage], bounds[stage + 1]
        self.first, self.last = stage == 0, stage == num_stages - 1
        inner.config = copy.deepcopy(inner.config)
        inner.config.num_hidden_layers = hi - lo
        if getattr(inner.config, "layer_types", None):
            inner.config.layer_types = inner.config.layer_types[lo:hi]
        inner.layers = nn.ModuleList(list(inner.layers)[lo:hi])
        for local, layer in enumerate(inner.layers):
            attn = getattr(layer, "self_attn", None)
            if attn is not None and hasattr(attn, "layer_idx"):
                attn.layer_idx = local
        if not self.last:
            inner.norm = nn.Identity()
        self.model = model
        self.layers = (lo, hi)

    @property
    def config(self):
        return self.model.model.config

    def forward(self, inputs: torch.Tensor, position_ids: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """Token ids (first stage) or hidden states (later stages) → hidden states, or logits on the last stage."""
        kwargs = {"position_ids": position_ids, **cache_kwargs(self.model.model, cache), "use_cache": cache is not None}
        if self.first:
            hidden = self.model.model(input_ids=inputs, **kwargs).last_hidden_state
        else:
            hidden = self.model.model(inputs_embeds=inputs, **kwargs).last_hidden_state
        return self.model.lm_head(hidden) if self.last else hidden
