"""Gradient compression in data-parallel training: vc_quant's DDP hook against torch's own hooks, one run.

Two processes (``gloo``, one CPU core each) train the same small Llama built from a config
(SmolLM2's tokenizer and vocabulary, 4 layers of width 128: 7.3 M parameters, tied
embeddings) on windows of the offline Wikipedia leads, AdamW, a fixed number of steps.
Every row runs once per seed; a seed sets the initialisation and the data order (each rank
its own shard), so a row's spread over seeds is the noise its mean must beat. Rows: fp32
all-reduce (torch's ``allreduce_hook``, the reference), torch's ``fp16_compress_hook``,
``powerSGD_hook`` at ranks 1 and 4 (vanilla all-reduce for the first 2 steps, the least
PowerSGD allows; those bytes are counted too), vc_quant at 1.5 / 2.0 / 2.5 bits with error
feedback (the in-flight default codec, or ``--codec``) and at 2.5 bits without.

Bits per gradient element on the wire are *measured*: every byte a rank hands to
``dist.all_reduce`` (torch's hooks) or to ``dist.all_gather`` (vc_quant: sizes + padded
payloads) is counted, divided by the gradient elements reduced.

Projected step time on a link of B bit/s (2 ranks): ``compute + codec + bytes·8/B`` where
``compute`` is the fp32 row's measured step time (loopback communication is negligible
here), ``codec`` the row's measured encode + decode seconds per step (vc_quant; PowerSGD's
extra compute is its measured step time minus the fp32 row's), and ``bytes`` what one rank
sends per step: an all-reduce over 2 ranks moves each rank's buffer once each way (ring:
2(N-1)/N × size = size), an all-gather sends each rank's payload once (N-1 = 1).

    python scripts/bench_ddp.py [--steps 300] [--seeds 0 1 2] [--codec rans] [--out results/ddp]

``scripts/bench_link.py`` runs the same worker in two network namespaces joined by a
rate-limited link and measures step times there.
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
ROWS = ["fp32", "fp16", "powersgd-1", "powersgd-4", "vc-1.5", "vc-2.0", "vc-2.5", "vc-2.5-noef", "vc-1.25"]
# on request only: vc-2.5-noef (error feedback off), vc-1.25 (PowerSGD rank 4's equal-bytes partner)
DEFAULT_ROWS = [r for r in ROWS if r not in ("vc-2.5-noef", "vc-1.25")]
SEQ, BATCH, VAL_WINDOWS, LR = 128, 8, 32, 2e-3
LINKS = {"1 Gbit/s": 1e9, "10 Gbit/s": 1e10, "100 Gbit/s": 1e11}


def windows(steps: int, world: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Training windows ``(steps, world, BATCH, SEQ)`` in the seed's order, and validation windows."""
    from transformers import AutoTokenizer

    from vc_quant.evaluation import token_windows
    from vc_quant.testing import smollm2_checkpoint, wiki_text

    cache = Path(".cache/bench_ddp") / f"windows-{steps}-{world}-{seed}.pt"
    if cache.exists():
        return torch.load(cache)
    tok = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    need = steps * world * BATCH + VAL_WINDOWS
    ids = token_windows(tok, wiki_text(), SEQ, need, bos=True)
    if len(ids) < need:
        raise SystemExit(f"only {len(ids)} windows of text for {need}")
    gen = torch.Generator().manual_seed(seed)
    train = ids[:-VAL_WINDOWS][torch.randperm(need - VAL_WINDOWS, generator=gen)]
    out = train.reshape(steps, world, BATCH, SEQ), ids[-VAL_WINDOWS:]
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, cache)
    return out


def small_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                         tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


class Counter:
    """Bytes a rank hands to all_reduce (torch's hooks call ``dist.all_reduce``)."""

    def __init__(self) -> None:
        self.bytes = 0
        self.real = dist.all_reduce

    def __call__(self, tensor, *args, **kwargs):
        self.bytes += tensor.numel() * tensor.element_size()
        return self.real(tensor, *args, **kwargs)


def worker(rank: int, world: int, port: int, row: str, steps: int, out: str, seed: int = 0, codec: str = "",
           addr: str = "127.0.0.1", val_every: int = 25) -> None:  # fmt: skip
    os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    from vc_quant.distributed import VcHookState, register

    train, val = windows(steps, world, seed)
    # one gradient bucket for every row: PowerSGD chains its two all-reduces in future callbacks,
    # and with two buckets under gloo those collectives can be issued in different orders on the
    # two ranks (a size-mismatch abort, seen at step 2 with the default 25 MB cap)
    model = torch.nn.parallel.DistributedDataParallel(small_llama(seed), bucket_cap_mb=BUCKET_MB)
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
        state = VcHookState(bits=bits, error_feedback=not row.endswith("noef"),
                            codec={"codec": codec} if codec else {})  # fmt: skip
        register(model, state)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    elements = sum(p.numel() for p in model.parameters())
    losses, vals, step_s, sent = [], [], [], []
    for step in range(steps):
        batch = train[step, rank]
        t0 = time.perf_counter()
        loss = model(batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        step_s.append(time.perf_counter() - t0)
        sent.append(state.stats.bytes if state is not None else counter.bytes)  # cumulative, per step
        losses.append(float(loss.detach()))
        if val_every and ((step + 1) % val_every == 0 or step == steps - 1):
            vals.append((step + 1, validation(model.module, val)))
    result = {"row": row, "seed": seed, "codec": codec, "losses": losses, "val": vals, "step_s": step_s,
              "elements_per_step": elements, "allreduce_bytes": counter.bytes, "sent_bytes": sent}  # fmt: skip
    if state is not None:
        st = state.stats
        result.update(wire_bytes=st.bytes, payload_bytes=st.payload_bytes, encode_s=st.encode_s,
                      exchange_s=st.transfer_s, decode_s=st.decode_s, hook_elements=st.elements)  # fmt: skip
    torch.save(result, Path(out) / f"{row}-seed{seed}-rank{rank}.pt")
    dist.destroy_process_group()


@torch.no_grad()
def validation(model, val: torch.Tensor) -> float:
    model.eval()
    loss = sum(float(model(val[i : i + 8], labels=val[i : i + 8]).loss) for i in range(0, len(val), 8))
    model.train()
    return loss / math.ceil(len(val) / 8)


def finished(raw: Path, row: str, seed: int, steps: int, codec: str) -> dict | None:
    """The raw result an earlier run left for this row and seed, if it ran the same steps and codec."""
    path = raw / f"{row}-seed{seed}-rank0.pt"
    if not path.exists():
        return None
    res = torch.load(path)
    same_codec = res.get("codec", codec) == codec or not row.startswith("vc")  # older raw files: not recorded
    if res.get("row") != row or res.get("seed") != seed or len(res.get("losses", ())) != steps or not same_codec:
        return None
    print(f"{row} seed {seed}: reusing {path} (--resume)", flush=True)
    return res | {"resumed": True}


def summarize(res: dict, steps: int) -> dict:
    elements = res["elements_per_step"] * steps
    sent = res.get("wire_bytes", res["allreduce_bytes"])
    step = sum(res["step_s"]) / steps
    codec = (res.get("encode_s", 0.0) + res.get("decode_s", 0.0)) / steps
    return {"row": res["row"], "seed": res["seed"], "val_loss": res["val"][-1][1],
            "bits_per_element": 8 * sent / elements, "bytes_per_step": sent / steps, "step_s": step,
            "encode_s": res.get("encode_s", 0.0) / steps, "exchange_s": res.get("exchange_s", 0.0) / steps,
            "decode_s": res.get("decode_s", 0.0) / steps, "codec_s": codec}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", type=int, default=None, metavar="RANK",
                    help="run one rank only (bench_link.py starts ranks inside network namespaces)")  # fmt: skip
    ap.add_argument("--port", type=int, default=29500)
    ap.add_argument("--addr", default="127.0.0.1")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=ROWS)
    ap.add_argument("--codec", default="", help="vc rows' codec (default: the in-flight default)")
    ap.add_argument("--out", default=default_out("ddp"), help="results folder (committed: results/ddp)")
    ap.add_argument("--resume", action="store_true",
                    help="reuse the raw result of a row and seed that an earlier run into the same --out finished "
                         "with the same --steps and --codec")  # fmt: skip
    ap.add_argument("--reference", default=None, metavar="BENCH_DDP_JSON",
                    help="take the rows not run here from an earlier run's bench_ddp.json (marked in the table)")
    args = ap.parse_args()
    out = Path(args.out)
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    if args.worker is not None:  # one rank of one row and seed (no validation: step times only)
        worker(args.worker, 2, args.port, args.rows[0], args.steps, str(raw), args.seeds[0], args.codec, args.addr, 0)
        return
    runs = []
    if args.reference:  # rows of an earlier run, for the rows this run does not repeat
        earlier = json.loads(Path(args.reference).read_text())["runs"]
        runs = [r | {"reference": args.reference} for r in earlier if r["row"] not in args.rows]
    for seed in args.seeds:
        windows(args.steps, 2, seed)  # tokenize once, before the workers
        for row in args.rows:
            t0 = time.perf_counter()
            res = finished(raw, row, seed, args.steps, args.codec) if args.resume else None
            if res is None:
                mp.spawn(worker, args=(2, free_port(), row, args.steps, str(raw), seed, args.codec), nprocs=2,
                         join=True)  # fmt: skip
                res = torch.load(raw / f"{row}-seed{seed}-rank0.pt")
            wall = None if res.get("resumed") else time.perf_counter() - t0
            runs.append(summarize(res, args.steps) | {"wall_s": wall, "val_curve": res["val"]})
            print(json.dumps({k: v for k, v in runs[-1].items() if "curve" not in k}), flush=True)
            write(runs, out, args)


def aggregate(runs: list[dict]) -> list[dict]:
    """Per row: mean and spread over seeds of the final validation loss, mean costs."""
    rows = []
    for row in dict.fromkeys(r["row"] for r in runs):
        mine = [r for r in runs if r["row"] == row]
        losses = [r["val_loss"] for r in mine]
        mean = sum(losses) / len(losses)
        std = math.sqrt(sum((v - mean) ** 2 for v in losses) / max(len(losses) - 1, 1))
        avg = {k: sum(r[k] for r in mine) / len(mine) for k in ("bits_per_element", "bytes_per_step", "step_s",
                                                                 "encode_s", "exchange_s", "decode_s", "codec_s")}
        rows.append({"row": row, "seeds": [r["seed"] for r in mine], "val_losses": losses, "val_loss": mean,
                     "val_std": std, "reference": mine[0].get("reference"), **avg})  # fmt: skip
    return rows


def write(runs: list[dict], out: Path, args) -> None:
    (out / "bench_ddp.json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    rows = aggregate(runs)
    ref = next((r for r in rows if r["row"] == "fp32"), None)
    if ref is None:
        return
    compute = ref["step_s"]
    lines = [f"2 ranks (gloo, 1 core each), {args.steps} steps, seeds {args.seeds}, 7.3 M parameters; val = 32 "
             "windows x 128 tokens; loss = mean over seeds (± sample std), vs fp32's mean."
             + (f" Rows marked 'earlier run' are from {args.reference}." if args.reference else ""), "",
             "| row | val loss (vs fp32) | ± std | per seed | bits/element on the wire | step s | codec s / compute s "
             "| encode / exchange / decode s | " + " | ".join(f"projected step s @ {k}" for k in LINKS) + " |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(LINKS)]  # fmt: skip
    for r in rows:
        vc = r["row"].startswith("vc")
        extra = r["codec_s"] if vc else max(0.0, r["step_s"] - compute)
        proj = " | ".join(f"{compute + extra + r['bytes_per_step'] * 8 / bps:.3f}" for bps in LINKS.values())
        split = f"{r['encode_s']:.3f} / {r['exchange_s']:.3f} / {r['decode_s']:.3f}" if vc else "-"
        per_seed = ", ".join(f"{v:.4f}" for v in r["val_losses"])
        label = r["row"] + (" (earlier run)" if r.get("reference") else "")
        lines.append(
            f"| {label} | {r['val_loss']:.4f} ({100 * (r['val_loss'] / ref['val_loss'] - 1):+.2f}%) | "
            f"{r['val_std']:.4f} | {per_seed} | {r['bits_per_element']:.3f} | {r['step_s']:.3f} | "
            f"{(r['codec_s'] / compute if vc else 0.0):.3f} | {split} | {proj} |"
        )
    (out / "bench_ddp.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    first = min(r["seed"] for r in runs)
    curves = {f"{r['row']} ({r['bits_per_element']:.2f} b/el, seed {first})": tuple(zip(*r["val_curve"], strict=True))
              for r in runs if r["seed"] == first}  # fmt: skip
    plot_curves(curves, "step", "validation loss", out / "bench_ddp.png")


if __name__ == "__main__":
    main()
