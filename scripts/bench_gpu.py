"""GPU benchmarks in one short run (scripts/gpu_check.sh calls this): decoders, residency, DDP on nccl.

1. rANS decode on the GPU (Triton): int8 samples and dense fp16 tensors, GB/s of fp16 output
   (2 bytes per value), beside NVDEC decoding HEVC records of the same matrices when NVDEC runs;
   every GPU decode is checked bit-identical (samples) to the CPU decoder on the first matrix.
2. A TinyLlama-shaped model from a config (random N(0, 0.02) weights, ``--layers`` of 22):
   bf16 dense vs vc int8 and vc bitstream (rans) residency on CUDA — tokens/s for greedy
   decoding at batch 1 and 16, prefill tokens/s, weight bytes and peak CUDA memory.
3. The DDP gradient hook on nccl (one process, one GPU: the hook's CUDA path end to end).

Fails (exit 1) without CUDA. Writes ``OUT/bench_gpu.json`` and ``.md``.

    python scripts/bench_gpu.py --out results/gpu [--layers 4] [--matrices 8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch


def cuda_time(fn, repeat: int = 5) -> float:
    """Median seconds of ``fn()`` on the GPU (CUDA events, after one warm-up)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def decoders(n_matrices: int, side: int) -> dict:
    from vc_quant import decode_tensor, encode_tensor
    from vc_quant.codec import decode_samples
    from vc_quant.codec.video.backends.nvcodec import nvdec_status

    gen = torch.Generator().manual_seed(0)
    mats = [torch.randn(side, side, generator=gen) * 0.02 for _ in range(n_matrices)]
    values = n_matrices * side * side
    out: dict = {"matrices": n_matrices, "side": side, "values": values}
    t0 = time.perf_counter()
    recs = [encode_tensor(m, 2.5, codec="rans") for m in mats]
    out["rans_encode_cpu_Mvalues_s"] = values / (time.perf_counter() - t0) / 1e6
    dev = torch.device("cuda")
    cpu = decode_samples(recs[0])
    gpu = decode_samples(recs[0], dev)
    out["rans_triton_bit_identical"] = bool(torch.equal(cpu, gpu.cpu()))
    bufs = [torch.empty(side, side, dtype=torch.int8, device=dev) for _ in recs]
    s = cuda_time(lambda: [decode_samples(r, dev, out=b) for r, b in zip(recs, bufs, strict=True)])
    out["rans_samples_GBs_fp16_equiv"] = 2 * values / s / 1e9
    dense = [torch.empty(side, side, dtype=torch.float16, device=dev) for _ in recs]
    s = cuda_time(lambda: [decode_tensor(r, out=d) for r, d in zip(recs, dense, strict=True)])
    out["rans_dense_fp16_GBs"] = 2 * values / s / 1e9
    status = nvdec_status("hevc")
    out["nvdec"] = status.reason
    if status:
        hevc = [encode_tensor(m, 2.5, codec="hevc") for m in mats[:2]]
        s = cuda_time(lambda: [decode_tensor(r, out=d) for r, d in zip(hevc, dense, strict=False)], repeat=3)
        out["nvdec_hevc_dense_fp16_GBs"] = 2 * len(hevc) * side * side / s / 1e9
    return out


def residency(layers: int) -> dict:
    from transformers import AutoModelForCausalLM, LlamaConfig

    import vc_quant

    config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                         num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)  # fmt: skip
    tmp = Path(tempfile.mkdtemp())
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp / "src")
    q = AutoModelForCausalLM.from_pretrained(tmp / "src", dtype=torch.bfloat16, quantization_config=vc_quant.
                                             VcQuantizationConfig(bits=2.5, codec="rans", allocation="uniform",
                                                                  scaling="none"))  # fmt: skip
    q.save_pretrained(tmp / "vc")
    del q
    rows = {}
    ids = {b: torch.randint(0, 32000, (b, 64), device="cuda") for b in (1, 16)}
    for name in ("bf16", "int8", "bitstream"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        if name == "bf16":
            model = AutoModelForCausalLM.from_pretrained(tmp / "src", dtype=torch.bfloat16, device_map="cuda")
        else:
            model = AutoModelForCausalLM.from_pretrained(tmp / "vc", device_map="cuda", quantization_config=vc_quant.
                                                         VcQuantizationConfig(resident=name))  # fmt: skip
        row = {"weights_bytes": sum(p.numel() * p.element_size() for p in (*model.parameters(), *model.buffers()))}
        with torch.no_grad():
            for b, x in ids.items():
                s = cuda_time(lambda m=model, x=x: m.generate(x, max_new_tokens=32, min_new_tokens=32,
                                                              do_sample=False), repeat=3)  # fmt: skip
                row[f"decode_tok_s_batch{b}"] = b * 32 / s
            s = cuda_time(lambda m=model: m(torch.randint(0, 32000, (4, 512), device="cuda")), repeat=3)
            row["prefill_tok_s"] = 4 * 512 / s
        row["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
        rows[name] = row
        del model
    for name in ("int8", "bitstream"):
        for k in ("decode_tok_s_batch1", "decode_tok_s_batch16", "prefill_tok_s", "weights_bytes"):
            rows[name][k + "_x_bf16"] = rows[name][k] / rows["bf16"][k]
    return {"layers": layers, "hidden": 2048, "rows": rows}


def ddp_nccl() -> dict:
    import torch.distributed as dist

    from vc_quant.distributed import VcHookState, register

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29611")
    dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(
            torch.nn.Linear(512, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 512)).cuda())  # fmt: skip
        state = VcHookState(bits=2.0)
        register(model, state)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for _ in range(3):
            loss = model(torch.randn(64, 512, device="cuda")).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return {"steps": 3, "bits_per_element": state.stats.bits_per_element, "ok": True}
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/gpu")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--matrices", type=int, default=8)
    ap.add_argument("--side", type=int, default=4096)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gpu.py needs a CUDA GPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name, fn in (("decoders", lambda: decoders(args.matrices, args.side)), ("ddp_nccl", ddp_nccl),
                     ("residency", lambda: residency(args.layers))):  # fmt: skip
        t0 = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as exc:  # report every section, even after one fails
            result[name] = {"error": f"{type(exc).__name__}: {exc}"}
        result[name]["seconds"] = time.perf_counter() - t0
        print(json.dumps({name: result[name]}, indent=1), flush=True)
    (out / "bench_gpu.json").write_text(json.dumps(result, indent=1))
    lines = [f"# GPU check: {result['gpu']} (torch {result['torch']})", ""]
    for name, section in result.items():
        if isinstance(section, dict):
            lines.append(f"## {name}\n\n```\n{json.dumps(section, indent=1)}\n```\n")
    (out / "bench_gpu.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
