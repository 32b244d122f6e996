"""WikiText-2 perplexity of a model (compressed or not), GPTQ/AWQ protocol.

    python scripts/eval_ppl.py MODEL [--seqlen 2048] [--text wikitext2|wiki-offline | --text-file F]
                               [--max-windows N] [--no-bos] [--dtype float32] [--out result.json]

MODEL is a folder or hub id; vc_quant is imported first, so vc_quant checkpoints
decode on load. Offline, ``--text wiki-offline`` uses Wikipedia lead sections
that install with the dev assets (WikiText-2 itself ships in no package).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import vc_quant  # noqa: F401 — registers the "vc" quantization method
from vc_quant.evaluation import load_text, perplexity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--text", default="wikitext2", choices=["wikitext2", "wiki-offline"])
    ap.add_argument("--text-file")
    ap.add_argument("--max-windows", type=int)
    ap.add_argument("--no-bos", action="store_true", help="do not start each window with BOS")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out")
    args = ap.parse_args()

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype), device_map=args.device)
    load_s = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(args.model)
    try:
        text = load_text(args.text, args.text_file)
    except Exception as exc:  # the hub is unreachable: say how to run offline
        if args.text != "wikitext2" or args.text_file:
            raise
        raise SystemExit(
            f"eval_ppl: WikiText-2 could not be loaded from the Hugging Face hub ({type(exc).__name__}: {exc}).\n"
            "Offline, use --text wiki-offline (Wikipedia leads installed by scripts/setup.sh) or --text-file FILE."
        ) from exc
    res = perplexity(model, tok, text, seqlen=args.seqlen, max_windows=args.max_windows, bos=not args.no_bos)
    res.update(model=args.model, text=args.text_file or args.text, load_seconds=load_s)
    report = getattr(model, "vc_quant_report", None)
    if report is not None:
        res["bits_per_weight"] = report.bits_per_weight
    print(json.dumps(res, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
