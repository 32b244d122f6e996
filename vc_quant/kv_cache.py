"""VcQuantizedCache: a transformers KV cache whose old tokens live as H.265 bitstreams.

Each layer keeps the most recent tokens in full precision (the residual window)
and compresses older tokens in blocks of ``block_tokens`` with the tensor codec,
once per block (never re-encoded). A block ``(batch, heads, tokens, head_dim)``
becomes the matrix ``(batch·heads·tokens, head_dim)``: rows are token vectors and
the codec's rotation runs along the channels, which spreads the outlier channels
of keys. At every step the blocks are decoded transiently for attention; no
decoded copy is kept, so the memory held is bitstreams + scales + residual
(:meth:`VcQuantizedCache.memory_bytes`).

    cache = VcQuantizedCache(model.config, bits=3.0)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=64)
"""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import BaseQuantizedLayer, Cache

from vc_quant.codec.backends import get_backend
from vc_quant.codec.frames import FrameLayout
from vc_quant.codec.tensor_codec import EncodedTensor, encode_tensor, reconstruct
from vc_quant.errors import VcConfigError

__all__ = ["VcQuantizedCache", "VcQuantizedLayer"]


class VcQuantizedLayer(BaseQuantizedLayer):
    """One layer: compressed blocks of old tokens + a full-precision residual window."""

    def __init__(self, bits: float = 3.0, residual_length: int = 128, block_tokens: int = 128, **codec) -> None:
        super().__init__()
        self.bits = bits
        self.residual_length = residual_length
        self.block_tokens = block_tokens
        # RDOQ (the weight default) doubles encode time; blocks are encoded during generation
        self.codec = {"encoder_params": "", **codec}
        self._key_blocks: list[EncodedTensor] = []
        self._value_blocks: list[EncodedTensor] = []
        self._pending_beam_idx: torch.Tensor | None = None
        # learnt per stream (keys and values differ): one encode per block, on the rate on average
        self._step_offset = {"keys": 0.0, "values": 0.0}

    # --- codec ---------------------------------------------------------------------------
    def _quantize(self, tensor: torch.Tensor, stream: str = "keys") -> EncodedTensor:
        """One encode per block at the predicted step; the miss corrects the next block's step.

        The per-(sequence, head, channel) mean over the block's tokens is removed first
        and kept in fp16 (keys carry large constant offsets on a few channels; left in,
        they would set the pixel range and waste levels).
        """
        b, h, t, d = tensor.shape
        mean = tensor.float().mean(dim=-2, keepdim=True).to(torch.float16)
        centred = tensor.float() - mean.float()
        enc = encode_tensor(
            centred.reshape(b * h * t, d), self.bits, name=f"kv {stream} block", rate_control="predict",
            step_offset=self._step_offset[stream], **self.codec,
        )  # fmt: skip
        enc.stats["channel_mean"] = mean
        # about one bit per unit of log2 step: move the step by the rate error (means counted)
        self._step_offset[stream] += 0.9 * (_block_bits(enc) - self.bits)
        enc.stats["block_shape"] = (b, h, t, d)
        return enc

    def _dequantize(self, blocks: list[EncodedTensor]) -> torch.Tensor | None:
        """Decode all blocks (one decoder for all: same frame geometry) to (b, h, tokens, d)."""
        if not blocks:
            return None
        layout = FrameLayout.from_dict(blocks[0].meta["layout"])
        backend = get_backend(blocks[0].meta["codec"])
        packets = [bytes(e.bitstream.numpy()) for e in blocks]
        frames = backend.decode(packets, layout.width, layout.height)
        parts = []
        for enc, frame in zip(blocks, frames, strict=True):
            x = reconstruct(enc, [torch.from_numpy(frame)], device=self.device, dtype=torch.float32)
            x = x.reshape(enc.stats["block_shape"]) + enc.stats["channel_mean"].to(self.device, torch.float32)
            parts.append(x.to(self.dtype))
        return torch.cat(parts, dim=-2)

    # --- cache protocol ------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        old_k, old_v = self._dequantize(self._key_blocks), self._dequantize(self._value_blocks)
        if old_k is not None:
            if self._pending_beam_idx is not None:
                idx = self._pending_beam_idx.to(old_k.device)
                old_k, old_v = old_k.index_select(0, idx), old_v.index_select(0, idx)
            keys, values = torch.cat([old_k, self.keys], dim=-2), torch.cat([old_v, self.values], dim=-2)
        else:
            keys, values = self.keys, self.values
        # move whole blocks beyond the residual window into the codec, once each
        while self.keys.shape[-2] - self.residual_length >= self.block_tokens:
            if self._pending_beam_idx is not None:
                raise VcConfigError("VcQuantizedCache: beam reordering across a block flush is not supported")
            n = self.block_tokens
            self._key_blocks.append(self._quantize(self.keys[..., :n, :].contiguous(), "keys"))
            self._value_blocks.append(self._quantize(self.values[..., :n, :].contiguous(), "values"))
            self.keys, self.values = self.keys[..., n:, :], self.values[..., n:, :]
        return keys, values

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: the residual is reordered now, compressed blocks after decoding."""
        if not self.is_initialized:
            return
        beam_idx = beam_idx.to(self.keys.device)
        self.keys = self.keys.index_select(0, beam_idx)
        self.values = self.values.index_select(0, beam_idx)
        if self._key_blocks:
            pending = self._pending_beam_idx
            self._pending_beam_idx = beam_idx.clone() if pending is None else pending.index_select(0, beam_idx)

    def reset(self) -> None:
        super().reset()
        self._key_blocks, self._value_blocks = [], []
        self._pending_beam_idx = None
        self._step_offset = {"keys": 0.0, "values": 0.0}

    def crop(self, max_length: int) -> None:
        raise VcConfigError("VcQuantizedCache does not support crop (assisted/speculative decoding)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise VcConfigError("VcQuantizedCache does not support batch_repeat_interleave (contrastive search)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise VcConfigError("VcQuantizedCache does not support batch_select_indices")

    # --- accounting ------------------------------------------------------------------------
    def compressed_tokens(self) -> int:
        return sum(e.stats["block_shape"][2] for e in self._key_blocks)

    def memory_bytes(self) -> dict[str, int]:
        compressed = sum(_block_bytes(e) for e in self._key_blocks + self._value_blocks)
        residual = 0
        if self.is_initialized:
            residual = self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()
        return {"compressed": compressed, "residual": residual}


def _block_bytes(enc: EncodedTensor) -> int:
    """Stored bytes of one block: the codec record plus its fp16 channel means."""
    mean = enc.stats["channel_mean"]
    return enc.nbytes + mean.numel() * mean.element_size()


def _block_bits(enc: EncodedTensor) -> float:
    return 8.0 * _block_bytes(enc) / enc.numel


class VcQuantizedCache(Cache):
    """KV cache compressed with the H.265 tensor codec (see module docstring).

    Args:
        config: the model's config (for the number of layers).
        bits: target all-in bits per cached element for compressed blocks (fractional).
        residual_length: most recent tokens kept in full precision.
        block_tokens: tokens per compressed block (larger: less header overhead, coarser).
        **codec: tensor-codec options (``preset``, ``rotation``, ``codec``, …).
    """

    def __init__(self, config, bits: float = 3.0, residual_length: int = 128, block_tokens: int = 128, **codec):
        if not 1.0 <= float(bits) <= 8.0:
            raise VcConfigError(f"VcQuantizedCache: bits={bits!r} outside [1, 8]")
        if residual_length < 0 or block_tokens < 1:
            raise VcConfigError(
                f"VcQuantizedCache: residual_length={residual_length!r} must be >= 0 and "
                f"block_tokens={block_tokens!r} >= 1"
            )
        text = config.get_text_config(decoder=True)
        layer_types = set(getattr(text, "layer_types", None) or ["full_attention"])
        if layer_types - {"full_attention"}:
            raise VcConfigError(f"VcQuantizedCache supports full-attention layers only, found {sorted(layer_types)}")
        layers = [VcQuantizedLayer(bits, residual_length, block_tokens, **codec) for _ in range(text.num_hidden_layers)]
        super().__init__(layers=layers)
        self.bits = bits

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held: compressed bitstreams + scales + metadata, and the residual window."""
        total = {"compressed": 0, "residual": 0}
        for layer in self.layers:
            for k, v in layer.memory_bytes().items():
                total[k] += v
        total["total"] = total["compressed"] + total["residual"]
        return total

    def compressed_bits_per_element(self) -> float:
        """All-in bits per compressed K/V element (0 before the first block)."""
        values = sum(
            math.prod(e.stats["block_shape"]) for layer in self.layers for e in layer._key_blocks + layer._value_blocks
        )
        return 8.0 * self.memory_bytes()["compressed"] / values if values else 0.0
