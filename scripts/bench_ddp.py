"""Gradient compression in data-parallel training: vc_quant's DDP hook against torch's own hooks, one run.

Two processes (``gloo``, one CPU core each) train the same small Llama built from a config
(SmolLM2's tokenizer and vocabulary, 4 layers of width 128: 7.3 M parameters, tied
embeddings) on windows of the offline Wikipedia leads: same initialisation, same data
order (each rank its own shard), same seeds, AdamW, a fixed number of steps. Rows: fp32
all-reduce (torch's ``allreduce_hook``, the reference), torch's ``fp16_compress_hook``,
``powerSGD_hook`` at two ranks (vanilla all-reduce for the first 2 steps, the least
PowerSGD allows; those bytes are counted too), vc_quant at 1.5 / 2.0 / 2.5 bits with
error feedback and at 2.5 bits without.

Bits per gradient element on the wire are *measured*: every byte a rank hands to
``dist.all_reduce`` (torch's hooks) or to ``dist.all_gather`` (vc_quant: sizes + padded
payloads) is counted, divided by the gradient elements reduced.

Projected step time on a link of B bit/s (2 ranks): ``compute + codec + bytes·8/B`` where
``compute`` is the fp32 row's measured step time (loopback communication is negligible
here), ``codec`` the row's measured encode + decode seconds per step (vc_quant; PowerSGD's
extra compute is its measured step time minus the fp32 row's), and ``bytes`` what one rank
sends per step: an all-reduce over 2 ranks moves each rank's buffer once each way (ring:
2(N-1)/N × size = size), an all-gather sends each rank's payload once (N-1 = 1).

    python scripts/bench_ddp.py [--steps 100] [--out results/ddp]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import default_out, free_port, plot_curves  # scripts/common.py

BUCKET_MB = 64  # > the model's 29 MB of fp32 gradients: one bucket
ROWS = ["fp32", "fp16", "powersgd-1", "powersgd-4", "vc-1.5", "vc-2.0", "vc-2.5", "vc-2.5-noef"]
SEQ, BATCH, VAL_WINDOWS, LR = 128, 8, 32, 2e-3
LINKS = {"1 Gbit/s": 1e9, "10 Gbit/s": 1e10, "100 Gbit/s": 1e11}


def windows(steps: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training windows ``(steps, world, BATCH, SEQ)`` and validation windows, from the Wikipedia leads."""
    from transformers import AutoTokenizer

    from vc_quant.evaluation import token_windows
    from vc_quant.testing import smollm2_checkpoint, wiki_text

    cache = Path(".cache/bench_ddp") / f"windows-{steps}-{world}.pt"
    if cache.exists():
        return torch.load(cache)
    tok = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    need = steps * world * BATCH + VAL_WINDOWS
    ids = token_windows(tok, wiki_text(), SEQ, need, bos=True)
    if len(ids) < need:
        raise SystemExit(f"only {len(ids)} windows of text for {need}")
    gen = torch.Generator().manual_seed(0)
    train = ids[:-VAL_WINDOWS][torch.randperm(need - VAL_WINDOWS, generator=gen)]
    out = train.reshape(steps, world, BATCH, SEQ), ids[-VAL_WINDOWS:]
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, cache)
    return out


def small_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                         tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


class Counter:
    """Bytes a rank hands to all_reduce (torch's hooks call ``dist.all_reduce``)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.real = dist.all_reduce

    def __call__(self, tensor, *args, **kwargs):
        self.bytes += tensor.numel() * tensor.element_size()
        return self.real(tensor, *args, **kwargs)


def worker(rank: int, world: int, port: int, row: str, steps: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    from vc_quant.distributed import VcHookState, register

    train, val = windows(steps, world)
    # one gradient bucket for every row: PowerSGD chains its two all-reduces in future callbacks,
    # and with two buckets under gloo those collectives can be issued in different orders on the
    # two ranks (a size-mismatch abort, seen at step 2 with the default 25 MB cap)
    model = torch.nn.parallel.DistributedDataParallel(small_llama(), bucket_cap_mb=BUCKET_MB)
    counter = Counter()
    dist.all_reduce = counter
    state = None
    if row == "fp32":
        model.register_comm_hook(None, default_hooks.allreduce_hook)
    elif row == "fp16":
        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif row.startswith("powersgd-"):
        psgd = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=int(row.split("-")[1]),
                                           start_powerSGD_iter=2)  # fmt: skip
        model.register_comm_hook(psgd, powerSGD_hook.powerSGD_hook)
    else:
        bits = float(row.split("-")[1])
        state = VcHookState(bits=bits, error_feedback=not row.endswith("noef"))
        register(model, state)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    elements = sum(p.numel() for p in model.parameters())
    losses, vals, step_s = [], [], []
    for step in range(steps):
        batch = train[step, rank]
        t0 = time.perf_counter()
        loss = model(batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step_s.append(time.perf_counter() - t0)
        losses.append(float(loss.detach()))
        if (step + 1) % 25 == 0 or step == steps - 1:
            vals.append((step + 1, validation(model.module, val)))
    result = {"row": row, "losses": losses, "val": vals, "step_s": step_s, "elements_per_step": elements,
              "allreduce_bytes": counter.bytes}  # fmt: skip
    if state is not None:
        st = state.stats
        result.update(wire_bytes=st.bytes, payload_bytes=st.payload_bytes, encode_s=st.encode_s,
                      exchange_s=st.transfer_s, decode_s=st.decode_s, hook_elements=st.elements)  # fmt: skip
    torch.save(result, Path(out) / f"{row}-rank{rank}.pt")
    dist.destroy_process_group()


@torch.no_grad()
def validation(model, val: torch.Tensor) -> float:
    model.eval()
    loss = sum(float(model(val[i : i + 8], labels=val[i : i + 8]).loss) for i in range(0, len(val), 8))
    model.train()
    return loss / math.ceil(len(val) / 8)


def summarize(res: dict, steps: int) -> dict:
    elements = res["elements_per_step"] * steps
    sent = res.get("wire_bytes", res["allreduce_bytes"])
    step = sum(res["step_s"]) / steps
    codec = (res.get("encode_s", 0.0) + res.get("decode_s", 0.0)) / steps
    return {"row": res["row"], "val_loss": res["val"][-1][1], "val_ppl": math.exp(res["val"][-1][1]),
            "bits_per_element": 8 * sent / elements, "bytes_per_step": sent / steps, "step_s": step,
            "encode_s": res.get("encode_s", 0.0) / steps, "exchange_s": res.get("exchange_s", 0.0) / steps,
            "decode_s": res.get("decode_s", 0.0) / steps, "codec_s": codec}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS)
    ap.add_argument("--out", default=default_out("ddp"), help="results folder (committed: results/ddp)")
    args = ap.parse_args()
    out = Path(args.out)
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    windows(args.steps, 2)  # tokenize once, before the workers
    rows = []
    for row in args.rows:
        t0 = time.perf_counter()
        mp.spawn(worker, args=(2, free_port(), row, args.steps, str(raw)), nprocs=2, join=True)
        res = torch.load(raw / f"{row}-rank0.pt")
        rows.append(summarize(res, args.steps) | {"wall_s": time.perf_counter() - t0, "curve": res["losses"],
                                                   "val_curve": res["val"]})  # fmt: skip
        print(json.dumps({k: v for k, v in rows[-1].items() if "curve" not in k}), flush=True)
    write(rows, out, args.steps)


def write(rows: list[dict], out: Path, steps: int) -> None:
    (out / "bench_ddp.json").write_text(json.dumps(rows, indent=1))
    ref = next(r for r in rows if r["row"] == "fp32")
    compute = ref["step_s"]
    lines = [f"2 ranks (gloo, 1 core each), {steps} steps, 7.3 M parameters; val = 32 windows x 128 tokens.", "",
             "| row | val loss (vs fp32) | val ppl | bits/element on the wire | step s | encode / exchange / decode s "
             "| " + " | ".join(f"projected step s @ {k}" for k in LINKS) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(LINKS)]  # fmt: skip
    for r in rows:
        extra = r["codec_s"] if r["row"].startswith("vc") else max(0.0, r["step_s"] - compute)
        proj = " | ".join(f"{compute + extra + r['bytes_per_step'] * 8 / bps:.3f}" for bps in LINKS.values())
        split = (f"{r['encode_s']:.3f} / {r['exchange_s']:.3f} / {r['decode_s']:.3f}" if r["row"].startswith("vc")
                 else "-")  # fmt: skip
        lines.append(
            f"| {r['row']} | {r['val_loss']:.4f} ({100 * (r['val_loss'] / ref['val_loss'] - 1):+.2f}%) | "
            f"{r['val_ppl']:.1f} | {r['bits_per_element']:.3f} | {r['step_s']:.3f} | {split} | {proj} |"
        )
    (out / "bench_ddp.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    curves = {f"{r['row']} ({r['bits_per_element']:.2f} b/el)": tuple(zip(*r["val_curve"], strict=True)) for r in rows}
    plot_curves(curves, "step", "validation loss", out / "bench_ddp.png")


if __name__ == "__main__":
    main()
