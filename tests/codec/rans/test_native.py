"""The native kernels: present where vc_quant is installed, and a clear fallback where they are not."""

import os
import subprocess
import sys

import pytest
import torch

from vc_quant.codec import transform as tf
from vc_quant.codec.rans import native


def test_the_native_library_is_built():
    # CI installs vc_quant from source: the kernels must be there (a silent fallback would hide a build failure)
    status = native.status()
    assert status, status.reason


@pytest.mark.parametrize("n", [576, 1536, 64, 7, 896])
def test_native_rotation_matches_the_torch_rotation(n):
    x = torch.randn(9, n, generator=torch.Generator().manual_seed(n))
    scale = torch.rand(n) + 0.5
    fast = tf.rotate_fast(x, 3, scale.half())
    exact = tf.rotate(x.double() * scale.half().double(), 3).float()
    assert torch.allclose(fast, exact, atol=1e-5, rtol=1e-5)
    levels = torch.randint(-127, 128, (9, n), dtype=torch.int8)
    back = torch.from_numpy(tf.unrotate_levels(levels.numpy(), 0.01, 3, scale.half()))
    want = tf.unrotate(levels.double() * 0.01, 3) / scale.half().double()
    assert torch.allclose(back.double(), want, atol=1e-5)
    steps = torch.rand(9) * 0.02 + 0.001  # one step per row
    back = torch.from_numpy(tf.unrotate_levels(levels.numpy(), steps.numpy(), 3))
    assert torch.allclose(back.double(), tf.unrotate(levels.double() * steps.double()[:, None], 3), atol=1e-5)


def test_native_rotation_is_deterministic():
    x = torch.randn(16, 1536, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tf.rotate_fast(x, 1), tf.rotate_fast(x, 1))


_FALLBACK = r"""
import torch
from vc_quant import decode_tensor, encode_tensor
from vc_quant.codec import decode_samples
from vc_quant.codec.rans import native
from vc_quant.errors import VcBackendUnavailableError
record = torch.load(r"{path}", weights_only=False)
assert not native.status() and "VC_QUANT_NATIVE=0" in native.status().reason
# the NumPy reference decoder: the same integers; the float inverse rotation in torch (other rounding)
assert torch.equal(decode_samples(record["enc"]), record["samples"]), "fallback decode differs"
assert torch.allclose(decode_tensor(record["enc"]), record["dense"], atol=1e-6)
try:
    encode_tensor(torch.randn(64, 64), 3.0, codec="rans")
except VcBackendUnavailableError as exc:
    assert "native" in str(exc)
else:
    raise AssertionError("encoding without the native kernels must fail loudly")
print("ok")
"""


def test_without_the_native_library_decoding_falls_back_and_encoding_says_why(tmp_path):
    from vc_quant import decode_tensor, encode_tensor
    from vc_quant.codec import decode_samples

    enc = encode_tensor(torch.randn(128, 576, generator=torch.Generator().manual_seed(0)), 2.5, codec="rans")
    torch.save({"enc": enc, "dense": decode_tensor(enc), "samples": decode_samples(enc)}, tmp_path / "rec.pt")
    env = dict(os.environ, VC_QUANT_NATIVE="0")
    done = subprocess.run([sys.executable, "-c", _FALLBACK.format(path=tmp_path / "rec.pt")], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]
