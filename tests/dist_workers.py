"""Worker functions for the two-process ``gloo`` tests (importable by spawned children).

Each worker writes what it measured to ``out/rank{r}.pt``; the test in the parent reads it.
"""

# no `from __future__ import annotations`: DDP checks hook annotations as objects

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker, out: Path, *args, world: int = 2) -> list[dict]:
    """Run ``worker(rank, world, out, *args)`` on ``world`` gloo processes; return each rank's saved dict."""
    Path(out).mkdir(parents=True, exist_ok=True)
    mp.spawn(_entry, args=(world, free_port(), worker, str(out), args), nprocs=world, join=True)
    return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _entry(rank: int, world: int, port: int, worker, out: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = worker(rank, world, *args)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# --- DDP hook ------------------------------------------------------------------------------------
def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.Tanh(), torch.nn.Linear(256, 8))


def hook_contract(rank: int, world: int, bits: float) -> dict:
    """One DDP step through a hook wrapper that checks the vc hook against what was gathered."""
    from vc_quant.distributed import VcHookState, ddp, register, unpack, vc_allreduce_hook

    gathered: list[list[torch.Tensor]] = []
    real_gather = ddp._gather

    def recording_gather(tensor, group, world_size):
        out = real_gather(tensor, group, world_size)
        gathered.append(out)
        return out

    ddp._gather = recording_gather
    checks = {"mean_diff": [], "residual_diff": [], "payload_bytes": 0, "wire_bytes": 0, "layout": [], "gains": []}
    model = torch.nn.parallel.DistributedDataParallel(_mlp())
    state = VcHookState(bits=bits)

    def checking_hook(st, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        before = st._residuals.get(bucket.index())
        kept = before is not None and before.shape == bucket.buffer().shape  # dropped across a bucket rebuild
        x = bucket.buffer().detach().clone() + (before if kept else 0)
        gathered.clear()
        # the per-parameter gains assume the buffer is the parameters' gradients end to end
        flat = torch.cat([g.reshape(-1) for g in bucket.gradients()])
        checks["layout"].append(torch.equal(flat, bucket.buffer()))
        fut = vc_allreduce_hook(st, bucket)
        result = fut.value()
        sizes, payloads = [int(s) for s in gathered[0]], gathered[1]
        records = [unpack(p[:n]) for p, n in zip(payloads, sizes, strict=True)]
        checks["gains"].append([n for n, _ in records[rank].segments] == [g.numel() for g in bucket.gradients()])
        decoded = [decode(r) for r in records]
        checks["mean_diff"].append(float((result - torch.stack(decoded).mean(0)).abs().max()))
        checks["residual_diff"].append(float((st._residuals[bucket.index()] - (x - decoded[rank])).abs().max()))
        checks["payload_bytes"] += sizes[rank]
        checks["wire_bytes"] += 8 + len(payloads[rank])
        return fut

    model.register_comm_hook(state, checking_hook)
    torch.manual_seed(rank + 1)
    for _ in range(3):  # DDP rebuilds its buckets after the first iteration
        model(torch.randn(16, 32)).pow(2).mean().backward()
    checks["stats"] = state.stats
    try:  # registering on a model that already has gradients is refused
        register(torch.nn.parallel.DistributedDataParallel(model.module), state)
        checks["late_register"] = "accepted"
    except Exception as exc:
        checks["late_register"] = f"{type(exc).__name__}: {exc}"
    return checks


def replica_gradients(rank: int, world: int, bits: float) -> dict:
    """Two DDP steps with the vc hook, each rank on its own data: the averaged gradients every rank applies."""
    from vc_quant.distributed import VcHookState, register

    model = torch.nn.parallel.DistributedDataParallel(_mlp())
    register(model, VcHookState(bits=bits))
    torch.manual_seed(rank + 1)
    grads = []
    for _ in range(2):
        model.zero_grad()
        model(torch.randn(16, 32)).pow(2).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    return {"grads": grads}


def decode(enc) -> torch.Tensor:
    from vc_quant.distributed import InflightCodec

    return InflightCodec.decode(enc).reshape(-1)


def train_run(rank: int, world: int, hook: str, steps: int) -> dict:
    """A short regression training run under DDP; ``hook``: "allreduce" or "vc-<bits>"."""
    from vc_quant.distributed import VcHookState, register

    model = torch.nn.parallel.DistributedDataParallel(_mlp())
    state = None
    if hook.startswith("vc-"):
        state = VcHookState(bits=float(hook.removeprefix("vc-")))
        register(model, state)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(123)
    target = torch.nn.Linear(32, 8)
    torch.nn.init.normal_(target.weight, generator=g)
    losses = []
    for step in range(steps):
        x = torch.randn(64, 32, generator=torch.Generator().manual_seed(1000 * step + rank))
        with torch.no_grad():
            y = torch.tanh(target(x))
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return {"losses": losses, "bits": state.stats.bits_per_element if state else 32.0}


# --- pipeline ------------------------------------------------------------------------------------
def p2p_round_trip(rank: int, world: int, bits) -> dict:
    from vc_quant.distributed import recv_compressed, send_compressed

    x = torch.randn(37, 576, generator=torch.Generator().manual_seed(0)) * 3
    if rank == 0:
        return {"sent_as": send_compressed(x, 1, bits), "x": x}
    return {"received": recv_compressed(0, shape=(37, 576))}


def p2p_one_token(rank: int, world: int) -> dict:
    """One token's hidden state (576 values) on a 3.5-bit link: too small for a record."""
    from vc_quant.distributed import WireStats, recv_compressed, send_compressed

    x = torch.randn(1, 1, 576, generator=torch.Generator().manual_seed(0)) * 3
    if rank == 0:
        stats = WireStats()
        return {"sent_as": send_compressed(x, 1, 3.5, stats=stats), "x": x, "bits": stats.bits_per_element}
    return {"received": recv_compressed(0, shape=(1, 1, 576))}


def boundary_backward(rank: int, world: int) -> dict:
    """Rank 1 sends its input gradient back compressed; rank 0 runs its backward with what arrives."""
    from vc_quant.distributed import StageBoundary

    boundary = StageBoundary(peer=1 - rank, forward_bits=3.5, backward_bits=4.0)
    if rank == 0:
        leaf = torch.randn(8, 256, generator=torch.Generator().manual_seed(0), requires_grad=True)
        hidden = leaf * 2.0
        boundary.send_forward(hidden)
        boundary.backward(hidden)
        return {"grad_of_hidden": leaf.grad / 2.0, "stats": boundary.backward_link}
    hidden = boundary.recv_forward(shape=(8, 256))
    (hidden.sin() * torch.arange(256)).sum().backward()
    sent = boundary.send_backward(hidden)
    return {"expected": sent, "grad": hidden.grad}


def two_stage_logits(rank: int, world: int, model_dir: str, bits) -> dict:
    """A tiny Llama split in two stages; rank 1 also runs the whole model for the reference."""
    from transformers import AutoModelForCausalLM

    from vc_quant.distributed import StageBoundary
    from vc_quant.distributed.stages import DecoderStage

    ids = torch.tensor([[1, 5, 9, 3, 7, 2, 8, 4, 6, 10, 11, 12]])
    stage = DecoderStage(AutoModelForCausalLM.from_pretrained(model_dir), rank)
    boundary = StageBoundary(peer=1 - rank, forward_bits=bits, sink_tokens=0)  # 12 tokens: no room for an fp16 one
    with torch.no_grad():
        if rank == 0:
            boundary.send_forward(stage(ids))
            return {}
        logits = stage(boundary.recv_forward(requires_grad=False))
        ref = AutoModelForCausalLM.from_pretrained(model_dir)(ids).logits
    return {"logits": logits, "ref": ref, "bits": boundary.forward_link.bits_per_element}


def bad_pipeline_inputs(rank: int, world: int) -> dict:
    from vc_quant.distributed import StageBoundary, recv_compressed, send_compressed

    errors = {}
    if rank == 0:
        for name, call in {
            "int": lambda: send_compressed(torch.arange(10), 1, 3.0),
            "bits": lambda: StageBoundary(peer=1, forward_bits=0.2),
        }.items():
            try:
                call()
            except Exception as exc:
                errors[name] = f"{type(exc).__name__}: {exc}"
        send_compressed(torch.randn(4, 300), 1, 3.0)
        return errors
    try:
        recv_compressed(0, shape=(4, 301))
    except Exception as exc:
        errors["shape"] = f"{type(exc).__name__}: {exc}"
    return errors


def accelerate_prepare(rank: int, world: int) -> dict:
    """accelerate wraps the model in DDP and registers the vc hook through the kwargs handler."""
    import os as _os

    from accelerate import Accelerator

    from vc_quant.distributed import VcHookState, use_with_accelerate

    _os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), ACCELERATE_USE_CPU="true")
    state = VcHookState(bits=2.5)
    accelerator = Accelerator(cpu=True)
    use_with_accelerate(accelerator, state)
    model = accelerator.prepare(_mlp())
    torch.manual_seed(rank)
    accelerator.backward(model(torch.randn(16, 32)).pow(2).mean())
    return {"wrapped": type(model).__name__, "elements": state.stats.elements,
            "grad": next(model.parameters()).grad.clone()}  # fmt: skip


def trainer_hook(rank: int, world: int) -> dict:
    """The HF Trainer wraps the model in DDP; use_in_trainer makes it register the vc hook."""
    import os as _os
    import tempfile

    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from vc_quant.distributed import VcHookState, use_in_trainer

    _os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), ACCELERATE_USE_CPU="true")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))  # fmt: skip
    data = Dataset.from_dict({"input_ids": [list(range(1, 17))] * 8, "labels": [list(range(1, 17))] * 8})
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=2, per_device_train_batch_size=2,
                             report_to=[], use_cpu=True, save_strategy="no", logging_steps=1)  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data)
    state = VcHookState(bits=2.5)
    use_in_trainer(trainer, state)
    trainer.train()
    return {"elements": state.stats.elements, "steps": trainer.state.global_step,
            "wrapped": type(trainer.model_wrapped).__name__}  # fmt: skip


def engine_schedule(rank: int, world: int, model_dir: str, bits, schedule: str, steps: int) -> dict:
    """torch.distributed.pipelining with compressed carriers: a tiny Llama in 2 stages, ``steps`` SGD steps
    on fixed data, then an eval pass; rank 1 returns the losses, the eval logits and the link's bytes."""
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe
    from transformers import AutoModelForCausalLM

    from vc_quant.distributed.engine import FixedLink, build_stage
    from vc_quant.distributed.stages import DecoderStage

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    vocab, hidden = model.config.vocab_size, model.config.hidden_size
    mb, seq, n_mb = 2, 48, 4
    fwd, bwd = FixedLink.shared((mb, seq, hidden), bits, bits)
    stage = DecoderStage(model, rank, 2)
    pipe = build_stage(stage, rank, [(fwd, bwd)], torch.zeros(mb, seq, dtype=torch.long), torch.zeros(mb, seq, vocab))

    def loss_fn(logits, target):
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), target[:, 1:].reshape(-1))

    kind = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
    sched = kind(pipe, n_mb, loss_fn=loss_fn)
    ids = torch.randint(0, vocab, (mb * n_mb, seq), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(stage.parameters(), lr=0.5)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        if rank == 0:
            sched.step(ids)
        else:
            out: list = []
            sched.step(target=ids, losses=out)
            losses.append(float(sum(out) / len(out)))
        opt.step()
    with torch.no_grad():
        logits = sched.eval(ids) if rank == 0 else sched.eval(target=ids)
    link = fwd if rank == 0 else bwd  # each rank encodes one direction
    return {"losses": losses, "logits": logits if rank == 1 else None, "bytes": link.stats.bytes,
            "messages": link.stats.messages, "payload": link.stats.payload_bytes, "numel": link.numel,
            "refits": link.refits}  # fmt: skip
