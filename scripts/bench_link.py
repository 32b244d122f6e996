"""DDP step times over a real rate-limited link: two network namespaces, a veth pair, ``tc`` shaping.

Needs root (``ip netns``, ``tc``); never run by CI. The script creates two namespaces
(``vcq-link-a``, ``vcq-link-b``) joined by a veth pair with 10.231.0.1/24 and 10.231.0.2/24,
shapes both directions with a token-bucket filter at each rate, runs one rank of
``scripts/bench_ddp.py``'s worker in each namespace (gloo over the veth), and removes the
namespaces afterwards (also on errors). No traffic leaves the two namespaces.

Rows: fp32 all-reduce, PowerSGD rank 1 and vc_quant (in-flight default codec) at 2.0 bits;
step times and bytes are the means over the steps after the first ``--warmup`` (PowerSGD
switches on at step 2). Printed beside each the projection ``compute + codec + bytes·8 / rate`` from the same
run's loopback measurement in results/ddp (when given with ``--projection``).

    sudo python scripts/bench_link.py [--rates 100mbit 1gbit] [--steps 12] [--out results/ddp/link]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import default_out  # scripts/common.py

NS = ("vcq-link-a", "vcq-link-b")
DEV = ("vcq-a0", "vcq-b0")
ADDR = ("10.231.0.1", "10.231.0.2")
ROWS = ["fp32", "powersgd-1", "vc-2.0"]
RATES_BPS = {"100mbit": 1e8, "1gbit": 1e9, "10gbit": 1e10}


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def setup() -> None:
    teardown()
    for ns in NS:
        sh("ip", "netns", "add", ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh("ip", "link", "add", DEV[0], "netns", NS[0], "type", "veth", "peer", "name", DEV[1], "netns", NS[1])
    for ns, dev, addr in zip(NS, DEV, ADDR, strict=True):
        sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
        sh("ip", "-n", ns, "link", "set", dev, "up")


def shape(rate: str) -> None:
    """Token-bucket shaping at ``rate`` on both ends (each direction limited)."""
    burst = max(32 * 1024, int(RATES_BPS[rate] / 8 / 250))  # ~4 ms of traffic
    for ns, dev in zip(NS, DEV, strict=True):
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root", check=False)
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
           "burst", str(burst), "latency", "100ms")  # fmt: skip


def teardown() -> None:
    for ns in NS:
        sh("ip", "netns", "del", ns, check=False)


def run_row(row: str, steps: int, raw: Path, codec: str) -> dict:
    port = 29500 + int(time.time()) % 1000
    procs = []
    for rank, (ns, dev) in enumerate(zip(NS, DEV, strict=True)):
        env = dict(os.environ, GLOO_SOCKET_IFNAME=dev, OMP_NUM_THREADS="1")
        cmd = ["ip", "netns", "exec", ns, sys.executable, str(Path(__file__).parent / "bench_ddp.py"),
               "--worker", str(rank), "--rows", row, "--steps", str(steps), "--seeds", "0", "--addr", ADDR[0],
               "--port", str(port), "--out", str(raw.parent)] + (["--codec", codec] if codec else [])  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env))
    for p in procs:
        if p.wait(timeout=3600) != 0:
            raise SystemExit(f"{row}: a rank failed (exit {p.returncode})")
    return torch.load(raw / f"{row}-seed0-rank0.pt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", nargs="+", default=["100mbit", "1gbit"], choices=sorted(RATES_BPS))
    ap.add_argument("--rows", nargs="+", default=ROWS)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--codec", default="")
    ap.add_argument("--projection", default=None, help="bench_ddp.json of a loopback run (for the projection)")
    ap.add_argument("--out", default=default_out("ddp_link"), help="results folder (committed: results/ddp/link)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench_link.py needs root (ip netns, tc)")
    out = Path(args.out)
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    loop = {}
    if args.projection:
        from bench_ddp import aggregate

        runs = json.loads(Path(args.projection).read_text())["runs"]
        loop = {r["row"]: r for r in aggregate(runs)}
    from bench_ddp import windows

    windows(args.steps, 2, 0)  # tokenize once here: the ranks would race to write the cache
    rows = []
    try:
        setup()
        for rate in args.rates:
            shape(rate)
            for row in args.rows:
                res = run_row(row, args.steps, raw, args.codec)
                steady = res["step_s"][args.warmup :]
                # bytes of the same steady steps (PowerSGD sends fp32 for its first 2 steps; the rate
                # control of vc settles over the first few)
                cum = res["sent_bytes"]
                sent = (cum[-1] - cum[args.warmup - 1]) / (len(cum) - args.warmup)
                entry = {"rate": rate, "row": row, "step_s": sum(steady) / len(steady), "bytes_per_step": sent,
                         "bits_per_element": 8 * sent / res["elements_per_step"]}  # fmt: skip
                if row in loop and "fp32" in loop:
                    ref = loop["fp32"]["step_s"]
                    extra = loop[row]["codec_s"] if row.startswith("vc") else max(0.0, loop[row]["step_s"] - ref)
                    entry["projected_s"] = ref + extra + loop[row]["bytes_per_step"] * 8 / RATES_BPS[rate]
                rows.append(entry)
                print(json.dumps(entry), flush=True)
    finally:
        teardown()
    (out / "bench_link.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    lines = ["2 ranks in two network namespaces over a veth pair shaped by tc (tbf, both directions); "
             f"mean step time and bytes after {args.warmup} warm-up steps of {args.steps}.", "",
             "| link | row | measured step s | projected step s (loopback run) | bits/element on the wire |",
             "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        proj = f"{r['projected_s']:.3f}" if "projected_s" in r else "-"
        lines.append(f"| {r['rate']} | {r['row']} | {r['step_s']:.3f} | {proj} | {r['bits_per_element']:.3f} |")
    (out / "bench_link.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
