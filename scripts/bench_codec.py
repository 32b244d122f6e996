"""Codec benchmark on real weight matrices (SmolLM2-135M): rate–distortion and speed, codecs side by side.

Prints and saves (JSON, markdown, PNG) in one run, for every codec asked for (default: rans,
hevc, av1) at every target rate:

1. all-in bits/value (every stored byte) against the target, the worst per-matrix miss,
   pooled relative MSE and that MSE as a multiple of the Gaussian Shannon bound 2^(-2R);
   RTN baselines (2/3/4 bits, g32/g64/g128, asymmetric, fp16 scale+min counted);
2. throughput on all cores, tensors side by side as when a model loads: encode (rotation
   and rate control included) and decode to float32 tensors and to the int8 rotated-domain
   samples (what ``resident="int8"`` / ``"bitstream"`` and the KV cache consume), M values/s;
   for rANS also on its scalar decoder (SSE4.1 rounds off), the same streams, side by side.
   Each codec is warmed up on one matrix first (caches of rotation factors and model costs).

    python scripts/bench_codec.py [--layers 2 10 20] [--codecs rans hevc av1] [--out results/codec]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from common import default_out, finish_log_plot, smollm2_state  # scripts/common.py

from vc_quant import decode_tensor, encode_tensor
from vc_quant.codec import decode_samples
from vc_quant.codec.rans import native
from vc_quant.rtn import rtn_bits_per_value, rtn_quantize

KINDS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]  # fmt: skip


def pooled_rel_mse(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Relative MSE over all matrices together (sum of errors / sum of energies)."""
    err = sum(float(((a.double() - b.double()) ** 2).sum()) for a, b in pairs)
    return err / sum(float((b.double() ** 2).sum()) for _, b in pairs)


def scalar_cell(row: dict) -> str:
    v = row.get("samples_scalar_Mvalues_per_s")
    return "-" if v is None else f"{v:.1f}"


def timed_map(fn, items: list, workers: int) -> tuple[list, float]:
    """``fn`` over ``items``, one item per worker thread (as a model load does); results and seconds."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        out = list(pool.map(fn, items))
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 10, 20])
    ap.add_argument("--targets", type=float, nargs="+", default=[2.0, 2.5, 3.0, 3.5, 4.0])
    ap.add_argument("--codecs", nargs="+", default=["rans", "hevc", "av1"])
    ap.add_argument("--out", default=default_out("codec"), help="results folder (committed: results/codec)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workers = os.cpu_count() or 1

    state = smollm2_state()
    names = [f"model.layers.{i}.{k}.weight" for i in args.layers for k in KINDS]
    weights = {n: state[n].float() for n in names}
    n_values = sum(w.numel() for w in weights.values())
    print(f"{len(names)} matrices from SmolLM2-135M layers {args.layers}: {n_values / 1e6:.2f} M values; "
          f"{workers} cores", flush=True)  # fmt: skip

    rows: list[dict] = []
    for rot in (False, True):
        for bits in (2, 3, 4):
            for g in (32, 64, 128):
                pairs = [(rtn_quantize(w, bits, g, rotation=rot), w) for w in weights.values()]
                # 4-bit g32 without rotation reproduces the Q4_1 grid the model shipped in
                # (zero error): an artefact, shown but never used as the baseline.
                artefact = bits == 4 and g == 32 and not rot
                label = f"RTN {bits}b g{g}" + (" +rot" if rot else "") + (" (Q4_1 grid!)" if artefact else "")
                rows.append({"method": label, "family": "rtn", "codec": "rtn", "artefact": artefact,
                             "bpw": sum(rtn_bits_per_value(bits, g, w.shape[-1]) * w.numel()
                                        for w in weights.values()) / n_values,
                             "rel_mse": pooled_rel_mse(pairs)})  # fmt: skip

    items = list(weights.items())
    for codec in args.codecs:
        for target in args.targets:  # warm-up: per-rate caches (model costs) and rotation factors
            encode_tensor(items[0][1], target, codec=codec)
        for target in args.targets:
            encs, enc_s = timed_map(lambda it, t=target, c=codec: encode_tensor(it[1], t, name=it[0], codec=c),
                                    items, workers)  # fmt: skip
            decoded, dec_s = timed_map(lambda e: decode_tensor(e, threads=1), encs, workers)
            _, smp_s = timed_map(lambda e: decode_samples(e, threads=1), encs, workers)
            scalar_s = None
            if codec == "rans" and native.simd_decoder():  # the same streams on the scalar decoder, side by side
                native.simd_decoder(False)
                try:
                    _, scalar_s = timed_map(lambda e: decode_samples(e, threads=1), encs, workers)
                finally:
                    native.simd_decoder(True)
            bits = sum(e.bits_per_value * e.numel for e in encs) / n_values
            row = {"method": f"{codec} {target}", "family": "vc", "codec": codec, "target": target, "bpw": bits,
                   "rel_mse": pooled_rel_mse(list(zip(decoded, weights.values(), strict=True))),
                   "max_rate_error": max(abs(e.bits_per_value - target) for e in encs),
                   "encode_Mvalues_per_s": n_values / enc_s / 1e6, "decode_Mvalues_per_s": n_values / dec_s / 1e6,
                   "samples_Mvalues_per_s": n_values / smp_s / 1e6,
                   "samples_scalar_Mvalues_per_s": n_values / scalar_s / 1e6 if scalar_s else None}  # fmt: skip
            rows.append(row)
            print(f"  {row['method']:<10} {bits:.3f} bpw  rel MSE {row['rel_mse']:.5f}  x bound "
                  f"{row['rel_mse'] / 2 ** (-2 * bits):.3f}  max|rate err| {row['max_rate_error']:.4f}  encode "
                  f"{row['encode_Mvalues_per_s']:.1f}  decode {row['decode_Mvalues_per_s']:.1f}  samples "
                  f"{row['samples_Mvalues_per_s']:.1f} Mv/s", flush=True)  # fmt: skip
    for r in rows:
        r["x_bound"] = r["rel_mse"] / 2.0 ** (-2 * r["bpw"])

    def mse_at(codec: str, bpw: float) -> float:  # a codec's MSE at another rate (log-linear in the rate)
        pts = sorted((r["bpw"], r["rel_mse"]) for r in rows if r["codec"] == codec)
        return float(np.exp(np.interp(bpw, [p[0] for p in pts], np.log([p[1] for p in pts]))))

    for r in rows:
        if r["family"] == "vc" and r["codec"] != "hevc" and "hevc" in args.codecs:
            r["mse_over_hevc"] = r["rel_mse"] / mse_at("hevc", r["bpw"])

    result = {"model": "SmolLM2-135M-Instruct (fp32 dequantized from Q4_1)", "layers": args.layers,
              "matrices": len(names), "values": n_values, "workers": workers, "rows": rows,
              "python": sys.version.split()[0], "torch": torch.__version__}  # fmt: skip
    (out / "bench_codec.json").write_text(json.dumps(result, indent=2))
    md = [f"{len(names)} SmolLM2-135M matrices (layers {args.layers}, {n_values / 1e6:.2f} M values), "
          f"{workers} cores, tensors side by side. Speeds in M values/s; `samples` = decode to the int8 "
          "rotated-domain samples; `scalar` = the same samples on the rANS decoder's scalar path (its SSE4.1 "
          "rounds off), same streams, measured right after.", "",
          "| method | target | all-in bpw | max rate err | rel. MSE | × bound | MSE / HEVC's | encode | decode | "
          "samples | scalar |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted((r for r in rows if r["family"] == "vc"), key=lambda r: (r["codec"], r["target"])):
        md.append(f"| {r['codec']} | {r['target']} | {r['bpw']:.3f} | {r['max_rate_error']:.4f} | {r['rel_mse']:.5f} "
                  f"| {r['x_bound']:.3f} | {r.get('mse_over_hevc', float('nan')):.3f} | "
                  f"{r['encode_Mvalues_per_s']:.1f} | {r['decode_Mvalues_per_s']:.1f} | "
                  f"{r['samples_Mvalues_per_s']:.1f} | {scalar_cell(r)} |")  # fmt: skip
    md += ["", "| RTN baseline | all-in bpw | rel. MSE | × bound |", "|---|---|---|---|"]
    for r in sorted((r for r in rows if r["family"] == "rtn"), key=lambda r: r["bpw"]):
        md.append(f"| {r['method']} | {r['bpw']:.3f} | {r['rel_mse']:.4f} | {r['x_bound']:.2f} |")
    (out / "bench_codec.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    plot(rows, out / "bench_codec.png")
    print(f"saved {out}/bench_codec.json, .md, .png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[str, list] = {}
    for r in rows:
        if r.get("artefact"):
            continue
        key = r["codec"] if r["family"] == "vc" else ("RTN +rot" if "+rot" in r["method"] else "RTN")
        groups.setdefault(key, []).append((r["bpw"], r["rel_mse"]))
    for key, pts in groups.items():
        pts.sort()
        ax.plot(*zip(*pts, strict=True), "x" if key.startswith("RTN") else "-o", label=key)
    xs = np.linspace(1.5, 5, 50)
    ax.plot(xs, 2.0 ** (-2 * xs), "k--", label="Gaussian bound $2^{-2R}$")
    finish_log_plot(fig, ax, "relative MSE", path, "SmolLM2-135M weight matrices: rate–distortion")


if __name__ == "__main__":
    main()
