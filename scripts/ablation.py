"""What moves vc_quant's quality on a model: one change at a time from the defaults, one run.

Every variant quantizes the same model at the same target rate and is evaluated on the same
windows (rd_sweep.py's protocol and evaluator); the Fisher statistics are computed once and
shared (they depend on neither the codec nor the options varied here).

    python scripts/ablation.py --model qwen --bits 3.5 [--windows 16] [--piqa-limit 0] [--out results/ablation/qwen]

Variants (label: changes from the defaults): ``defaults``; ``uniform`` (allocation);
``no-scaling``; ``no-rotation``; ``scalar`` (rANS scalar RDOQ instead of trellis); ``hevc`` and
``av1`` (codec); ``row-scale`` (one rANS step per row, relative to its RMS); ``no-qkv`` (q/k/v
projections kept in full precision: how much of the loss those Qwen2 layers — the ones with
biases — cause; the rate of the rest is the same target, so the model's all-in rate rises).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from common import default_out  # scripts/common.py
from rd_sweep import cache_fisher, open_run
from transformers import AutoModelForCausalLM

import vc_quant
from vc_quant.evaluation import perplexity

VARIANTS = {
    "defaults": {},
    "uniform": {"allocation": "uniform"},
    "no-scaling": {"scaling": "none"},
    "no-rotation": {"rotation": False},
    "scalar": {"quantizer": "scalar"},
    "row-scale": {"scale": "row"},
    "hevc": {"codec": "hevc"},
    "av1": {"codec": "av1"},
    "no-qkv": {"overrides": {r".*\.(q|k|v)_proj": 0}},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen")
    ap.add_argument("--bits", type=float, default=3.5)
    ap.add_argument("--codec", default="rans", help="the defaults' codec")
    # the codec rows are rd_sweep.py's (same protocol); asked for here only on request
    ap.add_argument("--variants", nargs="*", default=[v for v in VARIANTS if v not in ("hevc", "av1")],
                    choices=list(VARIANTS))  # fmt: skip
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--text", default="wiki-offline")
    ap.add_argument("--piqa-limit", type=int, default=0)
    ap.add_argument("--out", default=default_out("ablation"), help="results folder (committed: results/ablation/…)")
    args = ap.parse_args()
    out, src, tok, evaluate = open_run(args)
    cache_fisher()
    rows = []
    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    fp = perplexity(base, tok, evaluate.text, args.seqlen, args.windows, bos=True)["ppl"]  # text read once
    del base
    for label in args.variants:
        cfg = vc_quant.VcQuantizationConfig(**{"bits": args.bits, "codec": args.codec, **VARIANTS[label]})
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg, dtype=torch.float32)
        q_s = time.perf_counter() - t0
        row = {"variant": label, "changes": VARIANTS[label], "bpw": model.vc_quant_report.bits_per_weight,
               "quantize_seconds": q_s, **evaluate(model)}  # fmt: skip
        rows.append(row)
        logging.info("%-12s bpw %.3f ppl %.2f (x FP %.3f)", label, row["bpw"], row["ppl"], row["ppl"] / fp)
        (out / "ablation.json").write_text(json.dumps({"args": vars(args), "fp_ppl": fp, "rows": rows}, indent=2))
        del model
    ref = rows[0]["ppl"] if rows and rows[0]["variant"] == "defaults" else None
    lines = [f"`{Path(src).name}`, target {args.bits} bits/weight, codec {args.codec}; {args.windows} windows x "
             f"{args.seqlen} tokens; FP perplexity {fp:.2f}. One change at a time from the defaults.", "",
             "| variant | change | all-in bpw | perplexity | × FP | vs defaults |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        vs = f"{100 * (r['ppl'] / ref - 1):+.1f}%" if ref else "-"
        lines.append(f"| {r['variant']} | `{json.dumps(r['changes'])}` | {r['bpw']:.3f} | {r['ppl']:.2f} | "
                     f"{r['ppl'] / fp:.3f} | {vs} |")  # fmt: skip
    (out / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
