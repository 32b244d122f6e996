"""PEFT LoRA on a vc model, through the HF Trainer, in every residency; then merge and save."""

import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from vc_quant import VcLinear, VcQuantizationConfig

IDS = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])


@pytest.mark.parametrize("resident", ["int8", "bitstream", "dense"])
def test_lora_trains_with_the_trainer_merges_and_saves(tiny_quantized, tmp_path, caplog, resident):
    path, _ = tiny_quantized
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=VcQuantizationConfig(resident=resident))
    base_q = model.model.layers[0].self_attn.q_proj
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    data = Dataset.from_dict({"input_ids": [list(range(1, 17))] * 8, "labels": [list(range(1, 17))] * 8})
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=5e-2, logging_steps=1, report_to=[], use_cpu=True,
                             save_strategy="no")  # fmt: skip
    trainer = Trainer(model=peft_model, args=args, train_dataset=data)  # the Trainer accepts it: is_trainable
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 4 and losses[-1] < losses[0]
    with torch.no_grad():
        adapted = peft_model(IDS).logits
    merged = peft_model.merge_and_unload()
    q = merged.model.layers[0].self_attn.q_proj
    assert isinstance(q, VcLinear) and q is base_q and q.resident == "dense" and q.is_modified()
    with torch.no_grad():
        assert (merged(IDS).logits - adapted).abs().max() < 1e-4  # the merge is exact
    with caplog.at_level(logging.INFO, logger="vc_quant"):
        merged.save_pretrained(tmp_path / "merged")
    assert "q_proj.weight changed since it was loaded; re-encoding" in caplog.text
    assert "k_proj.weight changed" not in caplog.text  # untouched weights keep their bitstreams
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        assert torch.isfinite(reloaded(IDS).logits).all()


def test_peft_imported_before_vc_quant_still_gets_the_vc_layer(tiny_quantized):
    path, _ = tiny_quantized
    code = textwrap.dedent(f"""
        from peft import LoraConfig, get_peft_model
        import vc_quant
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(path)!r})
        p = get_peft_model(m, LoraConfig(r=2, target_modules=["q_proj"]))
        print(type(p.base_model.model.model.layers[0].self_attn.q_proj).__name__)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "VcLoraLinear"
