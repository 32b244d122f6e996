"""The main job: what compressing a real model costs and buys, side by side in one run.

SmolLM2-135M (installs offline; ``bash scripts/setup.sh``) as a user would ship it (bf16),
round-to-nearest 4-bit groups of 64 (4.5 bits/weight, the simple peer) and vc_quant at two
rates — 4.0 bits/weight, where the small model stays usable, and 2.5, where it degrades —
all saved, reloaded in a fresh process, and measured the same way: checkpoint size, load
time, memory of the loaded model, perplexity on 4 windows of 512 tokens of the offline
Wikipedia leads, and the text each one generates for the same prompt.

    python scripts/demo.py [--bits 4.0 2.5] [--src PATH_OR_HUB_ID] [--out .cache/demo]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
from common import checkpoint_bytes, decoder_linears  # scripts/common.py
from transformers import AutoModelForCausalLM, AutoTokenizer

import vc_quant
from vc_quant.rtn import rtn_bits_per_value, rtn_quantize
from vc_quant.testing import smollm2_checkpoint

PROMPT = "The Eiffel Tower is a wrought-iron lattice tower in"

# run in a fresh process per model: load time, memory and quality as a user would see them
CHILD = textwrap.dedent("""
    import json, sys, time, torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vc_quant.evaluation import load_text, perplexity
    path, prompt = sys.argv[1], sys.argv[2]
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    load_s = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(path)
    ppl = perplexity(model, tok, load_text("wiki-offline"), seqlen=512, max_windows=4)["ppl"]
    ids = tok(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    print("RESULT " + json.dumps({"load_s": load_s, "memory_bytes": model.get_memory_footprint(), "ppl": ppl,
                                  "text": text}))
""")


def measure(path: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), PROMPT], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"measuring {path} failed:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1][7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=float, nargs="+", default=[4.0, 2.5])
    ap.add_argument("--src", default=None, help="model folder or hub id (default: offline SmolLM2-135M)")
    ap.add_argument("--out", default=".cache/demo")
    args = ap.parse_args()
    out = Path(args.out)
    src = args.src or str(smollm2_checkpoint())
    tok = AutoTokenizer.from_pretrained(src)
    rows = []

    ref = out / "bf16"  # the checkpoint a user would otherwise ship
    if not (ref / "config.json").exists():
        AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(ref)
        tok.save_pretrained(ref)
    rows.append({"name": "bf16 (reference)", "bpw": 16.0, "path": ref, "quantize_s": 0.0})

    rtn = out / "rtn-4b-g64"
    if not (rtn / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.bfloat16)
        with torch.no_grad():
            for module in decoder_linears(model).values():
                module.weight.copy_(rtn_quantize(module.weight, 4, 64))
        model.save_pretrained(rtn)  # stored dense: RTN's size below is its bits, not this file
        tok.save_pretrained(rtn)
    rows.append({"name": "RTN 4-bit g64", "bpw": rtn_bits_per_value(4, 64), "path": rtn, "quantize_s": None,
                 "size_note": "bits of the format (saved dense here)"})  # fmt: skip

    for bits in args.bits:
        dst = out / f"vc-{bits}"
        t0 = time.perf_counter()
        config = vc_quant.VcQuantizationConfig(bits=bits)
        model = AutoModelForCausalLM.from_pretrained(ref, dtype=torch.bfloat16, quantization_config=config)
        quantize_s = time.perf_counter() - t0
        vc_quant.save_atomic(model, dst, tokenizer=tok)
        rows.append({"name": f"vc_quant {bits} bits", "bpw": model.vc_quant_report.bits_per_weight, "path": dst,
                     "quantize_s": quantize_s})  # fmt: skip
        del model

    for row in rows:
        row.update(measure(row["path"]), size=checkpoint_bytes(row["path"]))
    report(rows, out)


def report(rows: list[dict], out: Path) -> None:
    ref = rows[0]
    lines = ["| model | bits/weight (linears) | checkpoint MB | load s | memory MB (x bf16) | perplexity "
             "| quantize s |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        size = "-" if "size_note" in r else f"{r['size'] / 1e6:.1f}"
        q = "-" if not r["quantize_s"] else f"{r['quantize_s']:.0f}"
        lines.append(f"| {r['name']} | {r['bpw']:.2f} | {size} | {r['load_s']:.1f} | "
                     f"{r['memory_bytes'] / 1e6:.1f} ({r['memory_bytes'] / ref['memory_bytes']:.2f}) | "
                     f"{r['ppl']:.2f} | {q} |")  # fmt: skip
    lines += ["", f"Prompt: {PROMPT!r} (greedy, 24 tokens)", ""]
    lines += [f"* **{r['name']}**: {r['text'].strip()!r}" for r in rows]
    text = "\n".join(lines)
    (out / "demo.md").write_text(text + "\n")
    print(text)
    print(
        "\nRTN is stored dense here (its row gives the format's bits); vc_quant checkpoints hold the bitstreams. "
        "Memory: get_memory_footprint() of the loaded model (vc_quant keeps int8 samples by default)."
    )


if __name__ == "__main__":
    main()
