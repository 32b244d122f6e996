"""The in-flight codec: tiny tensors (gradients) keep their precision, the gain travels with the record."""

import pytest
import torch

from vc_quant.distributed.inflight import InflightCodec, gain_exponent, unpack
from vc_quant.errors import VcCorruptDataError


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("scale", [1e-7, 1e-3, 1e3])
def test_error_does_not_depend_on_the_tensor_scale(scale):
    # activation gradients are ~1e-6..1e-8: the fp16 per-row map underflowed there and the
    # decoder returned noise (relative error ~1e3 measured on SmolLM2) before the power-of-two gain
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    errors = []
    for t in (x, x * scale):
        codec = InflightCodec(4.0)
        packed, _ = codec.encode(t)
        errors.append(rel_err(codec.decode(unpack(packed)), t))
    assert errors[0] < 0.2
    assert errors[1] == pytest.approx(errors[0], rel=0.05)  # the gain is a power of two, not exactly 1/scale


def test_the_gain_exponent_travels_with_the_record():
    x = torch.randn(32, 256, generator=torch.Generator().manual_seed(1)) * 2.0**-20
    assert gain_exponent(x) == 20
    codec = InflightCodec(3.0)
    packed, enc = codec.encode(x)
    assert torch.equal(codec.decode(unpack(packed)), codec.decode(enc))
    assert gain_exponent(torch.zeros(4, 4)) == 0


def test_a_crafted_gain_exponent_is_refused():
    packed, _ = InflightCodec(3.0).encode(torch.randn(32, 256))
    packed = packed.clone()
    packed[4:6] = torch.tensor([0xFF, 0x7F], dtype=torch.uint8)  # int16 32767
    with pytest.raises(VcCorruptDataError, match="gain exponent"):
        unpack(packed)
