"""What a loaded model costs in memory and speed: bf16 dense vs vc_quant (dense / int8 / bitstream) vs HQQ.

Each row runs in its own process (peak RSS is per process), one after the other in one
run, on the same checkpoints, prompts and text:

* ``bf16``: the plain model in bf16 (this CPU's native 16-bit type; fp16 matmuls run ~9x
  slower here, see docs/results.md);
* ``vc-<resident>-<codec>`` (``vc-int8-rans``, ``vc-bitstream-hevc``, ``vc-bitstream-rans``, …):
  the vc checkpoint of that codec loaded with ``VcQuantizationConfig(resident=...)`` (bf16
  activations); bitstream residency decodes every layer at every forward (rANS: native CPU
  decoder into reused slots; HEVC: FFmpeg);
* ``hqq``: HQQ 4-bit g64 (the ``hqq`` package's ``HQQLinear`` on every decoder linear,
  bf16 compute, bit-packed storage) — the peer a user would otherwise pick.

Columns: bytes of the decoder linears and of the whole loaded model (parameters +
buffers + anything vc_quant holds), peak RSS, load seconds, prefill tokens/s (one
512-token sequence, median of 3), decode tokens/s (greedy, after a 64-token prompt),
perplexity on the usual windows (SmolLM2 only: 16 x 512 tokens of the offline
Wikipedia leads).

Models: SmolLM2-135M (real weights; vc at --bits, defaults) and a TinyLlama-1.1B-shaped
model built from a config (random N(0, 0.02) weights, for scaling; vc at --bits,
uniform allocation, no column scaling; no perplexity).

    python scripts/bench_resident.py [--models smollm2 1b] [--bits 2.5] [--big-layers 22] [--out results/resident]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from common import default_out  # scripts/common.py

ROWS = ("bf16", "vc-int8-rans", "vc-bitstream-hevc", "vc-bitstream-rans", "hqq", "vc-dense-rans", "vc-int8-hevc")
DEFAULT_ROWS = ROWS[:5]
CACHE = Path(".cache/bench_resident")


# --- checkpoints ---------------------------------------------------------------------------------
def prepare(
    model: str, bits: float, big_layers: int = 22, codecs: tuple[str, ...] = ("rans", "hevc")
) -> dict[str, str]:
    """Paths of the bf16 checkpoint and of a vc checkpoint per codec of ``model`` (built once, cached)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vc_quant.cli import main as vc_cli
    from vc_quant.testing import smollm2_checkpoint

    folder = CACHE / model
    if model == "1b":
        folder = CACHE / f"1b-{big_layers}layers"
    bf16 = folder / "bf16"
    src = smollm2_checkpoint()
    if not (bf16 / "config.json").exists():
        if model == "smollm2":
            m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
        else:
            from transformers import LlamaConfig, LlamaForCausalLM

            config = LlamaConfig(vocab_size=49152, hidden_size=2048, intermediate_size=5632,
                                 num_hidden_layers=big_layers, num_attention_heads=32, num_key_value_heads=4,
                                 tie_word_embeddings=True)  # fmt: skip
            torch.manual_seed(0)
            m = LlamaForCausalLM(config).to(torch.bfloat16)
            with torch.no_grad():
                for p in m.parameters():
                    if p.dim() == 2:
                        p.normal_(0, 0.02)
        m.save_pretrained(bf16)
        AutoTokenizer.from_pretrained(src).save_pretrained(bf16)
    paths = {"bf16": str(bf16)}
    for codec in codecs:
        vc = folder / f"vc-{codec}-{bits}"
        if not (vc / "config.json").exists():
            args = ["compress", str(bf16), str(vc), "--bits", str(bits), "--overwrite", "--codec", codec]
            if model != "smollm2":
                args += ["--streaming", "--allocation", "uniform", "--scaling", "none"]
            t0 = time.perf_counter()
            assert vc_cli(args) == 0
            print(f"{model}: compressed with {codec} in {time.perf_counter() - t0:.0f} s", flush=True)
        paths[codec] = str(vc)
    return paths


# --- one row (child process) ---------------------------------------------------------------------
def load_row(row: str, paths: dict[str, str]):
    from transformers import AutoModelForCausalLM

    import vc_quant

    if row.startswith("vc-"):
        _, resident, codec = row.split("-")
        config = vc_quant.VcQuantizationConfig(resident=resident)
        return AutoModelForCausalLM.from_pretrained(paths[codec], dtype=torch.bfloat16, quantization_config=config)
    model = AutoModelForCausalLM.from_pretrained(paths["bf16"], dtype=torch.bfloat16)
    if row == "hqq":
        os.environ.setdefault("DISABLE_CUDA", "1")
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        quant = BaseQuantizeConfig(nbits=4, group_size=64)
        for name, module in list(model.named_modules()):
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, HQQLinear(module, quant_config=quant,
                        compute_dtype=torch.bfloat16, device="cpu", del_orig=True))  # fmt: skip
    return model


def linear_bytes(model) -> int:
    """Bytes of the decoder linears' weights as held (quantized storage and scales included)."""
    from vc_quant import VcLinear

    total = 0
    for name, module in model.named_modules():
        if ".layers." not in name:
            continue
        if isinstance(module, VcLinear):
            total += module.weight.numel() * module.weight.element_size() + module.held_bytes()
        elif isinstance(module, torch.nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
        elif type(module).__name__ == "HQQLinear":
            tensors = [v for v in module.state_dict().values() if isinstance(v, torch.Tensor)]
            total += sum(t.numel() * t.element_size() for t in tensors if t.dim() > 0)
    return total


def record_bytes(model) -> int:
    """Bytes of the checkpoint records of the decoder linears (bitstreams, maps, metadata): the compressed size."""
    from vc_quant import VcLinear

    return sum(m.source.nbytes for n, m in model.named_modules() if isinstance(m, VcLinear) and m.source is not None)


def model_bytes(model) -> int:
    import vc_quant

    counts = vc_quant.memory_bytes(model)
    hqq_extra = sum(
        sum(v.numel() * v.element_size() for v in m.state_dict().values() if isinstance(v, torch.Tensor))
        for m in model.modules() if type(m).__name__ == "HQQLinear"
    )  # fmt: skip  # HQQLinear keeps its packed weights and scales outside parameters/buffers
    return counts["total"] + hqq_extra


def peak_rss_mb() -> float:
    """This process's peak RSS (``VmHWM``; ``ru_maxrss`` would carry the parent's peak across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(row: str, paths: dict[str, str], new_tokens: int, ppl_windows: int) -> dict:
    from transformers import AutoTokenizer

    from vc_quant.evaluation import load_text, perplexity

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = load_row(row, paths)
    load_s = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(paths["bf16"])
    vocab = model.config.vocab_size
    ids = torch.randint(10, vocab - 10, (1, 512), generator=torch.Generator().manual_seed(1))
    out = {
        "row": row,
        "load_s": load_s,
        "linear_bytes": linear_bytes(model),
        "model_bytes": model_bytes(model),
        "record_bytes": record_bytes(model),
    }
    with torch.no_grad():
        model(ids[:, :64])  # warm-up
        times = []
        for _ in range(3):
            t = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - t)
        out["prefill_tok_s"] = 512 / statistics.median(times)
        prompt = ids[:, :64]
        t = time.perf_counter()
        gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False)  # fmt: skip
        out["decode_tok_s"] = (gen.shape[1] - 64) / (time.perf_counter() - t)
    if ppl_windows:
        res = perplexity(model, tok, load_text("wiki-offline"), seqlen=512, max_windows=ppl_windows, bos=True)
        out["ppl"] = res["ppl"]
    window = getattr(model, "vc_bitstream_window", None)
    out["window_peak_bytes"] = window.peak_bytes if window is not None else 0
    out["peak_rss_mb"] = peak_rss_mb()
    return out


# --- driver ---------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2", "1b"], choices=["smollm2", "1b"])
    ap.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), choices=ROWS)
    ap.add_argument("--bits", type=float, default=2.5)
    ap.add_argument(
        "--big-layers",
        type=int,
        default=22,
        help="decoder layers of the TinyLlama-shaped model (22: 1.1B; fewer: same shapes, shorter run)",
    )
    ap.add_argument("--out", default=default_out("resident"), help="results folder (committed: results/resident)")
    ap.add_argument("--child", nargs=4, metavar=("ROW", "PATHS", "NEW_TOKENS", "PPL_WINDOWS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        row, paths, new_tokens, windows = args.child
        print("RESULT " + json.dumps(child(row, json.loads(paths), int(new_tokens), int(windows))), flush=True)
        return
    rows = []
    for model in args.models:
        codecs = tuple(dict.fromkeys(r.split("-")[2] for r in args.rows if r.startswith("vc-")))
        paths = prepare(model, args.bits, args.big_layers, codecs)
        new_tokens, windows = (32, 16) if model == "smollm2" else (8, 0)
        for row in args.rows:
            cmd = [sys.executable, __file__, "--child", row, json.dumps(paths), str(new_tokens), str(windows)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if not lines:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{model} {row} failed")
            rows.append({"model": model, **json.loads(lines[-1][7:])})
            print(json.dumps(rows[-1]), flush=True)
    write(rows, Path(args.out), args.bits)


def write(rows: list[dict], out: Path, bits: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_resident.json").write_text(json.dumps(rows, indent=2))
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == model]
        ref = next((r for r in group if r["row"] == "bf16"), group[0])
        lines += [f"**{model}** (vc at {bits} bits/weight; ratios vs bf16 dense, same run)", "",
                  "| row | linears MB (x bf16) | linears / records | window peak MB | model MB | peak RSS MB | "
                  "load s | prefill tok/s (x bf16) | decode tok/s (x bf16) | perplexity |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in group:
            ppl = f"{r['ppl']:.3f}" if "ppl" in r else "-"
            vs_records = f"{r['linear_bytes'] / r['record_bytes']:.3f}" if r.get("record_bytes") else "-"
            lines.append(
                f"| {r['row']} | {r['linear_bytes'] / 1e6:.1f} ({r['linear_bytes'] / ref['linear_bytes']:.3f}) | "
                f"{vs_records} | {r.get('window_peak_bytes', 0) / 1e6:.1f} | {r['model_bytes'] / 1e6:.1f} | "
                f"{r['peak_rss_mb']:.0f} | {r['load_s']:.1f} | "
                f"{r['prefill_tok_s']:.0f} ({r['prefill_tok_s'] / ref['prefill_tok_s']:.2f}) | "
                f"{r['decode_tok_s']:.2f} ({r['decode_tok_s'] / ref['decode_tok_s']:.2f}) | {ppl} |"
            )
        lines.append("")
    (out / "bench_resident.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
