"""KV-cache quality variants at equal mean rate: how to split bits between keys and values.

Perplexity with chunked prefill exactly as ``scripts/bench_kv.py`` measures it (its
``chunked_ppl``, 128-token chunks, 128-token window, 4 sinks), for VcQuantizedCache at a
mean rate with keys and values at their own rates (``K/V`` below; keys and values blocks
have the same size, so the cache's rate is their mean). Quality only: no memory or speed.

    python scripts/kv_variants.py [--windows 8] [--out results/kv/variants]

Two windows (bench_kv's default) cannot separate rows 0.1 point apart; use >= 8.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import bench_kv  # scripts/bench_kv.py: its chunked_ppl and make_cache
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import vc_quant
from vc_quant.evaluation import load_text, token_windows
from vc_quant.kv_cache import VcQuantizedLayer
from vc_quant.testing import smollm2_checkpoint

#: (mean bits, key bits, value bits); key bits None: both at the mean (the cache as shipped)
VARIANTS = [
    (2.5, None, None), (2.5, 2.75, 2.25), (2.5, 3.0, 2.0), (2.5, 3.25, 1.75), (2.5, 2.25, 2.75),
    (2.0, None, None), (2.0, 2.4, 1.6), (3.0, None, None), (3.0, 3.6, 2.4),
]  # fmt: skip


class SplitLayer(VcQuantizedLayer):
    """A cache layer that encodes keys and values at their own rates (``stream_bits``)."""

    stream_bits: dict[str, float]

    def _quantize(self, tensor: torch.Tensor, stream: str = "keys"):
        mean_bits, self.bits = self.bits, self.stream_bits[stream]
        try:
            return super()._quantize(tensor, stream)
        finally:
            self.bits = mean_bits


def make_cache(config, mean: float, key_bits: float | None, value_bits: float | None, args):
    cache = vc_quant.VcQuantizedCache(config, bits=mean, residual_length=args.residual,
                                      block_tokens=args.block, sink_tokens=args.sink)  # fmt: skip
    if key_bits is not None:
        for layer in cache.layers:  # the cache's own layers (settings, shared predictor, prefetch links)
            layer.__class__ = SplitLayer
            layer.stream_bits = {"keys": key_bits, "values": value_bits}
    return cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--residual", type=int, default=128)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--out", default="results/kv/variants")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src = str(smollm2_checkpoint())
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(src)
    windows = token_windows(tok, load_text("wiki-offline"), args.seqlen, args.windows, bos=True)
    ref = bench_kv.chunked_ppl(model, windows, lambda: bench_kv.make_cache("dynamic", model.config, args), args.chunk)
    rows = [{"variant": "dynamic", "ppl": ref}]
    print(json.dumps(rows[0]), flush=True)
    for mean, kb, vb in VARIANTS:
        label = f"{mean:g} bits" + (f" K{kb:g}/V{vb:g}" if kb is not None else " K=V")
        t0 = time.perf_counter()
        ppl = bench_kv.chunked_ppl(model, windows, lambda m=mean, k=kb, v=vb: make_cache(model.config, m, k, v, args),
                                   args.chunk)  # fmt: skip
        rows.append({"variant": label, "ppl": ppl, "dppl_pct": 100 * (ppl / ref - 1),
                     "seconds": time.perf_counter() - t0})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
        (out / "kv_variants.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    lines = [f"SmolLM2-135M, chunked prefill over {args.windows} windows x {args.seqlen} tokens; DynamicCache "
             f"{ref:.3f}.", "", "| variant | ppl | Δppl vs Dynamic |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {r['variant']} | {r['ppl']:.3f} | {r.get('dppl_pct', 0.0):+.2f}% |" for r in rows[1:]]
    (out / "kv_variants.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
