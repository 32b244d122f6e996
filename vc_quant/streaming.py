"""Streaming compression: shard by shard from safetensors, memory bounded independently of model size.

For models larger than RAM. The model is never built with weights: its skeleton on the
meta device says which tensors are linear weights to quantize (the same rules as
quantize-on-load: default skips, tied weights, ``modules_to_not_convert``,
``overrides``, ``min_numel``). Each source tensor is read on its own from the
memory-mapped shards, quantized weights are encoded a few at a time on the worker
pool, and output shards are written as they fill. Allocation is uniform, or a plan
computed beforehand with the model in memory (``vc-quant plan``: Fisher bits and column
scales per weight, :func:`save_plan` / :func:`load_plan`).

Memory held at any time: the output shard being filled (compressed records and plain
tensors, up to ``max_shard_bytes``) plus the weights in flight on the workers.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from vc_quant import format as fmt
from vc_quant.allocation import TensorPlan
from vc_quant.checkpoint import INDEX_NAME, SINGLE_NAME, Checkpoint
from vc_quant.codec import encode_tensor
from vc_quant.config import VcQuantizationConfig
from vc_quant.errors import VcConfigError
from vc_quant.safetensors_io import read_header, read_tensor, write_file

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                    "merges.txt", "tokenizer.model", "added_tokens.json", "generation_config.json",
                    "chat_template.jinja")  # fmt: skip


def quantized_weight_names(src: Path, config: VcQuantizationConfig) -> set[str]:
    """Names of the weights quantize-on-load would quantize, from the model skeleton (no weights)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.quantizers.base import get_keys_to_not_convert

    from vc_quant.hf.quantizer import VcHfQuantizer

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src))
    quantizer = VcHfQuantizer(config, pre_quantized=False)
    quantizer.modules_to_not_convert = sorted(set(config.skip_list()) | set(get_keys_to_not_convert(model)))
    return {f"{name}.weight" for name, module in model.named_modules() if quantizer._wants(name, module)}


def _source_tensors(ckpt: Checkpoint) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint, read one at a time (no shard is mapped whole)."""
    for key in sorted(ckpt.entries, key=lambda k: (str(ckpt.entries[k].shard), ckpt.entries[k].info.start)):
        yield key, ckpt.read(key)


class _ShardWriter:
    """Fills output shards up to ``max_bytes`` each; names them ``model-i-of-n`` at the end."""

    def __init__(self, folder: Path, max_bytes: int, save_id: str) -> None:
        self.folder, self.max_bytes, self.save_id = folder, max_bytes, save_id
        self.current: dict[str, torch.Tensor] = {}
        self.plain: dict[str, int] = {}
        self.size = 0
        self.written: list[tuple[Path, list[str]]] = []

    def add(self, entries: dict[str, torch.Tensor], plain: bool) -> None:
        nbytes = sum(t.numel() * t.element_size() for t in entries.values())
        if self.current and self.size + nbytes > self.max_bytes:
            self.flush()
        for key, t in entries.items():
            self.current[key] = t.contiguous()
            if plain:
                self.plain[key] = fmt.tensor_crc32(t)
        self.size += nbytes
        if self.size >= self.max_bytes:  # a full shard (or one large tensor) leaves memory at once
            self.flush()

    def flush(self) -> None:
        if not self.current:
            return
        path = self.folder / f"part-{len(self.written):05d}.safetensors"
        write_file(path, self.current, metadata={**fmt.shard_metadata(self.save_id, self.plain), "format": "pt"})
        self.written.append((path, sorted(self.current)))
        self.current, self.plain, self.size = {}, {}, 0

    def finish(self) -> None:
        self.flush()
        n = len(self.written)
        if n == 1:
            self.written[0][0].rename(self.folder / SINGLE_NAME)
            return
        weight_map = {}
        for i, (path, keys) in enumerate(self.written, start=1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.folder / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": sum((self.folder / f).stat().st_size for f in set(weight_map.values()))},
                 "weight_map": weight_map}  # fmt: skip
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def save_plan(plan: dict[str, TensorPlan], path: str | Path) -> None:
    """A plan as safetensors: ``<weight>.bits`` (float32 scalar) and ``<weight>.col_scale`` (fp16)."""
    tensors = {f"{name}.bits": torch.tensor(item.bits, dtype=torch.float32) for name, item in plan.items()}
    tensors.update({f"{n}.col_scale": p.col_scale for n, p in plan.items() if p.col_scale is not None})
    write_file(path, tensors, {"vc_quant_plan": "1"})


def load_plan(path: str | Path) -> dict[str, TensorPlan]:
    header = read_header(path)
    plan: dict[str, TensorPlan] = {}
    for key, info in header.tensors.items():
        name, _, field = key.rpartition(".")
        if field == "bits" and info.numel == 1:
            plan.setdefault(name, TensorPlan(0.0)).bits = float(read_tensor(path, info))
        elif field == "col_scale":
            plan.setdefault(name, TensorPlan(0.0)).col_scale = read_tensor(path, info)
        else:
            raise VcConfigError(f"plan {path}: unexpected entry {key!r} (write plans with `vc-quant plan`)")
    if any(item.bits == 0.0 for item in plan.values()):
        raise VcConfigError(f"plan {path}: a column scale without bits")
    return plan


def compress_streaming(
    src: str | Path, dst: str | Path, config: VcQuantizationConfig, dtype: torch.dtype | None = None,
    max_shard_bytes: int = 2 << 30, workers: int | None = None, plan: dict[str, TensorPlan] | None = None,
) -> dict:  # fmt: skip
    """Compress the safetensors checkpoint in folder ``src`` into ``dst`` (written atomically).

    Without a ``plan`` every weight gets ``config.bits`` (or its override); the Fisher pass
    needs the whole model, so ``allocation``/``scaling`` ``"fisher"`` come from a plan made
    beforehand (``vc-quant plan``). ``dtype``: cast plain tensors (embeddings, norms) to it.
    Returns counts and the achieved all-in rate.
    """
    src, dst = Path(src), Path(dst)
    if plan is None and config.uses_fisher():
        raise VcConfigError(
            "streaming compression cannot run the Fisher pass (it needs the whole model): use "
            "allocation='uniform', scaling='none', or run `vc-quant plan SRC -o plan.safetensors` first "
            "and pass --plan plan.safetensors"
        )
    ckpt = Checkpoint.open(src)
    targets = quantized_weight_names(src, config)
    missing = sorted(t for t in targets if t not in ckpt.entries)
    if missing:
        raise VcConfigError(f"{src}: weights {missing[:3]} of the model are not in the checkpoint")
    if plan is not None and set(plan) != targets:
        raise VcConfigError(f"the plan covers {len(plan)} weights, this model quantizes {len(targets)}: "
                            "make the plan with the same model and options")  # fmt: skip
    partial = dst.with_name(dst.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_id = fmt.new_save_id()
    writer = _ShardWriter(partial, max_shard_bytes, save_id)
    workers = workers or os.cpu_count() or 1
    stats = {"tensors": 0, "values": 0, "stored_bytes": 0, "plain_bytes": 0}
    in_flight: list[tuple[str, Future]] = []

    def drain(limit: int) -> None:
        while len(in_flight) > limit:
            key, job = in_flight.pop(0)
            enc = job.result()
            stats["tensors"] += 1
            stats["values"] += enc.numel
            stats["stored_bytes"] += enc.nbytes
            writer.add(fmt.to_state_dict(key, enc), plain=False)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vc-stream") as pool:
        for key, tensor in tqdm(_source_tensors(ckpt), total=len(ckpt.entries), desc="vc_quant: streaming",
                                unit="tensor"):  # fmt: skip
            if key in targets:
                item = plan[key] if plan else TensorPlan(config.bits_for(key.removesuffix(".weight")))
                in_flight.append((key, pool.submit(encode_tensor, tensor, item.bits, name=key,
                                                   col_scale=item.col_scale, **config.codec_kwargs())))  # fmt: skip
                drain(workers)  # bounded: at most this many source weights in memory
            else:
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                stats["plain_bytes"] += tensor.numel() * tensor.element_size()
                writer.add({key: tensor}, plain=True)
        drain(0)
    writer.finish()
    _write_config(src, partial, config, save_id, dtype)
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, partial / name)
    if dst.exists():
        shutil.rmtree(dst)
    partial.rename(dst)
    stats["bits_per_weight"] = 8 * stats["stored_bytes"] / max(stats["values"], 1)
    return stats


def _write_config(src: Path, folder: Path, config: VcQuantizationConfig, save_id: str, dtype) -> None:
    data = json.loads((src / "config.json").read_text(encoding="utf-8"))
    config.save_id = save_id
    data["quantization_config"] = config.to_dict()
    if dtype is not None:
        data["dtype"] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
