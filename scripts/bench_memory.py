"""Peak memory of loading, quantizing and compressing (each case in a fresh process, one run).

Cases on SmolLM2-135M (the offline fp32 checkpoint): plain load + forward; quantize on
load (uniform fp32, Fisher bf16); ``vc-quant compress`` with defaults; ``vc-quant
compress --streaming``. Then a model built from a config whose fp32 weights are larger
than a memory limit set for the process: a cgroup (v1) memory limit, which counts
what the process really holds (private memory, and page cache it cannot give back). The
streaming path runs under it, the in-memory path cannot. Without a writable cgroup the
limit is skipped (and the table says so). Peak RSS is the process's ``ru_maxrss`` (it
includes the pages of memory-mapped checkpoint files); peak private memory is
``RssAnon`` sampled every 20 ms; "over imports" subtracts the value after importing
torch + transformers + vc_quant.

    python scripts/bench_memory.py [--big-layers 12] [--limit-gb 1.5] [--out results/memory]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from common import checkpoint_bytes, default_out  # scripts/common.py

HEADER = """
import json, resource, sys, threading, time, torch, transformers, vc_quant
def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
def anon_mb():  # private memory (RssAnon): what the process allocated, without mapped files
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return 0.0
peak_anon = [anon_mb()]
def sample():
    while True:
        peak_anon[0] = max(peak_anon[0], anon_mb())
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
base, base_anon = rss_mb(), anon_mb()
"""
FOOTER = """
peak_anon[0] = max(peak_anon[0], anon_mb())
print("RESULT " + json.dumps({"peak_mb": rss_mb(), "imports_mb": base, "peak_anon_mb": peak_anon[0],
                              "imports_anon_mb": base_anon}))
"""

CASES = {
    "plain load + forward (fp32)": """
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained(SRC, dtype=torch.float32)
        with torch.no_grad(): m(torch.tensor([[1, 2, 3, 4]]))
    """,
    "quantize on load, uniform (fp32)": """
        from transformers import AutoModelForCausalLM
        cfg = vc_quant.VcQuantizationConfig(bits=2.5, allocation="uniform", scaling="none")
        m = AutoModelForCausalLM.from_pretrained(SRC, dtype=torch.float32, quantization_config=cfg)
    """,
    "quantize on load, Fisher (bf16)": """
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained(SRC, dtype=torch.bfloat16,
                                                 quantization_config=vc_quant.VcQuantizationConfig(bits=2.5))
    """,
    "vc-quant compress (defaults)": """
        from vc_quant.cli import main
        assert main(["compress", SRC, DST, "--overwrite"]) == 0
    """,
    "vc-quant compress --streaming (uniform)": """
        from vc_quant.cli import main
        assert main(["compress", SRC, DST, "--overwrite", "--streaming", "--allocation", "uniform",
                     "--scaling", "none"]) == 0
    """,
}


CGROUP = Path("/sys/fs/cgroup/memory/vc_quant_bench")


def memory_cgroup(limit_bytes: int) -> Path | None:
    """A cgroup-v1 memory group limited to ``limit_bytes`` (root, cgroup v1), or None."""
    try:
        CGROUP.mkdir(exist_ok=True)
        (CGROUP / "memory.limit_in_bytes").write_text(str(limit_bytes))
        return CGROUP
    except OSError:
        return None


def run(code: str, src: str, dst: str, cgroup: Path | None = None) -> dict:
    prelude = f"SRC, DST = {src!r}, {dst!r}\n"
    if cgroup is not None:  # join the limited group before anything is allocated
        prelude += f"import os\nopen({str(cgroup / 'cgroup.procs')!r}, 'w').write(str(os.getpid()))\n"
    script = HEADER + prelude + textwrap.dedent(code) + FOOTER
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        if proc.returncode < 0:  # e.g. SIGKILL from the kernel's out-of-memory killer at the cgroup limit
            return {"ok": False, "error": f"killed by signal {-proc.returncode}", "seconds": seconds}
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["?"]
        return {"ok": False, "error": tail[0][:200], "seconds": seconds}
    return {"ok": True, "seconds": seconds, **json.loads(lines[-1][7:])}


def build_big(folder: Path, layers: int) -> int:
    """A Llama with SmolLM2's width x ``layers`` (random N(0, 0.02) weights), saved in fp32; returns bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if not (folder / "config.json").exists():
        config = LlamaConfig(vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                             num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=True)  # fmt: skip
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.02)
        model.save_pretrained(folder, max_shard_size="1GB")
    return checkpoint_bytes(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--big-layers", type=int, default=12, help="decoder layers of the config-built model")
    ap.add_argument("--limit-gb", type=float, default=1.5, help="memory limit (cgroup) of the big-model cases")
    ap.add_argument(
        "--out",
        default=default_out("memory/bench_memory"),
        help="output path stem (committed: results/memory/bench_memory)",
    )
    ap.add_argument("--only-big", action="store_true")
    args = ap.parse_args()
    from vc_quant.testing import smollm2_checkpoint

    src = str(smollm2_checkpoint())
    work = Path(".cache/bench_memory")
    work.mkdir(parents=True, exist_ok=True)
    model_mb = checkpoint_bytes(src) / 2**20
    rows = []
    if not args.only_big:
        for name, code in CASES.items():
            res = run(code, src, str(work / "dst"))
            rows.append({"case": name, "model": "SmolLM2-135M", "model_mb": model_mb, **res})
            print(json.dumps(rows[-1]), flush=True)
    big = work / f"big-{args.big_layers}"
    big_mb = build_big(big, args.big_layers) / 2**20
    limit = int(args.limit_gb * 2**30)
    cgroup = memory_cgroup(limit)
    # uniform allocation (a Fisher plan would come from `vc-quant plan`), the default codec (HEVC)
    streaming = ('from vc_quant.cli import main\nassert main(["compress", SRC, DST, "--overwrite", "--streaming", '
                 '"--allocation", "uniform", "--scaling", "none", "--max-shard-size", "300MB"]) == 0')  # fmt: skip
    in_memory = ('from vc_quant.cli import main\nassert main(["compress", SRC, DST, "--overwrite", "--allocation", '
                 '"uniform"]) == 0')  # fmt: skip
    for name, code in (("vc-quant compress --streaming, memory limit", streaming),
                       ("vc-quant compress (in memory), memory limit", in_memory)):  # fmt: skip
        res = run(code, str(big), str(work / "big-dst"), cgroup)
        rows.append({"case": name, "model": f"Llama {args.big_layers}x2048 (config, fp32)", "model_mb": big_mb,
                     "limit_mb": limit / 2**20 if cgroup else None, **res})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    write(rows, Path(args.out))


def write(rows: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2))
    lines = ["| case | model (checkpoint MB) | limit | peak RSS MB (over imports) | peak private MB (over imports) "
             "| private over imports / checkpoint | seconds |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        limit = f"{r['limit_mb']:.0f} MB" if r.get("limit_mb") else ("none (no cgroup)" if "limit_mb" in r else "-")
        if r["ok"]:
            over, anon = r["peak_mb"] - r["imports_mb"], r["peak_anon_mb"] - r["imports_anon_mb"]
            lines.append(f"| {r['case']} | {r['model']} ({r['model_mb']:.0f}) | {limit} | {r['peak_mb']:.0f} "
                         f"({over:.0f}) | {r['peak_anon_mb']:.0f} ({anon:.0f}) | {anon / r['model_mb']:.2f} | "
                         f"{r['seconds']:.0f} |")  # fmt: skip
        else:
            lines.append(f"| {r['case']} | {r['model']} ({r['model_mb']:.0f}) | {limit} | failed: {r['error']} "
                         f"| | | {r['seconds']:.0f} |")  # fmt: skip
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
