import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache, LlamaConfig

from vc_quant import VcConfigError, VcQuantizedCache, cache_kwargs
from vc_quant.kv_cache import VcQuantizedLayer


def states(b=2, h=3, t=10, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, h, t, d, generator=g), torch.randn(b, h, t, d, generator=g)


def test_residual_part_matches_dynamic_cache_exactly():
    layer = VcQuantizedLayer(bits=3.0, residual_length=64, block_tokens=64)
    k, v = states(t=40)
    out_k, out_v = layer.update(k, v)
    assert torch.equal(out_k, k) and torch.equal(out_v, v)
    k2, v2 = states(t=5, seed=1)
    out_k, out_v = layer.update(k2, v2)
    assert torch.equal(out_k, torch.cat([k, k2], -2)) and layer.get_seq_length() == 45
    assert layer.compressed_tokens() == 0


def test_old_tokens_are_compressed_in_blocks_with_bounded_error():
    layer = VcQuantizedLayer(bits=4.0, residual_length=16, block_tokens=64, sink_tokens=0)
    k, v = states(t=100)
    layer.update(k, v)  # window full (>= max(16, 64)): one block of 64 compressed, 36 stay
    assert layer.compressed_tokens() == 64 and layer.keys.shape[-2] == 36
    k2, v2 = states(t=1, seed=3)
    out_k, out_v = layer.update(k2, v2)
    assert out_k.shape == out_v.shape == (2, 3, 101, 64)
    assert torch.equal(out_k[..., 64:100, :], k[..., 64:, :])  # residual exact
    rel = ((out_k[..., :64, :] - k[..., :64, :]) ** 2).sum() / (k[..., :64, :] ** 2).sum()
    assert rel < 0.03  # measured ~0.01 for Gaussian states at 4 bits
    mem = layer.memory_bytes()
    assert 0 < mem["compressed"] < 2 * 64 * 2 * 3 * 64 * 1.0  # well under 8 bits per element


def test_sink_tokens_stay_exact_and_keep_sequence_order():
    layer = VcQuantizedLayer(bits=3.0, residual_length=8, block_tokens=16, sink_tokens=4)
    k, v = states(t=2)
    layer.update(k, v)  # a short first step: the sink fills over several updates
    k2, v2 = states(t=41, seed=1)
    layer.update(k2, v2)  # blocks are formed after this step's attention: the next step reads them
    # 43 tokens: 4 sinks; the window (capacity 8 < block 16) flushes 16 + 16 (tokens 4..35), keeps 7
    assert layer.compressed_tokens() == 32 and layer.keys.shape[-2] == 7
    k3, v3 = states(t=1, seed=2)
    out_k, out_v = layer.update(k3, v3)
    full_k, full_v = torch.cat([k, k2, k3], -2), torch.cat([v, v2, v3], -2)
    assert torch.equal(out_k[..., :4, :], full_k[..., :4, :]) and torch.equal(out_v[..., :4, :], full_v[..., :4, :])
    assert torch.equal(out_k[..., 36:, :], full_k[..., 36:, :])
    rel = ((out_k[..., 4:36, :] - full_k[..., 4:36, :]) ** 2).sum() / (full_k[..., 4:36, :] ** 2).sum()
    assert 0 < rel < 0.1  # compressed, in order (a shifted block would be ~2.0)
    mem = layer.memory_bytes()
    assert mem["residual"] == 2 * (4 + 8) * 2 * 3 * 64 * 4  # sinks + window (7 + the new token), fp32


def test_sink_tokens_follow_beam_reordering():
    layer = VcQuantizedLayer(bits=4.0, residual_length=2, block_tokens=4, sink_tokens=2)
    k, v = states(t=12)
    layer.update(k, v)
    layer.reorder_cache(torch.tensor([1, 0]))
    out_k, _ = layer.update(*states(t=1, seed=5))
    assert torch.equal(out_k[0, :, :2], k[1, :, :2]) and torch.equal(out_k[1, :, :2], k[0, :, :2])
    rel = ((out_k[0, :, 2:6] - k[1, :, 2:6]) ** 2).sum() / (k[1, :, 2:6] ** 2).sum()
    assert rel < 0.05  # the compressed block follows the beams too


def test_memory_and_rate_accounting():
    cache = VcQuantizedCache(
        LlamaConfig(num_hidden_layers=2), bits=3.0, residual_length=0, block_tokens=128, sink_tokens=0
    )
    for layer in cache.layers:
        k, v = states(t=256)
        layer.update(k, v)
    bits = cache.compressed_bits_per_element()
    assert 2.5 < bits < 3.5
    mem = cache.memory_bytes()
    assert mem["residual"] == 0 and mem["total"] == mem["compressed"]
    assert mem["compressed"] * 8 == pytest.approx(bits * 2 * 2 * 2 * 3 * 256 * 64)


def test_generate_greedy_and_sampled_on_a_tiny_model(tiny_src):
    model = AutoModelForCausalLM.from_pretrained(tiny_src)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]] * 2)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second row
    cache = VcQuantizedCache(model.config, bits=4.0, residual_length=4, block_tokens=8)
    out = model.generate(ids, attention_mask=mask, **cache_kwargs(model, cache), max_new_tokens=24, do_sample=False)
    assert out.shape == (2, 32) and cache.get_seq_length() == 31
    assert any(layer.compressed_tokens() > 0 for layer in cache.layers)
    ref = model.generate(ids, attention_mask=mask, **cache_kwargs(model, DynamicCache(config=model.config)),
                         max_new_tokens=24, do_sample=False)  # fmt: skip
    assert torch.equal(out[:, :9], ref[:, :9])  # the first token only sees full-precision states
    torch.manual_seed(0)
    cache = VcQuantizedCache(model.config, bits=3.0, residual_length=4, block_tokens=8)
    sampled = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=12, do_sample=True)
    assert sampled.shape == (2, 20)


def test_reset_and_reuse(tiny_src):
    model = AutoModelForCausalLM.from_pretrained(tiny_src)
    cache = VcQuantizedCache(model.config, bits=3.0, residual_length=2, block_tokens=8)
    ids = torch.arange(1, 30)[None]
    model(ids, **cache_kwargs(model, cache), use_cache=True)
    assert cache.get_seq_length() == 29 and cache.memory_bytes()["compressed"] > 0
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.memory_bytes()["compressed"] == 0
    model(ids[:, :5], **cache_kwargs(model, cache), use_cache=True)
    assert cache.get_seq_length() == 5


@pytest.mark.parametrize(
    "kwargs,match", [({"bits": 0.5}, "bits=0.5"), ({"residual_length": -1}, "residual_length"),
                     ({"block_tokens": 0}, "block_tokens"), ({"sink_tokens": -1}, "sink_tokens")],
)  # fmt: skip
def test_bad_configs(tiny_src, kwargs, match):
    model = AutoModelForCausalLM.from_pretrained(tiny_src)
    with pytest.raises(VcConfigError, match=match):
        VcQuantizedCache(model.config, **kwargs)


def test_unsupported_operations_raise_clearly():
    layer = VcQuantizedLayer()
    with pytest.raises(VcConfigError, match="crop"):
        layer.crop(3)


def test_window_flushes_like_transformers_quantized_cache():
    """residual_length is the window's capacity: with block = window, 0..127 recent tokens stay exact."""
    layer = VcQuantizedLayer(bits=3.0, residual_length=128, block_tokens=128, sink_tokens=4)
    k, v = states(b=1, h=1, t=4 + 127)
    layer.update(k, v)
    assert layer.compressed_tokens() == 0 and layer.keys.shape[-2] == 127
    layer.update(*states(b=1, h=1, t=1, seed=1))  # the window reaches 128: all of it is compressed
    assert layer.compressed_tokens() == 128 and layer.keys.shape[-2] == 0
    mem = layer.memory_bytes()
    assert mem["residual"] == 2 * 4 * 64 * 4  # only the sinks remain in full precision


@pytest.mark.parametrize("codec", ["rans", "av1"])
def test_each_codec_compresses_blocks_with_bounded_error(codec):
    layer = VcQuantizedLayer(bits=3.0, residual_length=16, block_tokens=64, sink_tokens=0, codec=codec)
    k, v = states(t=100)
    layer.update(k, v)
    out_k, _ = layer.update(*states(t=1, seed=3))
    rel = ((out_k[..., :64, :] - k[..., :64, :]) ** 2).sum() / (k[..., :64, :] ** 2).sum()
    assert rel < 0.05  # Gaussian states at 3 bits: measured rans ~0.02, av1 ~0.03


def test_rans_blocks_decode_together_like_one_by_one():
    from vc_quant.codec import decode_tensor
    from vc_quant.codec.decode import decode_tensors_alike

    layer = VcQuantizedLayer(bits=2.5, residual_length=8, block_tokens=32, sink_tokens=0, codec="rans")
    layer.update(*states(t=130))
    records = [blk.record for blk in layer._key_blocks]
    assert len(records) >= 3
    together = decode_tensors_alike(records)
    for i, rec in enumerate(records):
        assert torch.allclose(together[i], decode_tensor(rec), atol=1e-6)


def test_choosing_a_codec_drops_the_other_codecs_defaults():
    assert VcQuantizedLayer(codec="rans").codec == {"codec": "rans"}  # no video preset or encoder_params
    assert VcQuantizedLayer(codec="av1").codec == {"codec": "av1", "encoder_params": ""}
    with pytest.raises(VcConfigError, match="preset='8' is an option of the video codecs"):
        VcQuantizedLayer(codec="rans", preset="8")


@pytest.mark.parametrize("beams", [1, 2])
def test_prefetched_decoding_gives_the_same_tokens(tiny_src, beams):
    # the next layer's blocks decode on a background thread: same result, and it is used
    model = AutoModelForCausalLM.from_pretrained(tiny_src)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 25, 29]])
    used = []
    real = VcQuantizedLayer._old_tokens

    def counting(layer):
        used.append(layer._prefetched is not None and layer._prefetched[0] == len(layer._key_blocks))
        return real(layer)

    outs = {}
    for prefetch in (False, True):
        cache = VcQuantizedCache(model.config, bits=3.0, residual_length=4, block_tokens=8, prefetch=prefetch)
        used.clear()
        VcQuantizedLayer._old_tokens = counting
        try:
            outs[prefetch] = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=20, do_sample=False,
                                            num_beams=beams)  # fmt: skip
        finally:
            VcQuantizedLayer._old_tokens = real
        assert any(used) == prefetch
    assert torch.equal(outs[False], outs[True])


def test_a_prefetch_made_before_beam_reordering_is_not_used():
    def pair(prefetch):
        first, second = (VcQuantizedLayer(bits=4.0, residual_length=2, block_tokens=4, sink_tokens=0) for _ in "ab")
        first.next_layer = second if prefetch else None
        k, v = states(t=12)
        first.update(k, v)
        second.update(k, v)
        first.update(*states(t=1, seed=3))  # prefetches second's blocks, in the current batch order
        if prefetch:
            second._prefetched[1].result()  # decoded before the reordering
        second.reorder_cache(torch.tensor([1, 0]))
        return second.update(*states(t=1, seed=4))[0]

    assert torch.equal(pair(prefetch=True), pair(prefetch=False))


def test_cache_kwargs_names_the_argument_the_forward_takes():
    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None): ...

    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None): ...

    sentinel = object()
    assert cache_kwargs(Old(), sentinel) == {"past_key_values": sentinel}
    assert cache_kwargs(New(), sentinel) == {"cache": sentinel}
