"""``vc-quant``: compress | inspect | verify a checkpoint.

vc-quant compress SRC DST --bits 2.5 [--config configs/default.json]
vc-quant inspect DST [--all]
vc-quant verify DST
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from vc_quant import format as fmt
from vc_quant.errors import VcQuantError

logger = logging.getLogger("vc_quant.cli")


def _shards(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    single = path / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    return [single]


def iter_records(path: Path) -> Iterator[tuple[str, dict[str, torch.Tensor] | None, torch.Tensor | None]]:
    """Yield ``(key, stored entries, None)`` per quantized tensor and ``(key, None, tensor)`` per plain one."""
    for shard in _shards(path):
        with safe_open(str(shard), framework="pt") as f:
            keys = set(f.keys())
            for key in sorted(keys):
                if any(key.endswith(s) for s in fmt.COMPANIONS.values()):
                    continue
                if fmt.is_quantized_key(key, keys):
                    entries = {key: f.get_tensor(key)}
                    entries.update({key + s: f.get_tensor(key + s) for s in fmt.COMPANIONS.values() if key + s in keys})
                    yield key, entries, None
                else:
                    yield key, None, f.get_tensor(key)


def cmd_compress(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vc_quant.config import VcQuantizationConfig

    if args.config:
        config = VcQuantizationConfig.from_file(args.config, bits=args.bits)
    else:
        config = VcQuantizationConfig(bits=args.bits if args.bits is not None else 2.5)
    dst = Path(args.dst)
    if dst.exists() and not args.overwrite:
        raise FileExistsError(f"{dst} exists; pass --overwrite to replace it")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.src, quantization_config=config, dtype=args.dtype)
    quantize_s = time.perf_counter() - t0
    # atomic: write next to DST, then rename; a failed save never looks like a checkpoint
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size=args.max_shard_size)
    try:
        AutoTokenizer.from_pretrained(args.src).save_pretrained(tmp)
    except (OSError, ValueError) as exc:
        logger.warning("no tokenizer saved (%s)", exc)
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    report = model.vc_quant_report
    print(f"compressed {report.tensors} tensors ({report.values / 1e6:.1f} M values) at "
          f"{report.bits_per_weight:.3f} bits/weight all-in in {quantize_s:.1f} s "
          f"({report.values / quantize_s / 1e6:.2f} M params/s) -> {dst}")  # fmt: skip
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    path = Path(args.path)
    rows, q_values, q_bytes, plain_bytes, plain_values = [], 0, 0, 0, 0
    for key, entries, plain in iter_records(path):
        if entries is None:
            plain_bytes += plain.numel() * plain.element_size()
            plain_values += plain.numel()
            continue
        meta = json.loads(bytes(entries[key + fmt.META_SUFFIX].numpy().tobytes()))
        numel = 1
        for s in meta["shape"]:
            numel *= s
        nbytes = sum(t.numel() * t.element_size() for t in entries.values())
        q_values += numel
        q_bytes += nbytes
        rows.append((key, "x".join(map(str, meta["shape"])), 8 * nbytes / numel, meta.get("qp"), nbytes))
    if args.all or len(rows) <= 40:
        print(f"{'tensor':<56} {'shape':>12} {'bpw':>7} {'qp':>4} {'bytes':>10}")
        for key, shape, bpw, qp, nbytes in rows:
            print(f"{key:<56} {shape:>12} {bpw:7.3f} {qp!s:>4} {nbytes:10d}")
    total = q_bytes + plain_bytes
    print(f"quantized: {len(rows)} tensors, {q_values / 1e6:.2f} M values, {8 * q_bytes / max(q_values, 1):.3f} "
          f"bits/weight all-in, {q_bytes / 1e6:.2f} MB")  # fmt: skip
    print(f"plain:     {plain_values / 1e6:.2f} M values, {plain_bytes / 1e6:.2f} MB; total {total / 1e6:.2f} MB")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from vc_quant.codec import decode_tensor

    path = Path(args.path)
    n, failures = 0, []
    for key, entries, _ in iter_records(path):
        if entries is None:
            continue
        n += 1
        try:
            enc = fmt.from_state_dict(key, entries)
            out = decode_tensor(enc)
            if not bool(torch.isfinite(out).all()):
                raise VcQuantError(f"{key}: decoded values are not finite")
        except (VcQuantError, ValueError, RuntimeError) as exc:
            failures.append(str(exc))
    for f in failures:
        print(f"FAIL {f}", file=sys.stderr)
    print(f"verified {n} tensors: {n - len(failures)} ok, {len(failures)} failed")
    return 1 if failures or n == 0 else 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="vc-quant", description="Video-codec quantization for transformers models")
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compress", help="quantize SRC (hub id or folder) and save to DST")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--bits", type=float, default=None, help="all-in bits per weight (default 2.5 or the config's)")
    c.add_argument("--config", help="preset file (configs/*.json|yaml)")
    c.add_argument("--dtype", default="auto", help="dtype of unquantized parts: auto|float16|bfloat16|float32")
    c.add_argument("--max-shard-size", default="5GB")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=cmd_compress)
    i = sub.add_parser("inspect", help="per-tensor bits/QP/shape table and totals")
    i.add_argument("path")
    i.add_argument("--all", action="store_true", help="list every tensor even for large models")
    i.set_defaults(func=cmd_inspect)
    v = sub.add_parser("verify", help="check checksums and decode every tensor")
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
    if getattr(args, "dtype", None) not in (None, "auto"):
        args.dtype = getattr(torch, args.dtype)
    try:
        return args.func(args)
    except (VcQuantError, FileNotFoundError, FileExistsError) as exc:
        print(f"vc-quant: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
