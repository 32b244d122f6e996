import pytest
import torch
from transformers import AutoModelForCausalLM

import vc_quant
from vc_quant.allocation import allocate_bits, column_scales, fisher_sensitivity, plan_bits


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
    assert all(a[n].mean == b[n].mean and torch.equal(a[n].columns, b[n].columns) for n in names)
    assert all(a[n].mean > 0 and (a[n].columns >= 0).all() for n in names)
    for n in names:  # the column marginals add up to the total
        numel = model.get_parameter(n).numel()
        assert float(a[n].columns.sum()) / numel == pytest.approx(a[n].mean, rel=1e-9)
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
    def mean(**kw):
        return fisher_sensitivity(model, names, **kw)[names[0]].mean

    a = mean(sequences=text_a)
    assert a == mean(sequences=text_a)
    assert a != mean(sequences=text_b)
    assert a != mean(n_seqs=2, seqlen=16)  # self-generated


def test_calibration_needs_fisher_and_a_readable_file(tiny_src, tmp_path):
    with pytest.raises(ValueError, match="calibration"):
        vc_quant.VcQuantizationConfig(allocation="uniform", scaling="none", calibration="text.txt")
    from vc_quant.allocation import calibration_sequences

    model = AutoModelForCausalLM.from_pretrained(tiny_src)
    with pytest.raises(ValueError, match=r"calibration='.*missing\.txt'.*cannot read"):
        calibration_sequences(model, str(tmp_path / "missing.txt"))


def test_column_scales_favour_the_columns_the_loss_cares_about():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    columns = torch.ones(128, dtype=torch.float64)
    columns[7] = 1e4  # one input channel matters far more
    scales, weighted = column_scales(w, columns)
    assert scales.dtype == torch.float16 and scales.shape == (128,)
    assert int(scales.argmax()) == 7 and float(scales.max()) <= 8.0
    assert abs(float(scales.double().log().mean())) < 0.05  # geometric mean ~1 (before fp16 rounding)
    # the scaled weighted energy (what the allocation weighs) is below the unscaled one
    plain = float(w.double().pow(2).mean()) * float(columns.sum() / w.numel())
    assert weighted < plain


def test_plan_with_scaling_gives_column_scales(tiny_src):
    model = AutoModelForCausalLM.from_pretrained(tiny_src)
    names = ["model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    plan = plan_bits(model, names, 3.0, "uniform", "fisher", n_seqs=2, seqlen=16)
    assert all(p.bits == 3.0 and p.col_scale is not None for p in plan.values())
    assert plan[names[0]].col_scale.shape == (model.get_parameter(names[0]).shape[1],)
    assert all(p.col_scale is None for p in plan_bits(model, names, 3.0, "fisher", "none", n_seqs=2).values())


def test_quantize_on_load_stores_and_applies_column_scales(tiny_src, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_src, quantization_config=vc_quant.VcQuantizationConfig(bits=3))
    assert model.config.quantization_config.scaling == "fisher"
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "model.safetensors"))
    assert "model.layers.0.mlp.down_proj.weight_vc_colscale" in stored
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert (again(ids).logits - model(ids).logits).abs().max() < 1e-5
