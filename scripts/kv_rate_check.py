"""Does the KV cache land on its target rate? SmolLM2-135M, 600 tokens of the offline Wikipedia leads.

Chunked prefill (128-token chunks) into a ``VcQuantizedCache`` with default options at each
target; prints the compressed bits per element the cache measured (every stored byte
counted). The first block of each stream searches its rate; later blocks predict the
quantiser step from the rates so far (no search).

    python scripts/kv_rate_check.py [--bits 2.0 2.5 3.0] [--tokens 600]
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import vc_quant
from vc_quant.evaluation import load_text
from vc_quant.testing import smollm2_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=float, nargs="+", default=[2.0, 2.5, 3.0])
    ap.add_argument("--tokens", type=int, default=600)
    args = ap.parse_args()
    src = smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    ids = tok(load_text("wiki-offline")[: 40 * args.tokens], return_tensors="pt").input_ids[:, : args.tokens]
    rates = {}
    for bits in args.bits:
        cache = vc_quant.VcQuantizedCache(model.config, bits=bits)
        with torch.no_grad():
            for chunk in ids.split(128, dim=1):
                model(chunk, cache=cache, use_cache=True)
        rates[bits] = round(cache.compressed_bits_per_element(), 4)
    print(json.dumps({"tokens": ids.shape[1], "target -> measured bits/element": rates}))


if __name__ == "__main__":
    main()
