"""The main job: compress a real small model, save, reload in a new process, generate.

Compresses SmolLM2-135M (installs offline; see scripts/setup.sh) at 2.5 bits per
weight with ``from_pretrained(..., quantization_config=VcQuantizationConfig(...))``,
saves it, reloads it in a fresh Python process, generates a few tokens and prints
sizes (fp16 vs compressed), quantize time and load times (same run, same disk).

    python scripts/demo.py [--bits 2.5] [--src PATH_OR_HUB_ID] [--out .cache/demo]
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
from common import checkpoint_bytes  # scripts/common.py
from transformers import AutoModelForCausalLM, AutoTokenizer

import vc_quant
from vc_quant.testing import smollm2_checkpoint

PROMPT = "The capital of France is"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=float, default=2.5)
    ap.add_argument("--src", default=None, help="model folder or hub id (default: offline SmolLM2-135M)")
    ap.add_argument("--out", default=".cache/demo")
    ap.add_argument("--tokens", type=int, default=20)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src = args.src or str(smollm2_checkpoint())
    tok = AutoTokenizer.from_pretrained(src)

    # the fp16 reference checkpoint (what a user would otherwise ship)
    fp16_dir = out / "fp16"
    if not (fp16_dir / "config.json").exists():
        AutoModelForCausalLM.from_pretrained(src, dtype=torch.float16).save_pretrained(fp16_dir)
        tok.save_pretrained(fp16_dir)

    t0 = time.perf_counter()
    # fp16 like the reference checkpoint: unquantized parts (embeddings, norms) are stored in fp16
    model = AutoModelForCausalLM.from_pretrained(
        fp16_dir, quantization_config=vc_quant.VcQuantizationConfig(bits=args.bits), dtype=torch.float16
    )
    quantize_s = time.perf_counter() - t0
    report = model.vc_quant_report
    vc_dir = out / f"vc-{args.bits}"
    model.save_pretrained(vc_dir)
    tok.save_pretrained(vc_dir)
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        ref_logits = model(ids).logits
    torch.save(ref_logits, out / "logits.pt")

    # a fresh process: import vc_quant, load both checkpoints, compare, generate
    child = textwrap.dedent(f"""
        import json, time, torch, vc_quant
        from transformers import AutoModelForCausalLM, AutoTokenizer
        res = {{}}
        for name, path in (("fp16", {str(fp16_dir)!r}), ("vc", {str(vc_dir)!r}),
                           ("fp16_2", {str(fp16_dir)!r}), ("vc_2", {str(vc_dir)!r})):
            t0 = time.perf_counter()
            m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16)
            res[name] = time.perf_counter() - t0
        tok = AutoTokenizer.from_pretrained({str(vc_dir)!r})
        ids = tok({PROMPT!r}, return_tensors="pt").input_ids
        with torch.no_grad():
            logits = m(ids).logits
        res["max_abs_logit_diff"] = (logits - torch.load({str(out / "logits.pt")!r})).abs().max().item()
        gen = m.generate(ids, max_new_tokens={args.tokens}, do_sample=False)
        res["text"] = tok.decode(gen[0], skip_special_tokens=True)
        # the same with a compressed KV cache (a small window, so that blocks get compressed)
        cache = vc_quant.VcQuantizedCache(m.config, bits=2.5, residual_length=16, block_tokens=16)
        gen = m.generate(ids, past_key_values=cache, max_new_tokens={args.tokens}, do_sample=False)
        res["text_kv"] = tok.decode(gen[0], skip_special_tokens=True)
        res["kv_bits"], res["kv_bytes"] = cache.compressed_bits_per_element(), cache.memory_bytes()
        print("RESULT" + json.dumps(res))
    """)
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True)
    res = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))[6:])
    load_fp16 = min(res["fp16"], res["fp16_2"])
    load_vc = min(res["vc"], res["vc_2"])

    fp16_b, vc_b = checkpoint_bytes(fp16_dir), checkpoint_bytes(vc_dir)
    summary = {
        "model": src, "bits_target": args.bits, "quantized_tensors": report.tensors,
        "quantized_values": report.values, "bits_per_weight_all_in": report.bits_per_weight,
        "fp16_checkpoint_bytes": fp16_b, "vc_checkpoint_bytes": vc_b, "size_ratio": fp16_b / vc_b,
        "quantize_seconds": quantize_s, "quantize_Mparams_per_s": report.values / quantize_s / 1e6,
        "load_seconds_fp16": load_fp16, "load_seconds_vc": load_vc, "load_ratio_vc_over_fp16": load_vc / load_fp16,
        "max_abs_logit_diff_reloaded": res["max_abs_logit_diff"], "generated": res["text"],
        "generated_with_vc_kv_cache": res["text_kv"], "kv_cache_bits_per_element": res["kv_bits"],
        "kv_cache_bytes": res["kv_bytes"],
    }  # fmt: skip
    (out / "demo.json").write_text(json.dumps(summary, indent=2))
    print(f"model:            {src}")
    print(f"quantized:        {report.tensors} linear weights, {report.values / 1e6:.1f} M values, "
          f"{report.bits_per_weight:.3f} bits/weight all-in (target {args.bits})")  # fmt: skip
    print(f"checkpoint size:  fp16 {fp16_b / 1e6:.1f} MB -> vc_quant {vc_b / 1e6:.1f} MB "
          f"({fp16_b / vc_b:.2f}x smaller; embeddings/norms stay fp16)")  # fmt: skip
    print(f"quantize on load: {quantize_s:.1f} s ({report.values / quantize_s / 1e6:.2f} M params/s)")
    print(f"load (new proc):  fp16 {load_fp16:.2f} s, vc_quant {load_vc:.2f} s (ratio {load_vc / load_fp16:.1f}x)")
    print(f"reloaded vs in-memory quantized model: max |logit diff| = {res['max_abs_logit_diff']}")
    print(f"generate:         {res['text']!r}")
    kv = res["kv_bytes"]
    print(f"+ VcQuantizedCache: {res['text_kv']!r}\n"
          f"                  ({res['kv_bits']:.2f} bits/element compressed — 16-token blocks carry a whole "
          f"block's overhead; {kv['compressed']} B compressed, {kv['residual']} B full precision)")  # fmt: skip


if __name__ == "__main__":
    main()
