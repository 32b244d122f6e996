"""VcLinear's compute paths against the dense decoded weight, and the change fingerprint."""

import pytest
import torch

from vc_quant import VcConfigError, encode_tensor
from vc_quant.codec.decode import decode_samples, decode_tensor
from vc_quant.nn import InMemoryRecord, VcLinear, check_resident
from vc_quant.nn.linear import fingerprint, int8_linear

# measured max |int8 path - dense path| / max |dense output| over these cases: fp32 9.6e-7, bf16 9.5e-3
# (bf16 rounds the rotated activations and the product), fp16 9.1e-4; thresholds leave ~2-3x headroom
REL_TOL = {torch.float32: 3e-6, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def make(resident: str, scale: str = "tensor", shape=(384, 576), dtype=torch.float32, bias=True, seed=0,
         codec: str = "hevc"):  # fmt: skip
    # the video path: its int8 samples reproduce the float decode bit for bit (rANS: to float rounding)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    enc = encode_tensor(w, 3.0, scale=scale, name="layer.weight", codec=codec)
    module = VcLinear(shape[1], shape[0], bias=bias, dtype=dtype, resident=resident)
    if bias:
        module.bias = torch.nn.Parameter(torch.randn(shape[0], generator=g, dtype=torch.float32).to(dtype) * 0.1)
    module.set_resident_weight(enc, InMemoryRecord(enc))
    return module, enc


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", ["tensor", "row"])
@pytest.mark.parametrize("tokens", [1, 3, 64])
def test_int8_and_bitstream_match_the_dense_decode(dtype, scale, tokens):
    dense, _enc = make("dense", scale, dtype=dtype)
    x = torch.randn(2, tokens, 576, generator=torch.Generator().manual_seed(1)).to(dtype)
    with torch.no_grad():
        ref = dense(x).float()
        for resident in ("int8", "bitstream"):
            module, _ = make(resident, scale, dtype=dtype)
            out = module(x)
            assert out.dtype == dtype and out.shape == ref.shape
            err = float((out.float() - ref).abs().max() / ref.abs().max())
            assert err < REL_TOL[dtype], (resident, err)


def test_dequantize_weight_is_the_dense_decode_exactly():
    for resident in ("int8", "bitstream"):
        module, enc = make(resident)
        assert torch.equal(module.dequantize_weight(torch.float32), decode_tensor(enc))


def test_int8_linear_is_differentiable_in_the_activations():
    module, _ = make("int8", dtype=torch.float32)
    x = torch.randn(4, 576, requires_grad=True)
    module(x).sum().backward()
    w = module.dequantize_weight()
    assert torch.allclose(x.grad, w.sum(0).expand(4, -1), atol=1e-5)


def test_int8_linear_without_rotation():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(200, 300, generator=g) * 0.05
    enc = encode_tensor(w, 4.0, rotation=False)
    samples = decode_samples(enc)
    x = torch.randn(5, 300, generator=g)
    y = int8_linear(x, samples, float(enc.center), float(enc.step), None, None)
    assert torch.allclose(y, x @ decode_tensor(enc).T, atol=1e-5)


def test_fingerprint_sees_every_change_and_only_changes():
    w = torch.randn(300, 17)
    base = fingerprint(w)
    assert fingerprint(w.clone()) == base
    edited = w.clone()
    edited[123, 4] = torch.nextafter(edited[123, 4], torch.tensor(1e9))  # one ulp
    assert fingerprint(edited) != base
    swapped = w.clone()
    swapped[0, 0], swapped[0, 1] = w[0, 1], w[0, 0]
    assert fingerprint(swapped) != base
    assert fingerprint(torch.zeros(5, dtype=torch.int8)) != fingerprint(torch.zeros(6, dtype=torch.int8))


def test_fingerprint_of_tensors_larger_than_one_chunk():
    w = torch.randn(3 << 20)  # 12 MB: several 8 MB chunks of int64 words
    base = fingerprint(w)
    edited = w.clone()
    edited[-1] += 1.0  # in the last chunk
    assert fingerprint(w.clone()) == base and fingerprint(edited) != base


def test_edits_through_data_are_seen():
    module, _ = make("dense")
    assert not module.is_modified()
    module.weight.data[0, 0] += 1.0  # bypasses autograd's version counter
    assert module.is_modified()


def test_unknown_residency_names_the_valid_ones():
    with pytest.raises(VcConfigError, match=r"resident='fp4'.*'dense', 'int8', 'bitstream'"):
        check_resident("fp4")


def test_repr_shows_residency_and_rate():
    module, _enc = make("int8")
    assert "resident=int8" in repr(module) and "bits=3.0" in repr(module)


@pytest.mark.parametrize("resident", ["int8", "bitstream"])
def test_column_scaled_records_compute_like_their_dense_decode(resident):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(384, 576, generator=g) * 0.02
    enc = encode_tensor(w, 3.0, col_scale=torch.rand(576, generator=g) * 4 + 0.25, codec="hevc")
    module = VcLinear(576, 384, bias=False, resident=resident)
    module.set_resident_weight(enc, InMemoryRecord(enc))
    dense = decode_tensor(enc)
    assert torch.equal(module.dequantize_weight(torch.float32), dense)
    x = torch.randn(5, 576, generator=g)
    with torch.no_grad():
        assert torch.allclose(module(x), x @ dense.T, atol=1e-5)
