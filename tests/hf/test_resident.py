"""Residency modes of a loaded vc checkpoint: same logits, honest memory, bounded decode window."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import vc_quant
from vc_quant import VcLinear, VcQuantizationConfig

IDS = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
MODES = ["dense", "int8", "bitstream"]
# measured max |logit difference| to the dense decode on the tiny model (fp32): int8 and bitstream 5.4e-7
LOGIT_TOL = 1e-5


def load(path, resident, **kwargs):
    config = VcQuantizationConfig(resident=resident, **kwargs)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config)


def vc_modules(model):
    return [m for m in model.modules() if isinstance(m, VcLinear)]


@pytest.mark.parametrize("resident", MODES)
def test_every_mode_gives_the_dense_logits(tiny_quantized, resident):
    path, ref = tiny_quantized
    model = load(path, resident)
    assert all(m.resident == resident for m in vc_modules(model)) and len(vc_modules(model)) == 14
    assert f"resident={resident}" in repr(model)
    with torch.no_grad():
        out = model(IDS[:, :5]).logits
    assert (out - ref).abs().max() < LOGIT_TOL


@pytest.mark.parametrize("resident", MODES)
def test_resave_from_every_mode_is_byte_identical(tiny_quantized, tmp_path, resident):
    path, _ = tiny_quantized
    model = load(path, resident)
    with torch.no_grad():
        model(IDS)  # a forward (and, in bitstream mode, decodes) must not change what is saved
    model.save_pretrained(tmp_path / resident)
    a, b = load_file(str(path / "model.safetensors")), load_file(str(tmp_path / resident / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = load(tmp_path / resident, "dense")
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, load(path, "dense")(IDS).logits)


def map_bytes(modules) -> int:
    """Bytes of the modules' affine maps (center, step, column scales), held beside the weights."""
    maps = [t for m in modules for t in (m.weight_center, m.weight_step, m.col_scale) if t is not None]
    return sum(t.numel() * t.element_size() for t in maps)


def test_int8_weights_take_one_byte_per_weight(tiny_quantized):
    path, _ = tiny_quantized
    model = load(path, "int8")
    modules = vc_modules(model)
    held = sum(m.weight.numel() * m.weight.element_size() for m in modules)
    bf16 = sum(2 * m.in_features * m.out_features for m in modules)
    assert held / bf16 == 0.5  # target: <= 0.55x bf16 (the rotated-domain map is two floats per tensor)
    # only the affine maps: records are read back from the file when saving
    assert vc_quant.memory_bytes(model)["records"] == map_bytes(modules)
    dense = load(path, "dense")
    assert model.get_memory_footprint() < dense.get_memory_footprint()


def test_bitstream_mode_holds_only_the_compressed_bytes_and_a_window(tiny_quantized):
    path, _ = tiny_quantized
    model = load(path, "bitstream", prefetch=3)
    modules = vc_modules(model)
    stored = load_file(str(path / "model.safetensors"))
    bitstreams = sum(stored[n + ".weight"].numel() for n, m in model.named_modules() if isinstance(m, VcLinear))
    assert sum(m.weight.numel() for m in modules) == bitstreams  # uint8: one byte each
    window = model.vc_bitstream_window
    assert window.held() == 0  # nothing decoded before the first forward
    seen = []

    def after_forward(module, args, output):
        # the layer that just ran has dropped its samples; at most `prefetch` layers are decoded ahead
        seen.append((window.index[id(module)] in window._pending, window.held()))

    for m in modules:
        m.register_forward_hook(after_forward)
    with torch.no_grad():
        model(IDS)
    assert len(seen) == 14
    assert all(held <= 3 for _, held in seen)
    # the last 3 layers were decoded again ahead of the next forward (wrap-around); no other layer kept samples
    assert sum(kept for kept, _ in seen) <= 3
    per_matrix = max(m.in_features * m.out_features for m in modules)
    # the window's slots (allocated once, reused every forward): the running layer + 3 ahead, at most
    assert vc_quant.memory_bytes(model)["window"] <= 4 * per_matrix
    assert per_matrix <= window.peak_bytes <= 4 * per_matrix
    allocated = window.held_bytes()
    with torch.no_grad():
        model(IDS)
    assert window.held_bytes() == allocated  # a second forward allocates nothing new


def test_quantize_on_load_in_each_mode(tiny_src):
    outs = {}
    for resident in MODES:
        config = VcQuantizationConfig(bits=3, allocation="uniform", scaling="none", resident=resident)
        model = AutoModelForCausalLM.from_pretrained(tiny_src, quantization_config=config)
        assert {m.resident for m in vc_modules(model)} == {resident}
        with torch.no_grad():
            outs[resident] = model(IDS).logits
        if resident != "bitstream":  # records are kept in memory until saved, and counted (+ the maps' copies)
            held = model.vc_quant_report.stored_bytes + map_bytes(vc_modules(model))
            assert vc_quant.memory_bytes(model)["records"] == held
    assert (outs["int8"] - outs["dense"]).abs().max() < LOGIT_TOL
    assert torch.equal(outs["int8"], outs["bitstream"])


def test_device_map_plans_with_the_resident_size(tiny_quantized, tmp_path):
    """A memory budget the int8 model fits but the dense one does not: only int8 stays off disk."""
    path, _ = tiny_quantized
    budget = {"cpu": 3_000_000}  # dense tiny model: ~5.0 MB of tensors, int8: ~1.45 MB
    model = AutoModelForCausalLM.from_pretrained(path, device_map="auto", max_memory=budget,
                                                 quantization_config=VcQuantizationConfig(resident="int8"))  # fmt: skip
    assert set(getattr(model, "hf_device_map", {"": "cpu"}).values()) == {"cpu"}
    dense = AutoModelForCausalLM.from_pretrained(
        path, device_map="auto", max_memory=budget, offload_folder=tmp_path,
        quantization_config=VcQuantizationConfig(resident="dense"),
    )  # fmt: skip
    assert "disk" in set(dense.hf_device_map.values())
    with torch.no_grad():
        assert (dense(IDS).logits - model(IDS).logits).abs().max() < LOGIT_TOL


def test_dequantize_gives_a_plain_model(tiny_quantized, tmp_path):
    path, ref = tiny_quantized
    model = load(path, "int8")
    model.dequantize()
    assert not any(isinstance(m, VcLinear) for m in model.modules())
    assert getattr(model.config, "quantization_config", None) is None
    with torch.no_grad():
        assert (model(IDS[:, :5]).logits - ref).abs().max() < LOGIT_TOL
    model.save_pretrained(tmp_path / "plain")
    assert load_file(str(tmp_path / "plain" / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"].dim() == 2


# --- rANS records, and residency on CUDA ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_rans(tiny_src, tmp_path_factory):
    model = AutoModelForCausalLM.from_pretrained(tiny_src, quantization_config=VcQuantizationConfig(
        bits=3, codec="rans"))  # fmt: skip
    path = tmp_path_factory.mktemp("tiny_rans")
    model.save_pretrained(path)
    with torch.no_grad():
        return path, model(IDS).logits


@pytest.mark.parametrize("resident", MODES)
def test_rans_records_in_every_mode_give_the_same_logits(tiny_rans, resident):
    path, ref = tiny_rans
    with torch.no_grad():
        out = load(path, resident)(IDS).logits
    assert (out - ref).abs().max() < LOGIT_TOL


def test_bitstream_decode_steps_compute_on_one_thread_and_restore_the_callers_count(tiny_rans, monkeypatch):
    """Few-token forwards leave the cores to the window's decoders (prefetch.FEW_TOKENS); longer ones,
    and every forward after, keep the caller's thread count, also when the forward raises."""
    from vc_quant.nn import prefetch

    path, ref = tiny_rans
    model = load(path, "bitstream")
    seen, fail = [], []
    first = vc_modules(model)[0]

    def record(*_):
        seen.append(torch.get_num_threads())
        if fail:
            raise RuntimeError("a forward that fails inside the model")

    first.register_forward_pre_hook(record)
    monkeypatch.setattr(prefetch, "FEW_TOKENS", 4)
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            few = model(IDS[:, :4]).logits
            assert seen == [1] and torch.get_num_threads() == 2
            assert (few - ref[:, :4]).abs().max() < LOGIT_TOL
            model(input_ids=IDS)  # 8 tokens: more than FEW_TOKENS
            assert seen == [1, 2] and torch.get_num_threads() == 2
            fail.append(True)
            with pytest.raises(RuntimeError, match="fails inside"):
                model(IDS[:, :2])
            assert seen[-1] == 1 and torch.get_num_threads() == 2
        hooks = len(model._forward_pre_hooks) + len(model._forward_hooks)
        model.vc_bitstream_window.close()  # the window's hooks leave with it
        assert len(model._forward_pre_hooks) + len(model._forward_hooks) == hooks - 2
    finally:
        torch.set_num_threads(saved)


def test_forward_tokens_counts_ids_or_embeddings():
    from vc_quant.nn.prefetch import forward_tokens

    assert forward_tokens((torch.zeros(2, 5, dtype=torch.long),), {}) == 10
    assert forward_tokens((), {"input_ids": torch.zeros(1, 3, dtype=torch.long)}) == 3
    assert forward_tokens((), {"input_ids": None, "inputs_embeds": torch.zeros(2, 7, 16)}) == 14
    assert forward_tokens((), {}) is None


def _cuda_or_skip():
    import os

    if not torch.cuda.is_available():
        if os.environ.get("VC_QUANT_REQUIRE_GPU", "") not in ("", "0"):
            pytest.fail("VC_QUANT_REQUIRE_GPU=1 but CUDA is not available")
        pytest.skip("no CUDA device")


@pytest.mark.gpu
@pytest.mark.parametrize("resident", ["int8", "bitstream"])
@pytest.mark.parametrize("fixture", ["tiny_quantized", "tiny_rans"])
def test_residency_on_cuda_gives_the_cpu_logits(request, fixture, resident):
    _cuda_or_skip()
    path, ref = request.getfixturevalue(fixture)
    config = VcQuantizationConfig(resident=resident)
    model = AutoModelForCausalLM.from_pretrained(path, device_map="cuda", quantization_config=config)
    assert all(m.weight.device.type == "cuda" for m in vc_modules(model))
    with torch.no_grad():
        out = model(IDS.cuda()).logits.cpu()
        again = model(IDS.cuda()).logits.cpu()  # bitstream: the second forward reuses the window's slots
    assert (out - ref).abs().max() < 1e-3 and torch.equal(out, again)  # GPU float order differs from the CPU's
    if resident == "bitstream":
        assert model.vc_bitstream_window.pool.backend_used in ("triton", "nvdec", "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("resident", ["int8", "bitstream"])
def test_rans_residency_on_cuda_with_the_triton_decoder(tiny_rans, resident):
    _cuda_or_skip()
    path, ref = tiny_rans
    config = VcQuantizationConfig(resident=resident, decode_backend="triton")
    model = AutoModelForCausalLM.from_pretrained(path, device_map="cuda", quantization_config=config)
    with torch.no_grad():
        out = model(IDS.cuda()).logits.cpu()
    assert (out - ref).abs().max() < 1e-3
