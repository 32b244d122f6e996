"""Which encoder knobs lower weight MSE per bit? One run, same matrices, same target rates.

For each encoder setting (codec + preset + extra encoder parameters) every matrix is encoded at
each target rate through the full codec (rotation, 8-bit map, rate control), and
the table gives the all-in rate, the relative MSE, its ratio to the Gaussian
Shannon bound 2^(-2R) at the achieved rate, and the encode time (2 cores here:
compare times within one run only).

    python scripts/encoder_knobs.py [--layers 10] [--targets 2.5 4.0] [--out results/codec/encoder_knobs.md]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import default_out, smollm2_state  # scripts/common.py

from vc_quant import decode_tensor, encode_tensor

SETTINGS = [  # (label, codec, preset, encoder_params)
    ("superfast, no RDOQ", "hevc", "superfast", ""),
    ("superfast + rdoq-level=2 (default)", "hevc", "superfast", "rdoq-level=2"),
    ("superfast + rdoq-level=1", "hevc", "superfast", "rdoq-level=1"),
    ("superfast + tu-intra-depth=3", "hevc", "superfast", "tu-intra-depth=3"),
    ("superfast + rd=4", "hevc", "superfast", "rd=4"),
    ("superfast + ctu=32", "hevc", "superfast", "ctu=32"),
    ("superfast + no-signhide", "hevc", "superfast", "no-signhide=1"),
    ("slow", "hevc", "slow", ""),
    ("av1 preset 10", "av1", "10", ""),
    ("av1 preset 8", "av1", "8", ""),
    ("av1 preset 6", "av1", "6", ""),
    ("av1 preset 4", "av1", "4", ""),
    ("av1 preset 8, enable-dlf=0", "av1", "8", "enable-dlf=0"),
    ("av1 preset 8, tune=0", "av1", "8", "tune=0"),
    ("av1 preset 8, tune=2", "av1", "8", "tune=2"),
]
MATRICES = ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[10])
    ap.add_argument("--targets", type=float, nargs="+", default=[2.5, 4.0])
    ap.add_argument("--only", nargs="*", default=[], help="run only settings whose label contains one of these")
    ap.add_argument(
        "--out",
        default=default_out("codec/encoder_knobs.md"),
        help="markdown file (committed: results/codec/encoder_knobs.md)",
    )
    args = ap.parse_args()
    state = smollm2_state()
    mats = {f"layers.{i}.{m}": state[f"model.layers.{i}.{m}.weight"] for i in args.layers for m in MATRICES}
    lines = [
        f"Matrices: SmolLM2-135M {sorted(mats)}; full codec (rotation, rate control); pooled over matrices.",
        "",
        "| setting | target | all-in bpw | rel MSE | x bound | encode s |",
        "|---|---|---|---|---|---|",
    ]
    settings = [s for s in SETTINGS if not args.only or any(o in s[0] for o in args.only)]
    for label, codec, preset, extra in settings:
        for target in args.targets:
            err = ref = bits = 0.0
            numel = 0
            t0 = time.perf_counter()
            encs = {
                k: encode_tensor(w, target, name=k, codec=codec, preset=preset, encoder_params=extra)
                for k, w in mats.items()
            }
            secs = time.perf_counter() - t0
            for k, w in mats.items():
                err += float(((decode_tensor(encs[k]).float() - w.float()) ** 2).sum())
                ref += float((w.float() ** 2).sum())
                bits += encs[k].bits_per_value * w.numel()
                numel += w.numel()
            rate, rel = bits / numel, err / ref
            row = f"| {label} | {target} | {rate:.3f} | {rel:.5f} | {rel / 2 ** (-2 * rate):.3f} | {secs:.1f} |"
            print(row, flush=True)
            lines.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
