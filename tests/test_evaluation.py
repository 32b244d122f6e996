import math
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import vc_quant
from vc_quant.evaluation import perplexity, token_windows, write_offline_tasks

TEXT = "The quick brown fox jumps over the lazy dog. " * 40


@pytest.fixture(scope="module")
def tiny_with_tokenizer(smollm2_dir, tmp_path_factory):
    """A tiny Llama with SmolLM2's real tokenizer, compressed by vc_quant and saved."""
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    torch.manual_seed(0)
    src = tmp_path_factory.mktemp("tiny_tok_src")
    LlamaForCausalLM(cfg).save_pretrained(src)
    tok.save_pretrained(src)
    dst = tmp_path_factory.mktemp("tiny_tok_vc")
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=vc_quant.VcQuantizationConfig(bits=4))
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst, tok


def test_perplexity_matches_a_direct_computation(tiny_with_tokenizer):
    path, tok = tiny_with_tokenizer
    model = AutoModelForCausalLM.from_pretrained(path)
    res = perplexity(model, tok, TEXT, seqlen=64, max_windows=3, bos=True)
    windows = token_windows(tok, TEXT, 64, 3, True)
    assert windows.shape == (3, 64) and (windows[:, 0] == tok.bos_token_id).all()
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss for w in windows]  # HF's own mean token CE
    direct = math.exp(float(torch.stack(losses).mean()))
    assert res["ppl"] == pytest.approx(direct, rel=1e-5)
    assert res["tokens"] == 3 * 63


def test_windows_without_bos_use_every_token(tiny_with_tokenizer):
    _, tok = tiny_with_tokenizer
    w = token_windows(tok, TEXT, 32, None, bos=False)
    ids = tok(TEXT, add_special_tokens=False).input_ids
    assert w.shape == (len(ids) // 32, 32) and w[0].tolist() == ids[:32]


def test_plain_lm_eval_reads_a_vc_checkpoint(tiny_with_tokenizer, tmp_path):
    """lm-eval's own CLI, in a process that never imports vc_quant (the autoload hook registers it)."""
    path, _ = tiny_with_tokenizer
    tasks = write_offline_tasks(tmp_path / "tasks", wiki_docs=5)
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={path},dtype=float32",
           "--tasks", "piqa_offline", "--include_path", str(tasks), "--limit", "6", "--device", "cpu",
           "--batch_size", "2", "--output_path", str(tmp_path / "res")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "piqa_offline" in proc.stdout and "acc" in proc.stdout


def test_offline_task_files(tmp_path):
    folder = write_offline_tasks(tmp_path, wiki_docs=5)
    assert (folder / "piqa_offline.yaml").exists()
    assert len((folder / "wiki_offline.jsonl").read_text().splitlines()) == 5
