"""KV-cache benchmark: quality with chunked prefill, memory, and decode speed, one run.

A prefill-only forward never reads compressed K/V, so perplexity is measured with
chunked prefill: each window is fed ``--chunk`` tokens at a time, so later chunks
attend to earlier chunks through the cache (and its codec).

Caches: DynamicCache (reference), an RTN cache of our own (transformers'
QuantizedLayer machinery, KIVI-style: keys per channel, values per token, groups of
64, asymmetric; HQQ/quanto do not install here) at 2 and 4 bits (``rtn-B``; with
full-precision sink tokens like VcQuantizedCache's: ``rtnsink-B``), and
VcQuantizedCache (``vc-BITS`` with the default codec, ``vc-CODEC-BITS`` for another),
all with the same residual window.

Decode speed is measured over ``--decode-tokens`` generated tokens after a
``--memory-tokens[0]``-token prompt; the default 128 covers one block flush (encode)
of every layer, as a long generation pays it.

    python scripts/bench_kv.py [--windows 2] [--seqlen 1024] [--chunk 128] [--residual 128] [--sink 4]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from common import default_out  # scripts/common.py
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.cache_utils import Cache, QuantizedLayer

import vc_quant
from vc_quant.evaluation import load_text, token_windows
from vc_quant.kv_cache import cache_kwargs
from vc_quant.testing import smollm2_checkpoint


class RTNLayer(QuantizedLayer):
    """Asymmetric round-to-nearest groups along ``axis`` (a KIVI-style baseline)."""

    def _quantize(self, tensor, axis):
        x = tensor.float().movedim(-1 if axis == -1 else -2, -1)
        shape = x.shape
        g = x.reshape(-1, self.q_group_size)
        lo, hi = g.amin(1, keepdim=True), g.amax(1, keepdim=True)
        scale = ((hi - lo) / (2**self.nbits - 1)).clamp_min(1e-8)
        q = ((g - lo) / scale).round().clamp(0, 2**self.nbits - 1).to(torch.uint8)
        return q, scale.half(), lo.half(), shape, axis, tensor.dtype

    def _dequantize(self, packed):
        q, scale, lo, shape, axis, dtype = packed
        x = (q.float() * scale.float() + lo.float()).reshape(shape)
        return x.movedim(-1, -1 if axis == -1 else -2).to(dtype)

    def nbytes(self) -> int:
        total = 0
        for packed in (self._quantized_keys, self._quantized_values):
            if packed is not None:
                q, scale, lo = packed[:3]
                total += q.numel() * self.nbits // 8 + scale.numel() * 2 + lo.numel() * 2
        if self.is_initialized and self.keys.dim() == 4:
            total += 2 * self.keys.numel() * self.keys.element_size()
        return total


class RTNSinkLayer(RTNLayer):
    """RTNLayer keeping the first ``sink_tokens`` in full precision (a fair baseline for VcQuantizedCache)."""

    def __init__(self, sink_tokens: int, **kwargs):
        super().__init__(**kwargs)
        self.sink_tokens = sink_tokens
        self.sink = None

    def update(self, key_states, value_states, *args, **kwargs):
        if self.sink is None:  # the prompt's first tokens (benchmarks feed >= sink_tokens at once)
            n = self.sink_tokens
            self.sink = (key_states[..., :n, :], value_states[..., :n, :])
            key_states, value_states = key_states[..., n:, :], value_states[..., n:, :]
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        return torch.cat([self.sink[0], keys], dim=-2), torch.cat([self.sink[1], values], dim=-2)

    def get_seq_length(self) -> int:
        return super().get_seq_length() + (self.sink[0].shape[-2] if self.sink is not None else 0)

    def nbytes(self) -> int:
        sink = sum(t.numel() * t.element_size() for t in self.sink) if self.sink is not None else 0
        return super().nbytes() + sink


class RTNCache(Cache):
    def __init__(self, config, nbits: int, residual_length: int, sink_tokens: int = 0):
        n = config.get_text_config(decoder=True).num_hidden_layers
        # keys per channel (axis -2 groups run along tokens), values per token (groups along channels)
        kw = dict(nbits=nbits, axis_key=0, axis_value=-1, q_group_size=64, residual_length=residual_length)
        layers = [RTNSinkLayer(sink_tokens, **kw) if sink_tokens else RTNLayer(**kw) for _ in range(n)]
        super().__init__(layers=layers)

    def memory_bytes(self) -> dict[str, int]:
        return {"total": sum(layer.nbytes() for layer in self.layers)}


def make_cache(name: str, config, args):
    if name == "dynamic":
        return DynamicCache(config=config)
    kind, *codec, bits = name.split("-")
    if kind in ("rtn", "rtnsink"):
        return RTNCache(config, int(bits), args.residual, sink_tokens=args.sink if kind == "rtnsink" else 0)
    options = {"codec": codec[0]} if codec else {}
    return vc_quant.VcQuantizedCache(config, bits=float(bits), residual_length=args.residual,
                                     block_tokens=args.block, sink_tokens=args.sink, **options)  # fmt: skip


def fp16_bytes(cache, config) -> int:
    text = config.get_text_config(decoder=True)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * cache.get_seq_length()


def memory(cache) -> int:
    if isinstance(cache, DynamicCache):
        return sum(2 * layer.keys.numel() * layer.keys.element_size() for layer in cache.layers)
    return cache.memory_bytes()["total"]


@torch.no_grad()
def chunked_ppl(model, windows, new_cache, chunk: int) -> float:
    """Perplexity over ``windows`` fed ``chunk`` tokens at a time into a fresh ``new_cache()`` each."""
    nll, count = 0.0, 0
    for w in windows:
        kw = cache_kwargs(model, new_cache())
        logits = []
        for i in range(0, w.numel(), chunk):
            logits.append(model(w[None, i : i + chunk], **kw, use_cache=True).logits[0])
        logp = torch.log_softmax(torch.cat(logits)[:-1].float(), -1)
        nll += float(-logp.gather(-1, w[1:, None]).sum())
        count += w.numel() - 1
    return math.exp(nll / count)


@torch.no_grad()
def prefill(model, ids, cache, chunk):
    kw = cache_kwargs(model, cache)
    for i in range(0, ids.shape[1], chunk):
        out = model(ids[:, i : i + chunk], **kw, use_cache=True)
    return out


@torch.no_grad()
def decode_speed(model, ids, name, args) -> float:
    cache = make_cache(name, model.config, args)
    out = prefill(model, ids, cache, 512)
    token = out.logits[:, -1:].argmax(-1)
    kw = cache_kwargs(model, cache)  # outside the timed loop
    t0 = time.perf_counter()
    for _ in range(args.decode_tokens):
        out = model(token, **kw, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    return args.decode_tokens / (time.perf_counter() - t0)


def plot(rows, ref, n_tokens: int, path: Path) -> None:
    """Perplexity increase vs memory at ``n_tokens`` (left) and decode speed (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for r in rows:
        dppl = 100 * (r["ppl"] / ref["ppl"] - 1) if ref else 0.0
        left.scatter(r[f"fp16_ratio_{n_tokens}"], dppl, label=r["cache"])
        left.annotate(r["cache"], (r[f"fp16_ratio_{n_tokens}"], dppl), fontsize=7)
    left.set_xlabel(f"memory: x smaller than fp16 at {n_tokens} tokens")
    left.set_ylabel("perplexity increase vs DynamicCache (%)")
    left.set_yscale("symlog", linthresh=1.0)
    left.grid(True, alpha=0.3)
    right.bar([r["cache"] for r in rows], [r["decode_tokens_per_s"] for r in rows])
    right.set_ylabel("decode tokens/s")
    right.tick_params(axis="x", rotation=45)
    fig.suptitle("KV caches on SmolLM2-135M (chunked prefill, same residual window)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--caches", nargs="*", default=["dynamic", "rtn-2", "rtn-4", "vc-rans-2.0", "vc-rans-2.5", "vc-rans-3.0",
                                        "vc-av1-2.0", "vc-av1-2.5", "vc-av1-3.0"]
    )
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--residual", type=int, default=128)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--sink", type=int, default=4, help="VcQuantizedCache sink_tokens")
    ap.add_argument("--memory-tokens", type=int, nargs="*", default=[1024, 4096])
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--memory-dtype", default="bfloat16", help="model dtype for the memory runs (16-bit residuals)")
    ap.add_argument("--out", default=default_out("kv"), help="results folder (committed: results/kv)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src = str(smollm2_checkpoint())
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    mem_model = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, args.memory_dtype)).eval()
    tok = AutoTokenizer.from_pretrained(src)
    text = load_text("wiki-offline")
    windows = token_windows(tok, text, args.seqlen, args.windows, bos=True)
    long_ids = token_windows(tok, text, max(args.memory_tokens), 1, bos=True)
    rows = []
    for name in args.caches:
        t0 = time.perf_counter()
        ppl = chunked_ppl(model, windows, lambda n=name: make_cache(n, model.config, args), args.chunk)
        row = {"cache": name, "ppl": ppl}
        row["ppl_seconds"] = time.perf_counter() - t0
        for n in args.memory_tokens:
            cache = make_cache(name, model.config, args)
            prefill(mem_model, long_ids[:, :n], cache, 512)
            row[f"bytes_{n}"] = memory(cache)
            row[f"fp16_ratio_{n}"] = fp16_bytes(cache, model.config) / row[f"bytes_{n}"]
            if name.startswith("vc"):
                row[f"bits_per_element_{n}"] = cache.compressed_bits_per_element()
        row["decode_tokens_per_s"] = decode_speed(model, long_ids[:, : args.memory_tokens[0]], name, args)
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / "bench_kv.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    ref = next((r for r in rows if r["cache"] == "dynamic"), None)
    n_big = max(args.memory_tokens)
    by_name = {r["cache"]: r for r in rows}
    bases = [b for b in ("dynamic", "rtn-2", "rtn-4") if b in by_name]
    lines = ["| cache | ppl (chunked prefill) | Δppl vs Dynamic | " + " | ".join(
        f"memory @{n} (x smaller than fp16)" for n in args.memory_tokens)
        + f" | compressed bits/element @{n_big} | decode tok/s | " + " | ".join(f"vs {b}" for b in bases) + " |",
        "|---" * (5 + len(args.memory_tokens) + len(bases)) + "|"]  # fmt: skip
    for r in rows:
        d = f"{100 * (r['ppl'] / ref['ppl'] - 1):+.1f}%" if ref else "-"
        mem = " | ".join(f"{r[f'bytes_{n}'] / 1e6:.2f} MB ({r[f'fp16_ratio_{n}']:.1f}x)" for n in args.memory_tokens)
        bpe = f"{r[f'bits_per_element_{n_big}']:.2f}" if f"bits_per_element_{n_big}" in r else "-"
        tps = r["decode_tokens_per_s"]
        speed = " | ".join(f"{tps / by_name[b]['decode_tokens_per_s']:.2f}" for b in bases)
        lines.append(f"| {r['cache']} | {r['ppl']:.3f} | {d} | {mem} | {bpe} | {tps:.2f} | {speed} |")
    plot(rows, ref, n_big, out / "bench_kv.png")
    (out / "bench_kv.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
