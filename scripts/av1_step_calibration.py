"""Measure SVT-AV1's effective quantiser step per qp (the table behind ``av1_log2_step``).

AV1's quantiser step is a lookup table over a 0..255 index that SVT-AV1's qp
(1..63) addresses; it is not exponential in qp like H.26x's. Rate control needs
log2 of the step per qp, so it is measured: a uniform-noise picture (high-rate
regime: MSE ≈ step²/12) is encoded at each qp and sqrt(12·MSE) is reported, next
to the value the backend uses.

    python scripts/av1_step_calibration.py [--preset 8] [--qps 9 12 ... 63]
"""

from __future__ import annotations

import argparse
import math

import numpy as np

from vc_quant.codec.video.backends import EncoderSettings, get_backend
from vc_quant.codec.video.backends.pyav import av1_log2_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="8")
    ap.add_argument("--qps", type=int, nargs="+", default=list(range(9, 64, 3)))
    ap.add_argument("--size", type=int, nargs=2, default=[512, 256], metavar=("W", "H"))
    args = ap.parse_args()
    w, h = args.size
    backend = get_backend("av1")
    luma = np.random.default_rng(1).integers(0, 256, (h, w)).astype(np.uint8)
    frame = np.full((h * 3 // 2, w), 128, np.uint8)
    frame[:h] = luma
    print("| qp | bits/pixel (luma) | MSE | measured log2 sqrt(12 MSE) | table |")
    print("|---|---|---|---|---|")
    for qp in args.qps:
        packet = backend.encode([frame], qp, EncoderSettings(preset=args.preset))
        out = backend.decode(packet, w, h)[0][:h].astype(np.float64)
        mse = float(((out - luma) ** 2).mean())
        bpp = 8 * len(packet[0]) / (w * h)
        print(f"| {qp} | {bpp:.3f} | {mse:.2f} | {0.5 * math.log2(12 * mse):.3f} | {av1_log2_step(qp):.3f} |")


if __name__ == "__main__":
    main()
