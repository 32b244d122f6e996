"""``vc-quant``: compress | plan | inspect | verify | lm-eval.

vc-quant compress SRC DST --bits 2.5 [--codec rans|av1] [--allocation uniform] [--config PRESET] [--streaming]
vc-quant plan SRC -o plan.safetensors --bits 2.5  # Fisher bits + column scales, for --streaming --plan
vc-quant inspect DST [--all]
vc-quant verify DST                              # every tensor, every shard, the config; exit 1 on failure
vc-quant lm-eval --model hf --model_args pretrained=DST --tasks piqa
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from vc_quant.errors import VcQuantError

logger = logging.getLogger("vc_quant.cli")
_DTYPES = {"auto": "auto", "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _version() -> str:
    from vc_quant import __version__

    return __version__


def _config_from_args(args: argparse.Namespace):
    from vc_quant.config import VcQuantizationConfig

    changes = {"bits": args.bits, "codec": args.codec, "allocation": args.allocation, "scaling": args.scaling}
    if args.config:
        return VcQuantizationConfig.from_file(args.config, **changes)
    return VcQuantizationConfig(**{k: v for k, v in changes.items() if v is not None})


def _check_paths(src: str, dst: Path, overwrite: bool) -> None:
    src_path = Path(src)
    if src_path.exists():
        if dst.resolve() == src_path.resolve() or src_path.resolve() in dst.resolve().parents:
            raise VcQuantError(f"DST {dst} is SRC or inside it: that would destroy the source model")
        if dst.resolve() in src_path.resolve().parents:
            raise VcQuantError(f"SRC {src} is inside DST {dst}: that would destroy the source model")
    elif src.startswith((".", "/", "~")) or src.count("/") > 1:
        raise FileNotFoundError(f"SRC {src}: no such folder (and not a hub id of the form owner/name)")
    if dst.exists() and not dst.is_dir():
        raise VcQuantError(f"DST {dst} exists and is a file, not a checkpoint folder")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} exists; pass --overwrite to replace it")


def cmd_compress(args: argparse.Namespace) -> int:
    dst = Path(args.dst)
    _check_paths(args.src, dst, args.overwrite)
    config = _config_from_args(args)
    dtype = _DTYPES[args.dtype]
    t0 = time.perf_counter()
    if args.plan and not args.streaming:
        raise VcQuantError("--plan is for --streaming (without it, compress runs the Fisher pass itself)")
    if args.streaming:
        from vc_quant.streaming import compress_streaming, load_plan

        plan = load_plan(args.plan) if args.plan else None
        stats = compress_streaming(args.src, dst, config, dtype=None if dtype == "auto" else dtype,
                                   max_shard_bytes=_parse_size(args.max_shard_size), plan=plan)  # fmt: skip
        tensors, values, bpw = stats["tensors"], stats["values"], stats["bits_per_weight"]
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from vc_quant.hf.saving import save_atomic

        model = AutoModelForCausalLM.from_pretrained(args.src, quantization_config=config, dtype=dtype)
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.src)
        except (OSError, ValueError) as exc:
            logger.warning("no tokenizer saved (%s)", exc)
            tokenizer = None
        save_atomic(model, dst, tokenizer=tokenizer, max_shard_size=args.max_shard_size)
        report = model.vc_quant_report
        tensors, values, bpw = report.tensors, report.values, report.bits_per_weight
    seconds = time.perf_counter() - t0
    print(f"compressed {tensors} tensors ({values / 1e6:.1f} M values) at {bpw:.3f} bits/weight all-in in "
          f"{seconds:.1f} s ({values / seconds / 1e6:.2f} M params/s) -> {dst}")  # fmt: skip
    return 0


def _parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    upper = text.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if upper.endswith(unit):
            try:
                return int(float(upper.removesuffix(unit)) * factor)
            except ValueError:
                break
    raise VcQuantError(f"--max-shard-size {text!r}: expected a size like 500MB or 2GB")


def cmd_plan(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM

    from vc_quant.allocation import plan_bits
    from vc_quant.config import VcQuantizationConfig
    from vc_quant.streaming import quantized_weight_names, save_plan

    config = VcQuantizationConfig(bits=args.bits)
    names = sorted(quantized_weight_names(Path(args.src), config))
    model = AutoModelForCausalLM.from_pretrained(args.src, dtype=torch.float32)
    plan = plan_bits(model, names, config.bits, config.allocation, config.scaling, r_max=config.max_rate())
    save_plan(plan, args.output)
    print(f"plan for {len(plan)} weights at {config.bits} bits/weight on average -> {args.output}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from vc_quant.checkpoint import Checkpoint

    ckpt = Checkpoint.open(args.path)
    rows, q_values, q_bytes = [], 0, 0
    for key in ckpt.quantized_keys():
        enc = ckpt.read_record(key, verify=False)
        nbytes = ckpt.record_nbytes(key)
        q_values += enc.numel
        q_bytes += nbytes
        rows.append((key, "x".join(map(str, enc.shape)), 8 * nbytes / enc.numel, enc.meta.get("qp"), nbytes))
    plain = ckpt.plain_keys()
    plain_bytes = sum(ckpt.entries[k].nbytes for k in plain)
    plain_values = sum(ckpt.entries[k].numel for k in plain)
    if args.all or len(rows) <= 40:
        print(f"{'tensor':<56} {'shape':>12} {'bpw':>7} {'qp':>4} {'bytes':>10}")
        for key, shape, bpw, qp, nbytes in rows:
            print(f"{key:<56} {shape:>12} {bpw:7.3f} {qp!s:>4} {nbytes:10d}")
    print(f"quantized: {len(rows)} tensors, {q_values / 1e6:.2f} M values, {8 * q_bytes / max(q_values, 1):.3f} "
          f"bits/weight all-in, {q_bytes / 1e6:.2f} MB")  # fmt: skip
    print(f"plain:     {len(plain)} tensors, {plain_values / 1e6:.2f} M values, {plain_bytes / 1e6:.2f} MB; "
          f"total {(q_bytes + plain_bytes) / 1e6:.2f} MB")  # fmt: skip
    for problem in ckpt.problems:
        print(f"WARNING {problem}", file=sys.stderr)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Every record decoded, every plain tensor against its CRC32, shards, index and config agree."""
    from vc_quant import format as fmt
    from vc_quant.checkpoint import Checkpoint, read_json
    from vc_quant.codec import decode_tensor
    from vc_quant.config import VcQuantizationConfig

    path = Path(args.path)
    failures: list[str] = []
    save_id = None
    try:
        config = read_json(path / "config.json", "config.json")
        qconfig = config.get("quantization_config")
        if not isinstance(qconfig, dict) or qconfig.get("quant_method") != fmt.QUANT_METHOD:
            raise VcQuantError(f"{path}: config.json has no vc quantization_config: not a vc_quant checkpoint")
        save_id = VcQuantizationConfig.from_dict(qconfig).save_id
    except (VcQuantError, ValueError, TypeError) as exc:
        failures.append(f"config.json: {exc}")
    ckpt = Checkpoint.open(path)
    failures += ckpt.problems
    try:
        ckpt.check_save(save_id)
    except VcQuantError as exc:
        failures.append(str(exc))
    quantized = ckpt.quantized_keys()
    for key in quantized:
        try:
            decode_tensor(ckpt.read_record(key), name=key)
        except (VcQuantError, RuntimeError, OSError) as exc:
            failures.append(f"{key}: {exc}" if not str(exc).startswith(key) else str(exc))
    crc = ckpt.plain_crc()
    plain = ckpt.plain_keys()
    for key in plain:
        if key not in crc:
            failures.append(f"{key}: no checksum in the shard metadata (written by vc_quant < 0.2?)")
        elif fmt.tensor_crc32(ckpt.read(key)) != crc[key]:
            failures.append(f"{key}: checksum mismatch (the stored tensor is corrupted)")
    for f in failures:
        print(f"FAIL {f}", file=sys.stderr)
    print(f"verified {len(quantized)} compressed and {len(plain)} plain tensors in {len(ckpt.files)} shard(s): "
          f"{'ok' if not failures else f'{len(failures)} failure(s)'}")  # fmt: skip
    if not quantized and not failures:
        print("FAIL no compressed tensor found: not a vc_quant checkpoint", file=sys.stderr)
        return 1
    return 1 if failures else 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vc-quant", description="Video-codec quantization for transformers models")
    ap.add_argument("--version", action="version", version=f"vc-quant {_version()}")
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compress", help="quantize SRC (folder or hub id) and save to DST (atomically)")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--bits", type=float, default=None, help="all-in bits per weight (default 2.5 or the preset's)")
    c.add_argument("--codec", choices=["hevc", "av1", "h264", "rans"], default=None)
    c.add_argument("--allocation", choices=["fisher", "uniform"], default=None)
    c.add_argument("--scaling", choices=["fisher", "none"], default=None, help="Fisher input-column scaling")
    c.add_argument("--config", help="preset file (configs/*.json|yaml)")
    c.add_argument("--dtype", default="auto", choices=sorted(_DTYPES), help="dtype of unquantized parts")
    c.add_argument("--max-shard-size", default="5GB")
    c.add_argument(
        "--streaming",
        action="store_true",
        help="shard by shard from safetensors, bounded memory (uniform, no scaling, or --plan)",
    )
    c.add_argument("--plan", help="bits and column scales from `vc-quant plan` (with --streaming)")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=cmd_compress)
    p = sub.add_parser("plan", help="Fisher bits + column scales of SRC (for compress --streaming --plan)")
    p.add_argument("src")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--bits", type=float, default=2.5)
    p.set_defaults(func=cmd_plan)
    i = sub.add_parser("inspect", help="per-tensor bits/QP/shape table and totals")
    i.add_argument("path")
    i.add_argument("--all", action="store_true", help="list every tensor even for large models")
    i.set_defaults(func=cmd_inspect)
    v = sub.add_parser("verify", help="decode every record, check every plain tensor, shards and config")
    v.add_argument("path")
    v.set_defaults(func=cmd_verify)
    sub.add_parser("lm-eval", help="lm-eval harness with vc_quant imported; args go to lm-eval "
                   "(--offline-tasks adds piqa_offline / wiki_offline)")  # fmt: skip
    return ap


def run_lm_eval(argv: list[str]) -> int:
    """lm-eval's own CLI with vc_quant imported (so ``pretrained=DST`` decodes on load).

    ``--offline-tasks`` writes task configs for the offline PIQA / Wikipedia copies
    (``piqa_offline``, ``wiki_offline``) and adds them with ``--include_path``.
    """
    from lm_eval.__main__ import cli_evaluate

    import vc_quant  # noqa: F401 — registers the quantization method before lm-eval loads the model

    if "--offline-tasks" in argv:
        from vc_quant.evaluation import write_offline_tasks
        from vc_quant.testing import asset_dir

        argv = [a for a in argv if a != "--offline-tasks"]
        folder = write_offline_tasks(asset_dir() / "lm_eval_tasks")
        argv += ["--include_path", str(folder)]
    sys.argv = ["lm-eval", *argv]
    cli_evaluate()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lm-eval"]:  # everything after it belongs to lm-eval's own parser
        return run_lm_eval(argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "urllib3", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (VcQuantError, FileNotFoundError, FileExistsError, OSError) as exc:
        print(f"vc-quant: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
