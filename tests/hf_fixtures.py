import shutil

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import vc_quant


def tiny_config(**changes) -> LlamaConfig:
    cfg = dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    cfg.update(changes)
    return LlamaConfig(**cfg)


@pytest.fixture(scope="session")
def tiny_src(tmp_path_factory):
    """A plain fp32 tiny Llama checkpoint (tied embeddings)."""
    path = tmp_path_factory.mktemp("tiny_src")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_config()).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_quantized(tiny_src, tmp_path_factory):
    """The tiny model quantized at 3 bits with HEVC (the video family: frame layouts, NVDEC) and saved;
    returns (path, logits of the in-memory model)."""
    from transformers import AutoModelForCausalLM

    config = vc_quant.VcQuantizationConfig(bits=3, codec="hevc")
    model = AutoModelForCausalLM.from_pretrained(tiny_src, quantization_config=config)
    path = tmp_path_factory.mktemp("tiny_q")
    model.save_pretrained(path)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4, 5]])).logits
    return path, logits


@pytest.fixture
def copy_dir(tmp_path):
    def make(src):
        dst = tmp_path / "copy"
        shutil.copytree(src, dst)
        return dst

    return make
