"""Rate–distortion sweep on a real model: FP reference, RTN baselines and vc_quant, one run.

Every method quantizes the same decoder linear weights of the same model
(embeddings/lm_head stay full precision), then each model is evaluated on the
same text windows (perplexity, GPTQ protocol with BOS) and the same PIQA subset
(lm-eval harness, offline copy of the validation split). Writes a markdown
table, JSON and a PNG plot (perplexity vs all-in bits per weight).

    python scripts/rd_sweep.py [--vc-bits 2.0 2.5 3.0 3.5] [--windows 16] [--seqlen 512]
                               [--piqa-limit 500] [--out results/rd_sweep] [--only vc]

RTN baselines: asymmetric, fp16 scale + fp16 min per group counted in bpw;
4-bit g32 without rotation reproduces the Q4_1 grid SmolLM2 was shipped in
(zero error) — it is run, flagged, and never used as a baseline.

HQQ baselines (the best calibration-free peer; ``bash scripts/setup_bench.sh`` installs
the ``hqq`` package): its own half-quadratic optimiser of scale and zero per group
(``Quantizer.quantize(..., optimize=True, round_zero=True, axis=1)``), its own storage
accounting: nbits + fp16 scale + fp16 zero per group (4-bit g64 = 4.5 bpw).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch
from common import decoder_linears, default_out, finish_log_plot  # scripts/common.py
from transformers import AutoModelForCausalLM, AutoTokenizer

import vc_quant
from vc_quant.evaluation import load_text, perplexity, write_offline_tasks
from vc_quant.rtn import rtn_bits_per_value, rtn_quantize
from vc_quant.testing import asset_dir, smollm2_checkpoint

logger = logging.getLogger("rd_sweep")


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="plain checkpoint (default: offline SmolLM2-135M fp32)")
    ap.add_argument("--vc-bits", type=float, nargs="*", default=[2.0, 2.5, 3.0, 3.5])
    ap.add_argument(
        "--vc-set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="config fields for the vc_quant runs, e.g. seed=1 encoder_params=rdoq-level=2",
    )
    ap.add_argument("--vc-label", default="", help="names the vc_quant variant in the table (e.g. the config)")
    ap.add_argument("--vc-config", default=None, help="preset file for the vc_quant runs")
    ap.add_argument("--vc-allocation", nargs="*", default=["fisher"], choices=["uniform", "fisher"])
    ap.add_argument("--append", action="store_true", help="add rows to an existing rd_sweep.json in --out")
    ap.add_argument("--rtn-bits", type=int, nargs="*", default=[2, 3, 4])
    ap.add_argument("--rtn-groups", type=int, nargs="*", default=[32, 64, 128])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--text", default="wiki-offline", choices=["wiki-offline", "wikitext2"])
    ap.add_argument("--piqa-limit", type=int, default=500, help="PIQA questions (0: skip PIQA)")
    ap.add_argument(
        "--hqq",
        nargs="*",
        default=["4:64", "4:128", "3:64"],
        metavar="BITS:GROUP",
        help="HQQ baselines (nbits:group_size)",
    )
    ap.add_argument("--only", choices=["fp", "rtn", "hqq", "vc"], nargs="*", default=["fp", "rtn", "hqq", "vc"])
    ap.add_argument("--out", default=default_out("rd_sweep"), help="results folder (committed: results/rd_sweep)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("transformers", "lm_eval", "urllib3", "httpx", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    src = args.model or str(smollm2_checkpoint())
    tok = AutoTokenizer.from_pretrained(src)
    evaluate = Evaluator(tok, load_text(args.text), args)
    rows: list[dict] = []
    if args.append and (out / "rd_sweep.json").exists():
        rows = json.loads((out / "rd_sweep.json").read_text())["rows"]

    def record(row: dict) -> None:
        rows.append(row)
        logger.info("%-28s bpw %6.3f  ppl %10.2f  piqa %s", row["method"], row["bpw"], row["ppl"],
                    f"{row['piqa_acc']:.3f}" if "piqa_acc" in row else "-")  # fmt: skip
        (out / "rd_sweep.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))

    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    linears = decoder_linears(base)
    original = {n: m.weight.detach().clone() for n, m in linears.items()}
    n_values = sum(w.numel() for w in original.values())

    if "fp" in args.only:
        record({"method": "FP (fp32 ref)", "family": "fp", "bpw": 16.0, "quantize_seconds": 0.0, **evaluate(base)})
    if "rtn" in args.only:
        for rot in (False, True):
            for bits in args.rtn_bits:
                for g in args.rtn_groups:
                    t0 = time.perf_counter()
                    with torch.no_grad():
                        for n, m in linears.items():
                            m.weight.copy_(rtn_quantize(original[n], bits, g, rotation=rot))
                    q_s = time.perf_counter() - t0
                    bpw = sum(rtn_bits_per_value(bits, g, w.shape[-1]) * w.numel() for w in original.values())
                    artefact = bits == 4 and g == 32 and not rot
                    record({"method": f"RTN {bits}b g{g}" + (" +rot" if rot else "")
                            + (" (Q4_1 grid!)" if artefact else ""), "family": "rtn", "rotation": rot,
                            "artefact": artefact, "bpw": bpw / n_values, "quantize_seconds": q_s,
                            **evaluate(base)})  # fmt: skip
        with torch.no_grad():
            for n, m in linears.items():
                m.weight.copy_(original[n])
    if "hqq" in args.only:
        for spec in args.hqq:
            bits, group = (int(v) for v in spec.split(":"))
            t0 = time.perf_counter()
            with torch.no_grad():
                for n, m in linears.items():
                    m.weight.copy_(hqq_quantize(original[n], bits, group))
            q_s = time.perf_counter() - t0
            bpw = bits + 32.0 / group  # fp16 scale + fp16 zero per group (every weight here divides evenly)
            record({"method": f"HQQ {bits}b g{group}", "family": "hqq", "bpw": bpw, "quantize_seconds": q_s,
                    **evaluate(base)})  # fmt: skip
        with torch.no_grad():
            for n, m in linears.items():
                m.weight.copy_(original[n])
    del base
    if "vc" in args.only:
        for allocation in args.vc_allocation:
            for bits in args.vc_bits:
                changes = dict(_parse_set(item) for item in args.vc_set)
                if args.vc_config:
                    cfg = vc_quant.VcQuantizationConfig.from_file(
                        args.vc_config, bits=bits, allocation=allocation, **changes
                    )
                else:
                    cfg = vc_quant.VcQuantizationConfig(bits=bits, allocation=allocation, **changes)
                t0 = time.perf_counter()
                model = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg, dtype=torch.float32)
                q_s = time.perf_counter() - t0
                rep = model.vc_quant_report
                variant = allocation + (f", {args.vc_label}" if args.vc_label else "")
                record({"method": f"vc_quant {bits} ({variant})", "family": "vc", "target": bits,
                        "allocation": allocation, "variant": variant, "bpw": rep.bits_per_weight,
                        "quantize_seconds": q_s, "config": cfg.to_dict(), **evaluate(model)})  # fmt: skip
                del model

    write_markdown(rows, out / "rd_sweep.md", args, src)
    plot(rows, out / "rd_sweep.png")
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


def _parse_set(item: str) -> tuple[str, object]:
    key, sep, value = item.partition("=")
    if not sep:
        raise SystemExit(f"--vc-set {item!r}: expected KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a plain string


def write_markdown(rows: list[dict], path: Path, args, src: str) -> None:
    lines = [
        f"Model: `{Path(src).name}`; all decoder linear weights quantized; text: {args.text}, "
        f"{args.windows} windows x {args.seqlen} tokens (BOS first); PIQA: first {args.piqa_limit} of the "
        "validation split (lm-eval, offline copy).",
        "",
        "| method | all-in bpw | perplexity | PIQA acc | quantize s | eval s |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: ({"fp": 0, "rtn": 1, "hqq": 2, "vc": 3}[r["family"]], -r["bpw"])):
        piqa = f"{r['piqa_acc']:.3f}" if "piqa_acc" in r else "-"
        lines.append(f"| {r['method']} | {r['bpw']:.3f} | {r['ppl']:.2f} | {piqa} | "
                     f"{r['quantize_seconds']:.1f} | {r['eval_seconds']:.1f} |")  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict[str, list] = {}
    for r in rows:
        if r["family"] == "fp" or r.get("artefact"):
            continue
        if r["family"] == "vc":
            key = f"vc_quant ({r.get('variant', r.get('allocation', 'uniform'))})"
        elif r["family"] == "hqq":
            key = "HQQ"
        else:
            key = "RTN" + (" +rot" if r.get("rotation") else "")
        series.setdefault(key, []).append((r["bpw"], r["ppl"]))
    for key, pts in series.items():
        pts.sort()
        ax.plot(*zip(*pts, strict=True), "-o" if key.startswith("vc_quant") else "x", label=key)
    fp = [r for r in rows if r["family"] == "fp"]
    if fp:
        ax.axhline(fp[0]["ppl"], color="k", ls="--", label="full precision")
    finish_log_plot(fig, ax, "perplexity", path)


if __name__ == "__main__":
    main()
