"""Two pipeline stages on two processes (gloo): SmolLM2-135M split in half, hidden states crossing compressed.

Stage 0 (rank 0) runs the embeddings and decoder layers 0-14, stage 1 (rank 1) layers 15-29,
the final norm and the head (``vc_quant.distributed.stages.DecoderStage``); the hidden
states cross with ``StageBoundary`` at each rate, and uncompressed through the same path
(raw bytes), in the same run.

* Inference: perplexity on the usual windows (16 x 512 tokens of the offline Wikipedia
  leads, BOS first), bits per element on the wire (measured bytes), bytes per token and the
  latency split per window (stage 0 compute, encode, send, decode, stage 1 compute); then
  token-by-token decoding (greedy, 32 tokens after a 64-token prompt, each stage with its
  own KV cache): bytes per generated token (one 576-value message each), tokens/s, and
  whether the tokens match the uncompressed run.
* Training: a short fine-tuning run of the 2-stage model (same data, seeds and steps):
  uncompressed vs activations at 3.5 bits vs activations at 3.5 bits + activation gradients
  at --grad-bits (error feedback); the training loss curves (PNG), the validation loss of
  the result (evaluated uncompressed) and the bytes on the wire each way.

* torch's own engine (``torch.distributed.pipelining``, :mod:`vc_quant.distributed.engine`):
  the same split as ``PipelineStage``s under GPipe and 1F1B, hidden states and their gradients
  in fixed-size carriers (compressed, or raw fp32 through the same carriers): perplexity of
  the eval windows through ``schedule.eval`` and the same fine-tuning run, in microbatches.

    python scripts/bench_pipeline.py [--windows 16] [--train-steps 40] [--out results/pipeline]
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

SEQ = 512
TRAIN_SEQ, TRAIN_BATCH, VAL = 128, 4, 16


def data(windows: int, train_steps: int) -> dict:
    from transformers import AutoTokenizer

    from vc_quant.evaluation import load_text, token_windows
    from vc_quant.testing import smollm2_checkpoint

    tok = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    text = load_text("wiki-offline")
    evaluation = token_windows(tok, text, SEQ, windows, bos=True)
    # training text: leads after the evaluation windows (no overlap), windows of TRAIN_SEQ
    rest = token_windows(tok, text[len(text) // 2 :], TRAIN_SEQ, train_steps * TRAIN_BATCH + VAL, bos=True)
    return {"eval": evaluation, "train": rest[: train_steps * TRAIN_BATCH].reshape(train_steps, TRAIN_BATCH, -1),
            "val": rest[train_steps * TRAIN_BATCH :]}  # fmt: skip


def stage_model(rank: int):
    from transformers import AutoModelForCausalLM

    from vc_quant.distributed.stages import DecoderStage
    from vc_quant.testing import smollm2_checkpoint

    return DecoderStage(AutoModelForCausalLM.from_pretrained(smollm2_checkpoint(), dtype=torch.float32), rank)


# --- inference ------------------------------------------------------------------------------------
def inference(rank: int, bits, d: dict, gen_tokens: int) -> dict:
    from transformers import DynamicCache

    from vc_quant.distributed import StageBoundary

    stage = stage_model(rank)
    boundary = StageBoundary(peer=1 - rank, forward_bits=bits)
    nll, count, compute = 0.0, 0, 0.0
    with torch.no_grad():
        for window in d["eval"]:
            ids = window[None]
            t0 = time.perf_counter()
            if rank == 0:
                hidden = stage(ids)
                compute += time.perf_counter() - t0
                boundary.send_forward(hidden)
            else:
                hidden = boundary.recv_forward(requires_grad=False)
                t1 = time.perf_counter()
                logits = stage(hidden).float()
                compute += time.perf_counter() - t1
                logp = torch.log_softmax(logits[0, :-1], dim=-1)
                nll -= float(logp.gather(-1, ids[0, 1:, None]).sum())
                count += ids.shape[1] - 1
        prefill = boundary.forward_link
        out = {"compute_s": compute, "encode_s": prefill.encode_s, "send_s": prefill.transfer_s,
               "decode_s": prefill.decode_s, "bytes": prefill.bytes, "elements": prefill.elements,
               "tokens": int(d["eval"].numel())}  # fmt: skip
        if rank == 1:
            out["ppl"] = math.exp(nll / count)
        # token by token: each stage its own cache; stage 1 sends the greedy token back (4 bytes)
        boundary.forward_link = type(prefill)()
        cache = DynamicCache(config=stage.config)
        prompt = d["eval"][0, :64][None]
        token, generated = prompt, []
        t0 = time.perf_counter()
        for step in range(gen_tokens + 1):
            pos = torch.arange(64 + step - token.shape[1], 64 + step)[None] if step else torch.arange(64)[None]
            if step == 1:  # count the one-token messages only (the prompt's is a prefill)
                boundary.forward_link = type(prefill)()
                t0 = time.perf_counter()
            if rank == 0:
                boundary.send_forward(stage(token, pos, cache), first_position=int(pos[0, 0]))
                token = torch.empty(1, 1, dtype=torch.int64)
                dist.recv(token, 1)
            else:
                logits = stage(boundary.recv_forward(requires_grad=False), pos, cache)
                token = logits[:, -1:].argmax(-1)
                dist.send(token, 0)
            generated.append(int(token))
        out["gen_s"] = time.perf_counter() - t0  # the one-token steps
        out["generated"] = generated[:-1]
        out["gen_bytes"], out["gen_elements"] = boundary.forward_link.bytes, boundary.forward_link.elements
    return out


# --- training ---------------------------------------------------------------------------------------
def training(rank: int, act_bits, grad_bits, d: dict) -> dict:
    from vc_quant.distributed import StageBoundary

    torch.manual_seed(0)
    stage = stage_model(rank)
    boundary = StageBoundary(peer=1 - rank, forward_bits=act_bits, backward_bits=grad_bits)
    params = [p for p in stage.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-5, weight_decay=0.0)
    losses = []
    for batch in d["train"]:
        opt.zero_grad(set_to_none=True)
        if rank == 0:
            hidden = stage(batch)
            boundary.send_forward(hidden)
            boundary.backward(hidden)
            loss = torch.empty(1)
            dist.recv(loss, 1)
        else:
            hidden = boundary.recv_forward()
            logits = stage(hidden)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
            loss.backward()
            boundary.send_backward(hidden)
            loss = loss.detach().reshape(1)
            dist.send(loss, 0)
        opt.step()
        losses.append(float(loss))
    # the trained stages, evaluated uncompressed
    plain = StageBoundary(peer=1 - rank, forward_bits=None)
    val = 0.0
    with torch.no_grad():
        for i in range(0, len(d["val"]), TRAIN_BATCH):
            batch = d["val"][i : i + TRAIN_BATCH]
            if rank == 0:
                plain.send_forward(stage(batch))
            else:
                logits = stage(plain.recv_forward(requires_grad=False))
                val += float(torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                               batch[:, 1:].flatten()))  # fmt: skip
    return {"losses": losses, "val_loss": val / math.ceil(len(d["val"]) / TRAIN_BATCH),
            "fwd_bytes": boundary.forward_link.bytes, "fwd_elements": boundary.forward_link.elements,
            "bwd_bytes": boundary.backward_link.bytes, "bwd_elements": boundary.backward_link.elements}  # fmt: skip


def engine(rank: int, schedule: str, act_bits, grad_bits, d: dict, mode: str) -> dict:
    """The split model under torch.distributed.pipelining: eval perplexity or the fine-tuning run."""
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

    from vc_quant.distributed.engine import FixedLink, build_stage

    torch.manual_seed(0)
    stage = stage_model(rank)
    hidden, vocab = stage.config.hidden_size, stage.config.vocab_size
    if mode == "eval":
        batches, n_mb = d["eval"].split(4), 2
    else:
        batches, n_mb = d["train"], TRAIN_BATCH
    rows, seq = batches[0].shape
    mb = rows // n_mb
    fwd, bwd = FixedLink.shared((mb, seq, hidden), act_bits, grad_bits if mode == "train" else act_bits)
    pipe = build_stage(stage, rank, [(fwd, bwd)], torch.zeros(mb, seq, dtype=torch.long),
                       torch.zeros(mb, seq, vocab), training=mode == "train")  # fmt: skip

    def loss_fn(logits, target):
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), target[:, 1:].flatten())

    sched = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule](pipe, n_mb, loss_fn=loss_fn)
    losses: list[float] = []
    t0 = time.perf_counter()
    if mode == "eval":
        nll = count = 0
        with torch.no_grad():
            for batch in batches:
                if rank == 0:
                    sched.eval(batch)
                else:
                    logits = sched.eval(target=batch)
                    nll += float(loss_fn(logits, batch)) * batch[:, 1:].numel()
                    count += batch[:, 1:].numel()
        result = {"ppl": math.exp(nll / count) if rank == 1 else None}
    else:
        opt = torch.optim.AdamW([p for p in stage.parameters() if p.requires_grad], lr=2e-5, weight_decay=0.0)
        for batch in batches:
            opt.zero_grad(set_to_none=True)
            if rank == 0:
                sched.step(batch)
            else:
                out: list = []
                sched.step(target=batch, losses=out)
                losses.append(float(sum(out) / len(out)))
            opt.step()
        result = {}
    link = fwd if rank == 0 else bwd  # each rank encodes one direction
    return {**result, "losses": losses, "seconds": time.perf_counter() - t0, "bytes": link.stats.bytes,
            "elements": link.stats.elements, "refits": link.refits}  # fmt: skip


def worker(rank: int, world: int, port: int, job: dict, d: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    if job["kind"] == "inference":
        result = inference(rank, job["bits"], d, job["gen_tokens"])
    elif job["kind"] == "engine":
        result = engine(rank, job["schedule"], job["act_bits"], job["grad_bits"], d, job["mode"])
    else:
        result = training(rank, job["act_bits"], job["grad_bits"], d)
    torch.save(result, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def run(job: dict, d: dict, out: Path) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(worker, args=(2, free_port(), job, d, str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--bits", type=float, nargs="+", default=[2.5, 3.5, 4.5])
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--train-steps", type=int, default=40)
    ap.add_argument("--grad-bits", type=float, nargs="+", default=[4.0, 6.0])
    ap.add_argument("--out", default=default_out("pipeline"), help="results folder (committed: results/pipeline)")
    ap.add_argument("--skip", choices=["inference", "training", "engine"], nargs="*", default=[])
    args = ap.parse_args()
    out = Path(args.out)
    d = data(args.windows, args.train_steps)
    report = {"inference": [], "training": [], "engine": []}
    if "inference" not in args.skip:
        for bits in [None, *args.bits]:
            s0, s1 = run({"kind": "inference", "bits": bits, "gen_tokens": args.gen_tokens}, d, out / "raw")
            row = {"bits": bits, "ppl": s1["ppl"], "wire_bits": 8 * s0["bytes"] / s0["elements"],
                   "bytes_per_token": s0["bytes"] / s0["tokens"], "stage0_s": s0["compute_s"],
                   "encode_s": s0["encode_s"], "send_s": s0["send_s"], "decode_s": s1["decode_s"],
                   "stage1_s": s1["compute_s"], "gen_tok_s": args.gen_tokens / s1["gen_s"],
                   "gen_bytes_per_token": s0["gen_bytes"] / args.gen_tokens,
                   "gen_wire_bits": 8 * s0["gen_bytes"] / s0["gen_elements"], "generated": s1["generated"]}  # fmt: skip
            report["inference"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "generated"}), flush=True)
    if "training" not in args.skip:
        jobs = [(None, None), (3.5, None), *[(3.5, g) for g in args.grad_bits]]
        for act, grad in jobs:
            s0, s1 = run({"kind": "training", "act_bits": act, "grad_bits": grad}, d, out / "raw")
            row = {"act_bits": act, "grad_bits": grad, "losses": s1["losses"], "val_loss": s1["val_loss"],
                   "fwd_wire_bits": 8 * s0["fwd_bytes"] / s0["fwd_elements"],
                   "bwd_wire_bits": 8 * s1["bwd_bytes"] / s1["bwd_elements"]}  # fmt: skip
            report["training"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
    if "engine" not in args.skip:
        jobs = [("gpipe", "eval", None, None), ("gpipe", "eval", 3.5, None), ("gpipe", "train", None, None),
                ("gpipe", "train", 3.5, 4.0), ("1f1b", "train", None, None), ("1f1b", "train", 3.5, 4.0)]  # fmt: skip
        for schedule, mode, act, grad in jobs:
            job = {"kind": "engine", "schedule": schedule, "mode": mode, "act_bits": act, "grad_bits": grad}
            s0, s1 = run(job, d, out / "raw")
            row = {"schedule": schedule, "mode": mode, "act_bits": act, "grad_bits": grad, "ppl": s1.get("ppl"),
                   "losses": s1["losses"], "fwd_wire_bits": 8 * s0["bytes"] / max(s0["elements"], 1),
                   "bwd_wire_bits": 8 * s1["bytes"] / max(s1["elements"], 1) if s1["elements"] else None,
                   "seconds": max(s0["seconds"], s1["seconds"]), "refits": s0["refits"] + s1["refits"]}  # fmt: skip
            report["engine"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
    write(report, out, args)


def write(report: dict, out: Path, args) -> None:
    (out / "bench_pipeline.json").write_text(json.dumps(report, indent=1))
    lines = []
    inf = report["inference"]
    if inf:
        ref = inf[0]
        lines += [f"Inference: {args.windows} windows x {SEQ} tokens; hidden states (576 per token) cross once.", "",
                  "| hidden states | perplexity (vs raw) | bits/element on the wire | bytes/token | stage 0 s | "
                  "encode s | send s | decode s | stage 1 s | decode: bytes/token, bits/element | decode tok/s | "
                  "same greedy tokens |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in inf:
            name = "raw fp32" if r["bits"] is None else f"{r['bits']} bits"
            same = sum(a == b for a, b in zip(r["generated"], ref["generated"], strict=True))
            lines.append(f"| {name} | {r['ppl']:.3f} ({100 * (r['ppl'] / ref['ppl'] - 1):+.2f}%) | "
                         f"{r['wire_bits']:.3f} | {r['bytes_per_token']:.0f} | {r['stage0_s']:.1f} | "
                         f"{r['encode_s']:.2f} | {r['send_s']:.2f} | {r['decode_s']:.2f} | {r['stage1_s']:.1f} | "
                         f"{r['gen_bytes_per_token']:.0f}, {r['gen_wire_bits']:.2f} | {r['gen_tok_s']:.2f} | "
                         f"{same}/{len(ref['generated'])} |")  # fmt: skip
        lines.append("")
    tr = report["training"]
    if tr:
        ref = tr[0]
        lines += [f"Training: {args.train_steps} steps, batch {TRAIN_BATCH} x {TRAIN_SEQ} tokens, AdamW 2e-5; "
                  f"validation loss of the trained stages on {VAL} held-out windows (evaluated uncompressed).", "",
                  "| activations / gradients | final train loss (mean of last 5) | val loss (vs raw) | "
                  "bits/element forward | bits/element backward |", "|---|---|---|---|---|"]  # fmt: skip
        for r in tr:
            name = f"{r['act_bits'] or 'raw'} / {r['grad_bits'] or 'raw'}"
            last = sum(r["losses"][-5:]) / len(r["losses"][-5:])
            change = 100 * (r["val_loss"] / ref["val_loss"] - 1)
            lines.append(f"| {name} | {last:.4f} | {r['val_loss']:.4f} ({change:+.2f}%) "
                         f"| {r['fwd_wire_bits']:.3f} | {r['bwd_wire_bits']:.3f} |")  # fmt: skip
        curves = {f"activations {r['act_bits'] or 'raw'}, gradients {r['grad_bits'] or 'raw'}":
                  (list(range(1, len(r["losses"]) + 1)), r["losses"]) for r in tr}  # fmt: skip
        plot_curves(curves, "step", "training loss", out / "bench_pipeline_training.png")
    eng = report.get("engine", [])
    if eng:
        lines += ["", "torch.distributed.pipelining (PipelineStage + schedule), fixed-size carriers; eval: the "
                  f"{args.windows} windows in microbatches of 2; train: the run above in microbatches of 1.", "",
                  "| schedule | mode | activations / gradients | perplexity or final train loss (mean of last 5) | "
                  "bits/element forward | bits/element backward | carrier refits | s |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in eng:
            name = f"{r['act_bits'] or 'raw'} / {r['grad_bits'] or ('raw' if r['mode'] == 'train' else '-')}"
            value = f"{r['ppl']:.3f}" if r["mode"] == "eval" else f"{sum(r['losses'][-5:]) / len(r['losses'][-5:]):.4f}"
            bwd = f"{r['bwd_wire_bits']:.3f}" if r["bwd_wire_bits"] is not None else "-"
            lines.append(f"| {r['schedule']} | {r['mode']} | {name} | {value} | {r['fwd_wire_bits']:.3f} | {bwd} | "
                         f"{r['refits']} | {r['seconds']:.0f} |")  # fmt: skip
    (out / "bench_pipeline.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
