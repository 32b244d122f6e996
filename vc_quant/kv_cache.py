"""VcQuantizedCache: a transformers KV cache whose old tokens live as video bitstreams.

Each layer keeps the first ``sink_tokens`` tokens (the attention sinks: most of
the attention mass lands on them, so their small errors cost the most) and the
most recent tokens (the residual window, flushed like transformers'
QuantizedCache's) in full precision, and compresses the tokens in between in
blocks of ``block_tokens`` with the tensor codec (rANS by default), once per block
(never re-encoded). A block ``(batch, heads, tokens, head_dim)`` becomes the
matrix ``(batch·heads·tokens, head_dim)``: rows are token vectors and the codec's
rotation runs along the channels, which spreads the outlier channels of keys. At
every step all blocks of a layer are decoded at once for attention; no decoded
copy is kept, so the memory held is bitstreams + scales + the full-precision
tokens (:meth:`VcQuantizedCache.memory_bytes`). While a layer computes, the next layer's blocks
decode on a background thread (``prefetch``; the decoded tensors of one layer are the only
transient copy).

With left padding (batch > 1) the sink positions of the shorter rows hold padding;
their real first tokens are compressed like any other (correct, a little less exact).

    cache = VcQuantizedCache(model.config, bits=3.0)
    out = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=64)

(transformers 5.24 renamed ``past_key_values=`` to ``cache=``; :func:`cache_kwargs` names it for the
installed version.)
"""

from __future__ import annotations

import inspect
import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from transformers.cache_utils import BaseQuantizedLayer, Cache

from vc_quant.codec.decode import decode_tensors_alike
from vc_quant.codec.encode import encode_tensor
from vc_quant.codec.options import CodecOptions, check_bits, merge_defaults
from vc_quant.codec.ratecontrol import StepPredictor
from vc_quant.codec.record import EncodedTensor
from vc_quant.errors import VcConfigError

__all__ = ["KvBlock", "VcQuantizedCache", "VcQuantizedLayer", "cache_kwargs"]

#: per-codec defaults for KV blocks. Video codecs: no extra encoder parameters (x265's RDOQ
#: doubles encode time, and blocks are encoded during generation). AV1: dav1d decodes these
#: small pictures ~2x faster than FFmpeg's HEVC decoder at equal perplexity.
KV_DEFAULTS = {"rans": {}, "av1": {"encoder_params": ""}, "hevc": {"encoder_params": ""}, "h264": {}}
#: the default codec of the cache, chosen by scripts/bench_kv.py (docs/results.md): rANS decodes the
#: cache 1.6-2.0x faster than AV1 at the same rate and equal perplexity (within the 2-window noise)
KV_CODEC = "rans"
_PREFETCH: ThreadPoolExecutor | None = None
_PREFETCH_LOCK = threading.Lock()


def cache_kwargs(model: torch.nn.Module, cache: Cache | None) -> dict:
    """``{"cache": cache}`` for a model whose forward takes ``cache=`` (transformers >= 5.24), else
    ``{"past_key_values": cache}``: the name the installed version accepts without a deprecation."""
    params = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def _prefetch_pool() -> ThreadPoolExecutor:
    """One thread that decodes the next layer's blocks while the current layer computes (not the
    decoder's own pool: the decode splits its work over that one)."""
    global _PREFETCH
    with _PREFETCH_LOCK:
        if _PREFETCH is None:
            _PREFETCH = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vc-kv-prefetch")
        return _PREFETCH


@dataclass
class KvBlock:
    """One compressed block of keys or values: the codec record plus what decoding it needs."""

    record: EncodedTensor
    channel_mean: torch.Tensor  # fp16 (b, h, 1, d): removed before the codec, added back after
    shape: tuple[int, int, int, int]  # (batch, heads, tokens, head_dim)
    # beam search: batch rows of this block, in the order the batch has now (None: unchanged)
    perm: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        """Bytes this block adds to the cache: bitstream, affine map and fp16 channel means.

        The record's JSON metadata (shape, codec, seed, …) is the same for every block of a
        stream and the cache could hold it once, so it is not counted per block (it was until
        this version: ~250 bytes a block, ~0.08 bits per element at 128 tokens x 3 heads x 64).
        """
        maps = (self.record.bitstream, self.record.center, self.record.step, self.channel_mean)
        return sum(t.numel() * t.element_size() for t in maps)

    @property
    def bits_per_value(self) -> float:
        return 8.0 * self.nbytes / math.prod(self.shape)


class VcQuantizedLayer(BaseQuantizedLayer):
    """One layer: compressed blocks of old tokens + a full-precision residual window."""

    def __init__(
        self, bits: float = 2.5, residual_length: int = 128, block_tokens: int = 128, sink_tokens: int = 4,
        predictor: StepPredictor | None = None, **codec,
    ) -> None:  # fmt: skip
        super().__init__()
        self.bits = check_bits(bits, "VcQuantizedCache: bits")
        self.residual_length = residual_length
        self.block_tokens = block_tokens
        self.sink_tokens = sink_tokens
        self._sink_keys: torch.Tensor | None = None
        self._sink_values: torch.Tensor | None = None
        # the chosen codec's defaults (KV_DEFAULTS), never another codec's
        self.codec = merge_defaults(codec, KV_DEFAULTS, KV_CODEC)
        try:  # bad options fail here, not at the first block flush in the middle of a generation
            CodecOptions.from_kwargs(**self.codec)
        except VcConfigError as exc:
            raise VcConfigError(f"VcQuantizedCache: {exc}") from exc
        self._key_blocks: list[KvBlock] = []
        self._value_blocks: list[KvBlock] = []
        #: the layer that runs after this one (set by the cache: its blocks are prefetched from here)
        self.next_layer: VcQuantizedLayer | None = None
        self._prefetched: tuple[int, Future] | None = None  # (key blocks it decoded, the decode)
        # learnt per stream (keys and values differ), shared by the layers of one cache: one
        # encode per block, the running rate on the target
        self.predictor = predictor or StepPredictor()

    # --- codec ---------------------------------------------------------------------------
    def _quantize(self, tensor: torch.Tensor, stream: str = "keys") -> KvBlock:
        """One encode per block at the predicted step; the miss corrects the next block's step.

        The per-(sequence, head, channel) mean over the block's tokens is removed first
        and kept in fp16 (keys carry large constant offsets on a few channels; left in,
        they would set the pixel range and waste levels).
        """
        b, h, t, d = tensor.shape
        mean = tensor.float().mean(dim=-2, keepdim=True).to(torch.float16)
        centred = tensor.float() - mean.float()
        enc = encode_tensor(
            centred.reshape(b * h * t, d), self.bits, name=f"kv {stream} block",
            **self.predictor.encode_options(stream), **self.codec,
        )  # fmt: skip
        block = KvBlock(enc, mean, (b, h, t, d))
        self.predictor.update(stream, block.bits_per_value, self.bits, enc.stats)  # means counted
        return block

    def _dequantize(self, blocks: list[KvBlock]) -> torch.Tensor | None:
        """Decode blocks of one stream to ``(b, h, tokens, d)`` (see :meth:`_decode_blocks`)."""
        return self._decode_blocks(blocks, len(blocks), self.keys.device, self.keys.dtype)[0] if blocks else None

    def _decode_blocks(
        self, blocks: list[KvBlock], split: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, ...]:
        """Decode all blocks at once (one decoder, one vectorised reconstruct: the per-block
        fixed costs dominate at every step) and return the token-concatenated parts
        ``blocks[:split]``, ``blocks[split:]``, in the batch order the cache has now."""
        b, h, t, d = blocks[0].shape
        x = decode_tensors_alike([blk.record for blk in blocks]).reshape(len(blocks), b, h, t, d)
        x = x + torch.stack([blk.channel_mean for blk in blocks]).to(torch.float32)
        if any(blk.perm is not None for blk in blocks):  # beam search reordered rows since these were encoded
            rows = torch.stack([torch.arange(b) if blk.perm is None else blk.perm.cpu() for blk in blocks])
            x = x[torch.arange(len(blocks))[:, None], rows]
        parts = (x[:split], x[split:]) if split < len(blocks) else (x,)
        # (n, b, h, t, d) -> (b, h, n·t, d): blocks follow each other along the tokens
        return tuple(p.permute(1, 2, 0, 3, 4).reshape(b, h, -1, d).to(device, dtype) for p in parts)

    def _old_tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The compressed blocks' keys and values (the prefetched decode when it is of these blocks)."""
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is not None and prefetched[0] == len(self._key_blocks):
            return prefetched[1].result()
        return self._decode_all(self._key_blocks + self._value_blocks)

    def _decode_all(self, blocks: list[KvBlock]) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of ``blocks`` (the key blocks, then as many value blocks: they share the block
        shape, so one decode); the residual tensors carry the states' device and dtype (transformers >= 5.24
        no longer records the dtype on the layer)."""
        return self._decode_blocks(blocks, len(blocks) // 2, self.keys.device, self.keys.dtype)

    def prefetch(self) -> None:
        """Start decoding this layer's blocks on the background thread (used at its next update)."""
        if not self._key_blocks or not self.is_initialized:
            return
        blocks = self._key_blocks + self._value_blocks  # a snapshot: blocks appended later are not in it
        self._prefetched = (len(self._key_blocks), _prefetch_pool().submit(self._decode_all, blocks))

    # --- cache protocol ------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.cumulative_length += key_states.shape[-2]
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        self._fill_sink()
        old_k = old_v = None
        if self._key_blocks:
            old_k, old_v = self._old_tokens()
        if self.next_layer is not None:
            self.next_layer.prefetch()  # decodes while this layer's attention and MLP run
        # sequence order: sinks, compressed blocks, residual window
        keys = torch.cat([t for t in (self._sink_keys, old_k, self.keys) if t is not None], dim=-2)
        values = torch.cat([t for t in (self._sink_values, old_v, self.values) if t is not None], dim=-2)
        # a full window hands its oldest block to the codec (once per block), as transformers'
        # QuantizedCache flushes at residual_length: 0..residual_length-1 recent tokens stay exact
        while self.keys.shape[-2] >= max(self.residual_length, self.block_tokens):
            n = self.block_tokens
            self._key_blocks.append(self._quantize(self.keys[..., :n, :].contiguous(), "keys"))
            self._value_blocks.append(self._quantize(self.values[..., :n, :].contiguous(), "values"))
            self.keys, self.values = self.keys[..., n:, :], self.values[..., n:, :]
        return keys, values

    def _fill_sink(self) -> None:
        """Move the sequence's first tokens from the residual into the sink (before any block exists)."""
        held = 0 if self._sink_keys is None else self._sink_keys.shape[-2]
        n = min(self.sink_tokens - held, self.keys.shape[-2])
        if n <= 0:
            return
        head_k, head_v = self.keys[..., :n, :], self.values[..., :n, :]
        if self._sink_keys is None:
            self._sink_keys, self._sink_values = head_k.clone(), head_v.clone()
        else:
            self._sink_keys = torch.cat([self._sink_keys, head_k], dim=-2)
            self._sink_values = torch.cat([self._sink_values, head_v], dim=-2)
        self.keys, self.values = self.keys[..., n:, :], self.values[..., n:, :]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: the residual is reordered now, compressed blocks when they are decoded
        (each block remembers the composed reordering since it was encoded)."""
        self._prefetched = None  # decoded in the old batch order
        if not self.is_initialized:
            return
        beam_idx = beam_idx.to(self.keys.device)
        self.keys = self.keys.index_select(0, beam_idx)
        self.values = self.values.index_select(0, beam_idx)
        if self._sink_keys is not None:
            self._sink_keys = self._sink_keys.index_select(0, beam_idx)
            self._sink_values = self._sink_values.index_select(0, beam_idx)
        for blk in self._key_blocks + self._value_blocks:
            idx = beam_idx.cpu()
            blk.perm = idx.clone() if blk.perm is None else blk.perm.index_select(0, idx)

    def reset(self) -> None:
        super().reset()
        self._prefetched = None
        self._key_blocks, self._value_blocks = [], []
        self._sink_keys = self._sink_values = None
        self.predictor.reset()

    def crop(self, max_length: int) -> None:
        raise VcConfigError("VcQuantizedCache does not support crop (assisted/speculative decoding)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise VcConfigError("VcQuantizedCache does not support batch_repeat_interleave (contrastive search)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise VcConfigError("VcQuantizedCache does not support batch_select_indices")

    # --- accounting ------------------------------------------------------------------------
    def compressed_tokens(self) -> int:
        return sum(blk.shape[2] for blk in self._key_blocks)

    def memory_bytes(self) -> dict[str, int]:
        compressed = sum(blk.nbytes for blk in self._key_blocks + self._value_blocks)
        tensors = (self.keys, self.values, self._sink_keys, self._sink_values) if self.is_initialized else ()
        full = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        return {"compressed": compressed, "residual": full}


class VcQuantizedCache(Cache):
    """KV cache compressed with the tensor codec (see module docstring).

    Args:
        config: the model's config (for the number of layers).
        bits: target all-in bits per cached element for compressed blocks (fractional).
        residual_length: capacity of the full-precision window of recent tokens (transformers'
            QuantizedCache semantics): when it is full, its oldest ``block_tokens`` are
            compressed, so ``residual_length - block_tokens`` to ``residual_length - 1``
            recent tokens stay exact (up to ``block_tokens - 1`` if that is larger).
        block_tokens: tokens per compressed block (larger: less header overhead, coarser).
        sink_tokens: first tokens kept in full precision (attention sinks; 0 disables).
        prefetch: decode the next layer's blocks on a background thread while a layer computes
            (A/B on SmolLM2 at 1k tokens, 2 cores: 221 -> 168 ms a decode step).
        **codec: tensor-codec options (``codec="rans"``, ``rotation``, a video ``preset``, …) over the
            chosen codec's :data:`KV_DEFAULTS`.
    """

    def __init__(
        self,
        config,
        bits: float = 2.5,
        residual_length: int = 128,
        block_tokens: int = 128,
        sink_tokens: int = 4,
        prefetch: bool = True,
        **codec,
    ):
        check_bits(bits, "VcQuantizedCache: bits")
        if residual_length < 0 or block_tokens < 1 or sink_tokens < 0:
            raise VcConfigError(
                f"VcQuantizedCache: residual_length={residual_length!r} and sink_tokens={sink_tokens!r} "
                f"must be >= 0 and block_tokens={block_tokens!r} >= 1"
            )
        text = config.get_text_config(decoder=True)
        layer_types = set(getattr(text, "layer_types", None) or ["full_attention"])
        if layer_types - {"full_attention"}:
            raise VcConfigError(f"VcQuantizedCache supports full-attention layers only, found {sorted(layer_types)}")
        self.predictor = StepPredictor()  # one rate model for all layers: the rate settles after a few blocks
        layers = [
            VcQuantizedLayer(bits, residual_length, block_tokens, sink_tokens, predictor=self.predictor, **codec)
            for _ in range(text.num_hidden_layers)
        ]
        if prefetch:  # the last layer prefetches the first one's blocks for the next step
            for layer, following in zip(layers, layers[1:] + layers[:1], strict=True):
                layer.next_layer = following
        super().__init__(layers=layers)
        self.bits = bits

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held: compressed bitstreams + scales + metadata, and the full-precision tokens
        (``residual``: the sink tokens and the residual window)."""
        total = {"compressed": 0, "residual": 0}
        for layer in self.layers:
            for k, v in layer.memory_bytes().items():
                total[k] += v
        total["total"] = total["compressed"] + total["residual"]
        return total

    def compressed_bits_per_element(self) -> float:
        """All-in bits per compressed K/V element (0 before the first block)."""
        values = sum(math.prod(blk.shape) for layer in self.layers for blk in layer._key_blocks + layer._value_blocks)
        return 8.0 * self.memory_bytes()["compressed"] / values if values else 0.0
