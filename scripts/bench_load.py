"""GPU load benchmark: NVDEC decode throughput and from_pretrained time, one run.

1. a model: ``--src DIR`` (a real checkpoint) or a Llama built from a config
   (``--arch tinyllama-1.1b``: the TinyLlama-1.1B shape, random N(0, 0.02)
   weights — nothing can be downloaded here; random Gaussian weights code at the
   rates of rotated real ones), saved as fp16 safetensors;
2. compressed with vc_quant (``--bits``, uniform allocation: the Fisher pass is a
   quality feature and does not change decode speed);
3. decode throughput of every compressed tensor with 1..N NVDEC sessions
   (threads), NVDEC alone (frames) and the whole decode (frames → dense fp16 on
   the GPU), next to the CPU decoder (FFmpeg, all cores) on the same records;
4. ``from_pretrained(..., device_map="cuda")`` of the compressed checkpoint vs the
   fp16 checkpoint, alternated, from the same disk (page cache dropped before
   each load when the machine allows it, else warm), plus a logits check.

    python scripts/bench_load.py --arch tinyllama-1.1b --bits 2.5 --sessions 1,2,4,7,14
    python scripts/bench_load.py --probe                  # NVDEC status and the binding's API
    python scripts/bench_load.py --export-real-weights W.safetensors  # for GPU tests elsewhere
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ARCHS = {
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
}  # fmt: skip


def probe() -> None:
    """Print NVDEC status and the PyNvVideoCodec API this machine has (for debugging)."""
    from vc_quant.codec.video.backends.nvcodec import nvdec_status

    print("nvdec_status:", nvdec_status())
    try:
        import PyNvVideoCodec as nvc
    except Exception as exc:
        print("PyNvVideoCodec import failed:", exc)
        return
    print("PyNvVideoCodec", getattr(nvc, "__version__", "?"), [n for n in dir(nvc) if not n.startswith("_")])
    for name in ("CreateDecoder", "PacketData", "GetDecoderCaps", "DisplayDecodeLatencyType"):
        obj = getattr(nvc, name, None)
        print(f"--- {name}:", (obj.__doc__ or "")[:3000] if obj is not None else "absent")
    print("HEVC decoder caps:", nvc.GetDecoderCaps(gpuid=0, codec=nvc.cudaVideoCodec.HEVC))
    try:
        print("HEVC encoder caps (NVENC):", nvc.GetEncoderCaps(gpuid=0, codec="hevc"))
    except Exception as exc:
        print("HEVC encoder caps (NVENC): unavailable:", str(exc).splitlines()[0][:200])
    print("PacketData attributes:", [n for n in dir(nvc.PacketData()) if not n.startswith("_")])
    print("DecodedFrame attributes:", [n for n in dir(nvc.DecodedFrame) if not n.startswith("_")])
    from vc_quant import encode_tensor
    from vc_quant.codec.video.backends.nvcodec import _Session

    enc = encode_tensor(torch.randn(300, 576) * 0.02, 3.0)
    print("VideoPacketFlag:", [n for n in dir(nvc.VideoPacketFlag) if not n.startswith("_")])
    lay = enc.meta["layout"]
    session = _Session(torch.device("cuda", 0), 2048)
    session.set_size(lay["width"], lay["height"])
    data = enc.bitstream.contiguous()
    frames = session._decode(data, 0, data.numel())
    print(f"one access unit -> {len(frames)} frame(s) before flush; flush -> {len(session._flush())}")
    if frames:
        f = frames[0]
        print("frame:", {n: str(getattr(f, n))[:200] for n in ("shape", "strides", "dtype", "format") if hasattr(f, n)})
        t = torch.from_dlpack(f)
        print("from_dlpack:", t.shape, t.stride(), t.dtype, t.device)


def export_real_weights(path: str) -> None:
    from safetensors.torch import load_file, save_file

    from vc_quant.testing import smollm2_checkpoint

    state = load_file(str(smollm2_checkpoint() / "model.safetensors"))
    picked = {k: v.half().contiguous() for k, v in state.items() if ".layers.0." in k and v.dim() == 2}
    save_file(picked, path)
    print(f"wrote {len(picked)} SmolLM2 layer-0 matrices ({sum(v.numel() for v in picked.values()) / 1e6:.1f} M) "
          f"to {path}")  # fmt: skip


def build_fp16(args, work: Path) -> Path:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    dst = work / "fp16"
    if (dst / "config.json").exists():
        return dst
    t0 = time.perf_counter()
    if args.src:
        model = AutoModelForCausalLM.from_pretrained(args.src, dtype=torch.float16)
    else:
        torch.manual_seed(0)
        layers = 1 if args.repeat_layer else ARCHS[args.arch]["num_hidden_layers"]
        cfg = dict(ARCHS[args.arch], num_hidden_layers=layers)
        model = LlamaForCausalLM(LlamaConfig(**cfg, torch_dtype="float16")).half()
    model.save_pretrained(dst)
    n = sum(p.numel() for p in model.parameters())
    print(f"fp16 checkpoint: {n / 1e9:.3f} B params, {_dir_bytes(dst) / 1e9:.2f} GB, {time.perf_counter() - t0:.0f} s")
    return dst


def repeat_layer(src: Path, dst: Path, layers: int) -> Path:
    """Copy a one-layer checkpoint (fp16 or compressed) into a ``layers``-layer one.

    Every layer holds layer 0's stored tensors, so the big model costs one layer's
    encode; its load does the full model's work (each tensor decodes on its own).
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    if (dst / "config.json").exists():
        return dst
    dst.mkdir(parents=True, exist_ok=True)
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        metadata = f.metadata()
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    out = {}
    for key, tensor in state.items():
        if ".layers.0." in key:
            out.update({key.replace(".layers.0.", f".layers.{i}."): tensor.clone() for i in range(layers)})
        else:
            out[key] = tensor
    save_file(out, str(dst / "model.safetensors"), metadata=metadata)
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for extra in ("generation_config.json",):
        if (src / extra).exists():
            shutil.copy(src / extra, dst / extra)
    print(f"{dst.name}: layer 0 repeated x{layers}: {_dir_bytes(dst) / 1e9:.3f} GB")
    return dst


def compress(args, src: Path, work: Path) -> Path:
    from transformers import AutoModelForCausalLM

    from vc_quant import VcQuantizationConfig

    dst = work / f"vc{args.bits}"
    if (dst / "config.json").exists():
        return dst
    config = VcQuantizationConfig(bits=args.bits, allocation="uniform", scaling="none", preset=args.preset)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=config, dtype=torch.float16)
    secs = time.perf_counter() - t0
    model.save_pretrained(dst)
    r = model.vc_quant_report
    print(f"compressed {r.tensors} tensors ({r.values / 1e9:.3f} B values) at {r.bits_per_weight:.3f} bpw in "
          f"{secs:.0f} s on {os.cpu_count()} cores; checkpoint {_dir_bytes(dst) / 1e9:.3f} GB")  # fmt: skip
    return dst


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def load_records(path: Path):
    from vc_quant import format as fmt
    from vc_quant.cli import iter_records

    return [(key, fmt.from_state_dict(key, entries)) for key, entries, _ in iter_records(path) if entries is not None]


def decode_throughput(records, sessions_list: list[int], cpu: bool) -> list[dict]:
    from vc_quant.codec import decode_tensor
    from vc_quant.codec.video import frames as fr
    from vc_quant.codec.video.backends.nvcodec import NvdecDecoderPool, decode_canvas_nvdec

    samples = sum(fr.FrameLayout.from_dict(e.meta["layout"]).samples for _, e in records)
    values = sum(e.numel for _, e in records)
    outs = [torch.empty(e.shape, dtype=torch.float16, device="cuda") for _, e in records]
    rows = []

    def row(kind: str, sessions: int, secs: float) -> dict:
        r = {"kind": kind, "sessions": sessions, "seconds": secs, "samples_GBps": samples / secs / 1e9,
             "Mvalues_per_s": values / secs / 1e6}  # fmt: skip
        print(f"  {kind:<22} sessions={sessions:<3} {secs:7.3f} s  {r['samples_GBps']:6.3f} GB/s of samples  "
              f"{r['Mvalues_per_s']:8.0f} M weights/s")  # fmt: skip
        return r

    def frames_only(key_enc) -> int:
        return decode_canvas_nvdec(key_enc[1], "cuda").numel()

    for n in sessions_list:
        with ThreadPoolExecutor(n) as pool:  # NVDEC only: samples to GPU memory, then dropped
            for _pass in ("warm-up", "timed"):  # the first pass creates sessions and warms the allocator
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                list(pool.map(frames_only, records))
                torch.cuda.synchronize()
            rows.append(row("nvdec frames", n, time.perf_counter() - t0))
        with NvdecDecoderPool(n) as pool:  # the whole decode, as from_pretrained runs it
            for _pass in ("warm-up", "timed"):
                t0 = time.perf_counter()
                for f in [pool.decode(e, o) for (_, e), o in zip(records, outs, strict=True)]:
                    f.result()
                torch.cuda.synchronize()
            rows.append(row("nvdec -> fp16 tensor", n, time.perf_counter() - t0))
    if cpu:
        threads = os.cpu_count() or 1
        with ThreadPoolExecutor(threads) as pool:
            t0 = time.perf_counter()
            list(pool.map(lambda ke: decode_tensor(ke[1], dtype=torch.float16, threads=1), records))
            rows.append(row("cpu ffmpeg -> fp16", threads, time.perf_counter() - t0))
    return rows


def _drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def load_times(fp16: Path, vc: Path, reps: int) -> dict:
    from transformers import AutoModelForCausalLM

    import vc_quant  # noqa: F401  (registers the "vc" method)

    def load(path: Path, cold: bool):
        if cold:
            _drop_caches()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(path, device_map="cuda", dtype=torch.float16)
        torch.cuda.synchronize()
        return model, time.perf_counter() - t0

    cold = _drop_caches()
    for path in (fp16, vc):  # warm-up: CUDA context, kernels, imports
        model, _ = load(path, False)
        del model
    times: dict[str, list[float]] = {"fp16": [], "vc": []}
    for _ in range(reps):
        for tag, path in (("fp16", fp16), ("vc", vc)):
            model, secs = load(path, cold)
            times[tag].append(secs)
            if tag == "vc":
                report = model.vc_quant_report
            del model
            torch.cuda.empty_cache()
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"  from_pretrained -> cuda ({'page cache dropped' if cold else 'warm page cache'}), median of {reps}: "
          f"fp16 {med['fp16']:.2f} s ({_dir_bytes(fp16) / 1e9:.2f} GB)  vc {med['vc']:.2f} s "
          f"({_dir_bytes(vc) / 1e9:.3f} GB)  ratio vc/fp16 {med['vc'] / med['fp16']:.2f}  "
          f"decode backend: {report.decode_backend}")  # fmt: skip
    return {"cold": cold, "times": times, "median": med, "ratio": med["vc"] / med["fp16"],
            "decode_backend": report.decode_backend, "fallback": report.decode_fallback_reason}  # fmt: skip


def profile_load(vc: Path) -> None:
    """Where the time of one compressed-checkpoint from_pretrained goes (top functions)."""
    import cProfile
    import pstats

    from transformers import AutoModelForCausalLM

    prof = cProfile.Profile()
    prof.enable()
    model = AutoModelForCausalLM.from_pretrained(vc, device_map="cuda", dtype=torch.float16)
    torch.cuda.synchronize()
    prof.disable()
    del model
    pstats.Stats(prof).sort_stats("cumulative").print_stats(30)


def logits_check(vc: Path) -> float:
    """Max |logit| difference between the checkpoint decoded on NVDEC and on the CPU."""
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 15, 300, 7, 42, 9, 1000, 3]])
    gpu = AutoModelForCausalLM.from_pretrained(vc, device_map="cuda", dtype=torch.float32)
    with torch.no_grad():
        a = gpu(ids.cuda()).logits.cpu()
    del gpu
    cpu = AutoModelForCausalLM.from_pretrained(vc, dtype=torch.float32)
    with torch.no_grad():
        b = cpu(ids).logits
    diff = float((a - b).abs().max())
    print(f"  logits, NVDEC-decoded on GPU vs FFmpeg-decoded on CPU (fp32): max |diff| {diff:.2e} "
          f"(max |logit| {float(b.abs().max()):.1f})")  # fmt: skip
    return diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--probe", action="store_true", help="print NVDEC status and the binding's API, then exit")
    ap.add_argument("--export-real-weights", metavar="PATH", help="write SmolLM2 layer-0 matrices, then exit")
    ap.add_argument("--src", help="a real checkpoint (local dir or hub id) instead of --arch")
    ap.add_argument("--arch", default="tinyllama-1.1b", choices=sorted(ARCHS))
    ap.add_argument("--bits", type=float, default=2.5)
    ap.add_argument("--repeat-layer", action="store_true",
                    help="--arch models: encode one decoder layer and repeat it in every layer (same load work, "
                         "1/L of the encode time)")  # fmt: skip
    ap.add_argument("--preset", default="superfast", help="x265 preset for the compression step")
    ap.add_argument("--sessions", default="1,2,4,7,14", help="NVDEC sessions (threads) to try")
    ap.add_argument("--reps", type=int, default=3, help="alternated from_pretrained runs per checkpoint")
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU decoder row")
    ap.add_argument("--skip-load", action="store_true", help="throughput only")
    ap.add_argument("--profile", action="store_true", help="profile one compressed-checkpoint load")
    ap.add_argument("--work", default="results/tmp/bench_load", help="where checkpoints are written")
    ap.add_argument("--out", default="results/gpu", help="where the JSON result goes")
    args = ap.parse_args()
    if args.export_real_weights:
        return export_real_weights(args.export_real_weights)
    if args.probe:
        return probe()
    from vc_quant.codec.video.backends.nvcodec import nvdec_status

    status = nvdec_status()
    if not status:
        raise SystemExit(f"bench_load needs NVDEC: {status.reason}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"device: {torch.cuda.get_device_name()} | {status} | torch {torch.__version__} | {platform.node()}")
    fp16 = build_fp16(args, work)
    vc = compress(args, fp16, work)
    if args.repeat_layer and not args.src:
        layers = ARCHS[args.arch]["num_hidden_layers"]
        fp16, vc = (
            repeat_layer(fp16, work / f"{fp16.name}_x{layers}", layers),
            repeat_layer(vc, work / f"{vc.name}_x{layers}", layers),
        )
    records = load_records(vc)
    print(f"decode throughput over {len(records)} tensors:")
    sessions = [int(s) for s in args.sessions.split(",")]
    result = {"device": torch.cuda.get_device_name(), "status": str(status), "arch": args.src or args.arch,
              "bits": args.bits, "throughput": decode_throughput(records, sessions, not args.no_cpu)}  # fmt: skip
    if args.profile:
        profile_load(vc)
    if not args.skip_load:
        result["load"] = load_times(fp16, vc, args.reps)
        result["logits_max_abs_diff"] = logits_check(vc)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"bench_load_{Path(args.src).name if args.src else args.arch}_{args.bits}.json"
    (out / name).write_text(json.dumps(result, indent=1))
    print(f"wrote {out / name}")
    shutil.rmtree(work / "unused", ignore_errors=True)


if __name__ == "__main__":
    main()
