"""Streaming compression: the same records as quantize-on-load, without building the model."""

import json

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from vc_quant import VcQuantizationConfig
from vc_quant.cli import main as cli
from vc_quant.streaming import compress_streaming, load_plan, quantized_weight_names


def test_streaming_writes_the_records_quantize_on_load_writes(tiny_src, tmp_path):
    config = VcQuantizationConfig(bits=3, allocation="uniform", scaling="none")
    stats = compress_streaming(tiny_src, tmp_path / "stream", config, max_shard_bytes=300_000)
    assert stats["tensors"] == 14 and abs(stats["bits_per_weight"] - 3) < 0.03
    assert (tmp_path / "stream" / "model.safetensors.index.json").exists()  # several shards
    model = AutoModelForCausalLM.from_pretrained(tiny_src, quantization_config=VcQuantizationConfig(
        bits=3, allocation="uniform", scaling="none"))  # fmt: skip
    model.save_pretrained(tmp_path / "onload")
    onload = load_file(str(tmp_path / "onload" / "model.safetensors"))
    streamed = {}
    for shard in (tmp_path / "stream").glob("model-*.safetensors"):
        streamed.update(load_file(str(shard)))
    for key in onload:
        if key.endswith("_vc_meta"):  # same encoder, same input, same options: the same record
            a = json.loads(bytes(onload[key].numpy()))
            b = json.loads(bytes(streamed[key].numpy()))
            assert a == b, key
            stem = key.removesuffix("_vc_meta")
            assert torch.equal(onload[stem], streamed[stem])
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "stream")
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    assert cli(["verify", str(tmp_path / "stream")]) == 0


def test_plan_then_streaming_compress(tiny_src, tmp_path):
    """The default quantizer's Fisher bits and column scales, computed once, applied while streaming."""
    plan_file = tmp_path / "plan.safetensors"
    assert cli(["plan", str(tiny_src), "-o", str(plan_file), "--bits", "3"]) == 0
    plan = load_plan(plan_file)
    assert set(plan) == quantized_weight_names(tiny_src, VcQuantizationConfig(bits=3))
    assert all(p.col_scale is not None and p.col_scale.dtype == torch.float16 for p in plan.values())
    bits = {n: p.bits for n, p in plan.items()}
    assert abs(sum(bits.values()) / len(bits) - 3) < 1.0  # Fisher: uneven, around the budget
    dst = tmp_path / "q"
    assert cli(["compress", str(tiny_src), str(dst), "--streaming", "--plan", str(plan_file)]) == 0
    per = AutoModelForCausalLM.from_pretrained(dst).vc_quant_report.per_tensor
    for name, b in bits.items():
        assert abs(per[name]["bpw"] - b) < 0.35  # small tensors skip rate control (see the codec tests)
    assert cli(["compress", str(tiny_src), str(tmp_path / "x"), "--streaming"]) == 2  # Fisher without a plan
