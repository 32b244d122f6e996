"""Rate–distortion sweep on a real model: FP reference, RTN / HQQ / SINQ peers and vc_quant's codecs, one run.

Every method quantizes the same decoder linear weights of the same model (embeddings and
lm_head stay full precision); every model is evaluated on the same text windows
(perplexity, GPTQ protocol, BOS — or EOS for tokenizers without one — first) and the same
PIQA subset (lm-eval harness, offline copy of the validation split). Writes a markdown table,
JSON and a PNG plot (perplexity vs all-in bits per weight).

    python scripts/rd_sweep.py --model smollm2|qwen|PATH [--codecs rans hevc av1] [--vc-bits 2.5 3.0 3.5 4.0]
                               [--seeds 0 1 2] [--windows 16] [--piqa-limit 200] [--out results/rd_sweep/NAME]

Peers (``bash scripts/setup_bench.sh`` installs them; each with its own CPU quantizer, storage
counted all-in at the dtype it would be stored in):

* RTN: asymmetric, fp16 scale + fp16 min per group. 4-bit g32 without rotation reproduces the
  Q4_1 grid SmolLM2 was shipped in (zero error): run only when asked, flagged, never a baseline;
  Qwen2.5-Coder's weights passed through AWQ 4-bit g128, so 4-bit g128 peers get a free ride
  there too — the defaults compare at g64 and at 3 bits.
* HQQ: its half-quadratic optimiser (``optimize=True, round_zero=True, axis=1``); nbits + fp16
  scale + fp16 zero per group.
* SINQ: Sinkhorn-normalised dual scales (``method="sinq"``, its default); nbits + fp16 scale +
  fp16 zero per group + one fp16 second-axis scale per input column.

vc_quant runs use the defaults (Fisher allocation and column scaling) unless ``--vc-set``
changes them. The Fisher statistics do not depend on the codec, the rate or the rotation seed,
so they are computed once per model and reused by later vc runs of the same run (the first
vc row's ``quantize_seconds`` includes the pass; the rest are marked ``fisher cached``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from common import decoder_linears, default_out, finish_log_plot  # scripts/common.py
from transformers import AutoModelForCausalLM, AutoTokenizer

import vc_quant
from vc_quant import allocation
from vc_quant.evaluation import load_text, perplexity, write_offline_tasks
from vc_quant.rtn import rtn_bits_per_value, rtn_quantize
from vc_quant.testing import asset_dir, qwen_checkpoint, smollm2_checkpoint

logger = logging.getLogger("rd_sweep")
MODELS = {"smollm2": smollm2_checkpoint, "qwen": qwen_checkpoint}
FAMILY_ORDER = {"fp": 0, "rtn": 1, "hqq": 2, "sinq": 3, "vc": 4}


class Evaluator:
    def __init__(self, tok, text: str, args) -> None:
        self.tok, self.text, self.args = tok, text, args
        self.tasks = None
        if args.piqa_limit:
            from lm_eval.tasks import TaskManager

            self.tasks = TaskManager(include_path=str(write_offline_tasks(asset_dir() / "lm_eval_tasks")))

    def __call__(self, model) -> dict:
        t0 = time.perf_counter()
        ppl = perplexity(model, self.tok, self.text, self.args.seqlen, self.args.windows, bos=True)["ppl"]
        out = {"ppl": ppl}
        if self.tasks is not None:
            from lm_eval import simple_evaluate
            from lm_eval.models.huggingface import HFLM

            lm = HFLM(pretrained=model, tokenizer=self.tok, batch_size=16, device="cpu")
            res = simple_evaluate(model=lm, tasks=["piqa_offline"], limit=self.args.piqa_limit,
                                  task_manager=self.tasks, verbosity="ERROR")  # fmt: skip
            out["piqa_acc"] = res["results"]["piqa_offline"]["acc,none"]
        out["eval_seconds"] = time.perf_counter() - t0
        return out


def cache_fisher() -> dict:
    """Memoise the Fisher pass by (model path, parameter names) for the vc runs of this process."""
    cache: dict = {}
    original = allocation.fisher_sensitivity

    def cached(model, param_names, **kwargs):
        key = (model.name_or_path, tuple(param_names), tuple(sorted((k, str(v)) for k, v in kwargs.items())))
        if key not in cache:
            cache[key] = original(model, param_names, **kwargs)
        return cache[key]

    allocation.fisher_sensitivity = cached
    return cache


def open_run(args) -> tuple[Path, str, object, Evaluator]:
    """What every quality script starts with: quiet logs, the results folder, the model path,
    its tokenizer and the evaluator of ``args``' protocol (also used by scripts/ablation.py)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("transformers", "lm_eval", "urllib3", "httpx", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src = str(MODELS[args.model]()) if args.model in MODELS else args.model
    tok = AutoTokenizer.from_pretrained(src)
    return out, src, tok, Evaluator(tok, load_text(args.text), args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="smollm2 | qwen | a plain checkpoint folder")
    ap.add_argument("--codecs", nargs="*", default=["rans", "hevc", "av1"])
    ap.add_argument("--vc-bits", type=float, nargs="*", default=[2.5, 3.0, 3.5, 4.0])
    ap.add_argument("--seeds", type=int, nargs="*", default=[0], help="rotation seeds of the vc runs")
    ap.add_argument("--vc-set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config fields for the vc_quant runs, e.g. allocation=uniform scaling=none")  # fmt: skip
    ap.add_argument("--vc-label", default="", help="names the vc_quant variant in the table")
    ap.add_argument("--append", action="store_true", help="add rows to an existing rd_sweep.json in --out")
    ap.add_argument("--rtn", nargs="*", default=["4:64", "3:64", "3:128"], metavar="BITS:GROUP")
    ap.add_argument("--rtn-rotation", action="store_true", help="also RTN after vc_quant's rotation")
    ap.add_argument("--hqq", nargs="*", default=["4:64", "3:64", "3:128"], metavar="BITS:GROUP")
    ap.add_argument("--sinq", nargs="*", default=["4:64", "3:64", "3:128"], metavar="BITS:GROUP")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--text", default="wiki-offline", choices=["wiki-offline", "wikitext2"])
    ap.add_argument("--piqa-limit", type=int, default=200, help="PIQA questions (0: skip PIQA)")
    ap.add_argument("--only", choices=["fp", "rtn", "hqq", "sinq", "vc"], nargs="*",
                    default=["fp", "rtn", "hqq", "sinq", "vc"])  # fmt: skip
    ap.add_argument("--out", default=default_out("rd_sweep"), help="results folder (committed: results/rd_sweep/…)")
    args = ap.parse_args()
    out, src, _tok, evaluate = open_run(args)
    rows: list[dict] = []
    if args.append and (out / "rd_sweep.json").exists():
        rows = json.loads((out / "rd_sweep.json").read_text())["rows"]

    def record(row: dict) -> None:
        rows.append(row)
        logger.info("%-34s bpw %6.3f  ppl %10.2f  piqa %s", row["method"], row["bpw"], row["ppl"],
                    f"{row['piqa_acc']:.3f}" if "piqa_acc" in row else "-")  # fmt: skip
        (out / "rd_sweep.json").write_text(json.dumps({"args": vars(args), "model": src, "rows": rows}, indent=2))

    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    linears = decoder_linears(base)
    original = {n: m.weight.detach().clone() for n, m in linears.items()}
    n_values = sum(w.numel() for w in original.values())

    def peer_rows(model, family: str, specs: list[str], quantize, bpw_of, rotation: bool = False) -> None:
        for spec in specs:
            bits, group = (int(v) for v in spec.split(":"))
            t0 = time.perf_counter()
            with torch.no_grad():
                for n, m in linears.items():
                    m.weight.copy_(quantize(original[n], bits, group))
            q_s = time.perf_counter() - t0
            bpw = sum(bpw_of(bits, group, w) * w.numel() for w in original.values()) / n_values
            artefact = family == "rtn" and bits == 4 and group == 32 and not rotation and args.model == "smollm2"
            label = f"{family.upper()} {bits}b g{group}" + (" +rot" if rotation else "") + (
                " (Q4_1 grid!)" if artefact else "")  # fmt: skip
            record({"method": label, "family": family, "bits": bits, "group": group, "rotation": rotation,
                    "artefact": artefact, "bpw": bpw, "quantize_seconds": q_s, **evaluate(model)})  # fmt: skip
        with torch.no_grad():
            for n, m in linears.items():
                m.weight.copy_(original[n])

    if "fp" in args.only:
        record({"method": "FP (fp32 ref)", "family": "fp", "bpw": 16.0, "quantize_seconds": 0.0, **evaluate(base)})
    if "rtn" in args.only:
        for rot in (False, True) if args.rtn_rotation else (False,):
            peer_rows(base, "rtn", args.rtn, lambda w, b, g, r=rot: rtn_quantize(w, b, g, rotation=r),
                      lambda b, g, w: rtn_bits_per_value(b, g, w.shape[-1]), rotation=rot)  # fmt: skip
    if "hqq" in args.only:
        peer_rows(base, "hqq", args.hqq, hqq_quantize, lambda b, g, w: b + 32.0 / g)
    if "sinq" in args.only:
        # + one fp16 second-axis scale per input column, shared by the rows
        peer_rows(base, "sinq", args.sinq, sinq_quantize, lambda b, g, w: b + 32.0 / g + 16.0 / w.shape[0])
    del base
    if "vc" in args.only:
        cache = cache_fisher()
        changes = dict(_parse_set(item) for item in args.vc_set)
        for codec in args.codecs:
            for bits in args.vc_bits:
                for seed in args.seeds:
                    cfg = vc_quant.VcQuantizationConfig(**{"bits": bits, "codec": codec, "seed": seed, **changes})
                    cached = bool(cache)
                    t0 = time.perf_counter()
                    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg, dtype=torch.float32)
                    q_s = time.perf_counter() - t0
                    rep = model.vc_quant_report
                    variant = codec + (f", {args.vc_label}" if args.vc_label else "")
                    record({"method": f"vc {variant} {bits}" + (f" seed {seed}" if len(args.seeds) > 1 else ""),
                            "family": "vc", "codec": codec, "target": bits, "seed": seed, "variant": variant,
                            "bpw": rep.bits_per_weight, "quantize_seconds": q_s, "fisher_cached": cached,
                            "config": cfg.to_dict(), **evaluate(model)})  # fmt: skip
                    del model

    write_markdown(rows, out / "rd_sweep.md", args, src)
    plot(rows, out / "rd_sweep.png", Path(src).name)
    print((out / "rd_sweep.md").read_text())


def hqq_quantize(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """HQQ quantize + dequantize on the CPU (pure-torch path of the hqq package)."""
    import os

    os.environ.setdefault("DISABLE_CUDA", "1")
    from hqq.core.quantize import Quantizer

    if w.numel() % group:  # HQQ groups the flattened weight (groups may span rows)
        raise SystemExit(f"HQQ g{group}: {tuple(w.shape)} does not divide into groups of {group}")
    wq, meta = Quantizer.quantize(w.float(), nbits=bits, group_size=group, optimize=True, round_zero=True, axis=1,
                                  bitpack=False, device="cpu")  # fmt: skip
    meta["compute_dtype"] = torch.float32
    return Quantizer.dequantize(wq, meta).reshape(w.shape).to(w.dtype)


def sinq_quantize(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """SINQ quantize + dequantize on the CPU (its plain-torch quantizer, its default method)."""
    peers = asset_dir() / "peers"
    if not (peers / "sinq").is_dir():
        raise SystemExit(f"SINQ is not installed in {peers}; run bash scripts/setup_bench.sh")
    if str(peers) not in sys.path:
        sys.path.insert(0, str(peers))  # its own folder: its sitecustomize.py must not patch transformers
    from sinq.quantizer import Quantizer

    wq, meta = Quantizer.quantize(w.float(), None, nbits=bits, group_size=group, axis=1, bitpack=False,
                                  device="cpu", tiling_mode="1D", method="sinq")  # fmt: skip
    meta["compute_dtype"] = torch.float32
    return Quantizer.dequantize(wq, meta).reshape(w.shape).to(w.dtype)


def _parse_set(item: str) -> tuple[str, object]:
    key, sep, value = item.partition("=")
    if not sep:
        raise SystemExit(f"--vc-set {item!r}: expected KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a plain string


def write_markdown(rows: list[dict], path: Path, args, src: str) -> None:
    fp = next((r for r in rows if r["family"] == "fp"), None)
    lines = [
        f"Model: `{Path(src).name}`; all decoder linear weights quantized; text: {args.text}, "
        f"{args.windows} windows x {args.seqlen} tokens (BOS/EOS first); PIQA: first {args.piqa_limit} of the "
        "validation split (lm-eval, offline copy). Peers with their own CPU quantizers, every stored scale counted.",
        "",
        "| method | all-in bpw | perplexity | × FP | PIQA acc | quantize s | eval s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (FAMILY_ORDER[r["family"]], r.get("codec", ""), -r["bpw"])):
        piqa = f"{r['piqa_acc']:.3f}" if "piqa_acc" in r else "-"
        ratio = f"{r['ppl'] / fp['ppl']:.3f}" if fp else "-"
        cached = " (Fisher cached)" if r.get("fisher_cached") else ""
        lines.append(f"| {r['method']} | {r['bpw']:.3f} | {r['ppl']:.2f} | {ratio} | {piqa} | "
                     f"{r['quantize_seconds']:.1f}{cached} | {r['eval_seconds']:.1f} |")  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list] = {}
    for r in rows:
        if r["family"] == "fp" or r.get("artefact") or r.get("seed", 0) != 0:
            continue  # one curve per method: the seed spread is in the table
        key = f"vc_quant {r['variant']}" if r["family"] == "vc" else r["family"].upper() + (
            " +rot" if r.get("rotation") else "")  # fmt: skip
        series.setdefault(key, []).append((r["bpw"], r["ppl"]))
    for key, pts in series.items():
        pts.sort()
        ax.plot(*zip(*pts, strict=True), "-o" if key.startswith("vc_quant") else "x--", label=key)
    fp = [r for r in rows if r["family"] == "fp"]
    if fp:
        ax.axhline(fp[0]["ppl"], color="k", ls="--", label="full precision")
    finish_log_plot(fig, ax, "perplexity", path, f"{title}: perplexity vs all-in bits per weight")


if __name__ == "__main__":
    main()
