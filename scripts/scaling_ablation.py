"""Ablation of the Fisher input/output scaling of weights (the study behind ``scaling="fisher"``).

One process: SmolLM2-135M, the Fisher diagonal per weight element from 8 self-generated
sequences x 128 tokens (the same estimate as vc_quant.allocation, kept element-wise here),
then, for each spec ``BITS:MODE[,key=value...][:CODEC]``, every decoder linear weight is
scaled, encoded at its allocated rate (equal-slope allocation on the scaled weighted energy,
side information counted), decoded, unscaled, and the model's perplexity measured (16 x 512
tokens of the offline Wikipedia leads, BOS first).

MODE: ``none`` | ``col`` (input columns, what vc_quant ships) | ``row`` (output rows) | ``both``.
Options: ``clamp`` (range of the scales, default 8), ``power`` (exponent, default 1/4 — the
MSE-optimal one), ``source=act`` (input-activation second moments instead of the Fisher
column marginals, AWQ's statistic).

    python scripts/scaling_ablation.py 3.5:none 3.5:col 3.5:row 3.5:both 3.5:col,clamp=4 3.5:col:hevc
           > results/quality/scaling_ablation.jsonl
"""

import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from vc_quant import encode_tensor
from vc_quant.allocation import _sample_sequences, allocate_bits
from vc_quant.codec.decode import decode_tensor
from vc_quant.evaluation import load_text, perplexity
from vc_quant.testing import smollm2_checkpoint

torch.manual_seed(0)
src = smollm2_checkpoint()
tok = AutoTokenizer.from_pretrained(src)
model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
names = [n + ".weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
orig = {n: model.get_parameter(n).detach().clone() for n in names}
N_SEQS = int(os.environ.get("FISHER_SEQS", "8"))  # self-generated sequences for the Fisher estimate
cache = f".cache/scaling_ablation_fisher_{N_SEQS}.pt"
if os.path.exists(cache):
    F = torch.load(cache)
else:
    seqs = _sample_sequences(model, N_SEQS, 128, 0)
    params = {n: model.get_parameter(n) for n in names}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    F = {n: torch.zeros_like(p) for n, p in params.items()}
    for seq in seqs:
        model.zero_grad(set_to_none=True)
        loss = model(seq[None], labels=seq[None]).loss * (seq.numel() - 1)
        loss.backward()
        for n, p in params.items():
            F[n] += p.grad.pow(2)
    model.zero_grad(set_to_none=True)
    torch.save(F, cache)
text = load_text("wiki-offline")
ACT = None
if any("source=act" in a for a in sys.argv[1:]):  # E[x_j^2] of each linear's input on the self-generated text
    ACT = {}
    seqs = _sample_sequences(model, 8, 128, 0)
    hooks = []
    for n in names:
        mod = model.get_submodule(n.removesuffix(".weight"))

        def hook(m, args, out, n=n):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            ACT[n] = ACT.get(n, 0) + x.pow(2).sum(0)

        hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for seq in seqs:
            model(seq[None])
    for h in hooks:
        h.remove()


def scales(W, Fm, mode, iters=4, clamp=8.0, floor=1e-3, power=0.25, source="fisher", act=None):
    r = Fm.sum(1).double()
    c = Fm.sum(0).double() if source == "fisher" else act.double()
    r = r + floor * r.mean()
    c = c + floor * c.mean()
    W2 = W.double() ** 2
    a = torch.ones_like(r)
    b = torch.ones_like(c)
    for _ in range(iters):
        if mode in ("row", "both"):
            u = (W2 * b[None, :] ** 2).sum(1)
            a = (r / u.clamp_min(1e-30)) ** power
            a = a / a.log().mean().exp()
            a = a.clamp(1 / clamp, clamp)
        if mode in ("col", "both"):
            v = (W2 * a[:, None] ** 2).sum(0)
            b = (c / v.clamp_min(1e-30)) ** power
            b = b / b.log().mean().exp()
            b = b.clamp(1 / clamp, clamp)
    S = Fm.sum().double()
    n = W.numel()
    G = float((W2 * a[:, None] ** 2 * b[None, :] ** 2).sum() / n * (r / a**2).sum() * (c / b**2).sum() / (S * n))
    return a.half().float(), b.half().float(), G


def run(bits, spec, codec="av1"):
    mode, *opts = spec.split(",")
    kw = {k: (v if k == "source" else float(v)) for k, v in (o.split("=") for o in opts)}
    numels, weights, sc = [], [], {}
    for n in names:
        W = orig[n]
        if mode == "none":
            a = b = None
            G = float(W.double().pow(2).mean() * F[n].double().mean())
        else:
            a, b, G = scales(W, F[n], mode, act=ACT.get(n) if ACT else None, **kw)
        sc[n] = (a, b)
        numels.append(W.numel())
        weights.append(G)
    # allocate_bits takes energies*sensitivities: pass G as energy, 1 as sensitivity
    side = {
        n: (
            0
            if mode == "none"
            else 16 * (orig[n].shape[0] * (mode in ("row", "both")) + orig[n].shape[1] * (mode in ("col", "both")))
        )
        for n in names
    }
    rates = allocate_bits(numels, weights, [1.0] * len(names), bits)
    t0 = time.perf_counter()

    def job(i):
        n = names[i]
        a, b = sc[n]
        W = orig[n]
        Wp = W * (a[:, None] if a is not None else 1) * (b[None, :] if b is not None else 1)
        target = rates[i] - side[n] / W.numel()
        enc = encode_tensor(
            Wp, max(1.0, min(8.0, target)), name=n, codec=codec, preset="8" if codec == "av1" else "superfast"
        )
        D = decode_tensor(enc)
        D = D / (a[:, None] if a is not None else 1) / (b[None, :] if b is not None else 1)
        return n, D, enc.nbytes * 8 + side[n], float(((D - W) ** 2).sum() / (W**2).sum())

    bits_total, rel = 0, []
    with ThreadPoolExecutor(2) as pool:
        for n, D, nb, r in pool.map(job, range(len(names))):
            model.get_parameter(n).data.copy_(D)
            bits_total += nb
            rel.append(r)
    q_s = time.perf_counter() - t0
    bpw = bits_total / sum(numels)
    res = perplexity(model, tok, text, 512, 16, bos=True)["ppl"]
    for n in names:
        model.get_parameter(n).data.copy_(orig[n])
    out = {
        "bits": bits,
        "mode": spec,
        "codec": codec,
        "bpw": bpw,
        "ppl": res,
        "quant_s": q_s,
        "mean_rel": sum(rel) / len(rel),
    }
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    for spec in sys.argv[1:]:
        bits, mode, *rest = spec.split(":")
        run(float(bits), mode, *(rest or []))
