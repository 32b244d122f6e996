import pytest
import torch
from transformers import AutoModelForCausalLM

import vc_quant
from vc_quant.allocation import allocate_bits, fisher_sensitivity


def test_equal_slope_allocation_keeps_the_budget_and_follows_sensitivity():
    numels, energies = [100, 300, 600], [1.0, 1.0, 1.0]
    rates = allocate_bits(numels, energies, [1.0, 4.0, 16.0], budget=3.0)
    assert sum(r * n for r, n in zip(rates, numels, strict=True)) / sum(numels) == pytest.approx(3.0)
    # 4x the sensitivity -> +1 bit (half a log2 per unit: equal slope of 2^-2R)
    assert rates[1] - rates[0] == pytest.approx(1.0)
    assert rates[2] - rates[1] == pytest.approx(1.0)


def test_allocation_respects_bounds():
    rates = allocate_bits([10, 10, 10], [1, 1, 1], [1e-6, 1.0, 1e6], budget=2.0, r_min=1.0, r_max=4.0)
    assert min(rates) >= 1.0 and max(rates) <= 4.0
    assert sum(rates) / 3 == pytest.approx(2.0)


def test_uniform_inputs_give_uniform_rates():
    assert allocate_bits([5, 7], [2.0, 2.0], [3.0, 3.0], 2.5) == pytest.approx([2.5, 2.5])


def test_fisher_sensitivity_is_positive_and_deterministic(tiny_src):
    model = AutoModelForCausalLM.from_pretrained(tiny_src)
    names = ["model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.v_proj.weight"]
    a = fisher_sensitivity(model, names, n_seqs=2, seqlen=16, seed=1)
    b = fisher_sensitivity(model, names, n_seqs=2, seqlen=16, seed=1)
    assert a == b and all(v > 0 for v in a.values())
    assert all(p.grad is None for p in model.parameters())


def test_fisher_allocation_on_load_keeps_the_budget(tiny_src):
    cfg = vc_quant.VcQuantizationConfig(bits=3.0, allocation="fisher", overrides={"model.layers.0.mlp.up_proj": 4.0})
    model = AutoModelForCausalLM.from_pretrained(tiny_src, quantization_config=cfg)
    per = model.vc_quant_report.per_tensor
    assert len(per) == 14
    others = {k: v for k, v in per.items() if k != "model.layers.0.mlp.up_proj.weight"}
    rates = [v["bpw"] for v in others.values()]
    assert max(rates) - min(rates) > 0.3  # not uniform


def test_fisher_on_a_half_model_restores_dtype_and_weights(tiny_src):
    model = AutoModelForCausalLM.from_pretrained(tiny_src, dtype=torch.float16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fisher_sensitivity(model, ["model.layers.0.mlp.down_proj.weight"], n_seqs=1, seqlen=8)
    for n, p in model.named_parameters():
        assert p.dtype == torch.float16 and torch.equal(p, before[n])
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_calibration_mode_uses_the_given_sequences(tiny_src):
    model = AutoModelForCausalLM.from_pretrained(tiny_src)
    names = ["model.layers.0.mlp.down_proj.weight"]
    g = torch.Generator().manual_seed(0)
    text_a = torch.randint(0, 256, (2, 16), generator=g)
    text_b = torch.randint(0, 256, (2, 16), generator=g)
    a = fisher_sensitivity(model, names, sequences=text_a)
    assert a == fisher_sensitivity(model, names, sequences=text_a)
    assert a != fisher_sensitivity(model, names, sequences=text_b)
    assert a != fisher_sensitivity(model, names, n_seqs=2, seqlen=16)  # self-generated


def test_calibration_needs_fisher_and_a_readable_file(tiny_src, tmp_path):
    with pytest.raises(ValueError, match="calibration"):
        vc_quant.VcQuantizationConfig(allocation="uniform", calibration="text.txt")
    from vc_quant.allocation import calibration_sequences

    model = AutoModelForCausalLM.from_pretrained(tiny_src)
    with pytest.raises(ValueError, match=r"calibration='.*missing\.txt'.*cannot read"):
        calibration_sequences(model, str(tmp_path / "missing.txt"))
