"""The Triton rANS decoder: bit-identical to the native decoder.

On the CPU it runs through Triton's interpreter (``TRITON_INTERPRET=1``, in a fresh process:
Triton reads the variable when the kernel is defined). ``gpu`` tests run it on CUDA; they skip
without a GPU and fail when ``VC_QUANT_REQUIRE_GPU=1``.
"""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from vc_quant.codec.rans import bitstream as bs
from vc_quant.codec.rans import coder
from vc_quant.codec.rans import quantizer as qz

REQUIRE_GPU = os.environ.get("VC_QUANT_REQUIRE_GPU", "") not in ("", "0")
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")

_INTERPRETED = r"""
import numpy as np, torch
from vc_quant.codec.rans import bitstream as bs, coder, quantizer as qz
from vc_quant.codec.rans.triton_decode import decode_levels_triton, triton_status
from vc_quant.errors import VcCorruptDataError
assert triton_status(), triton_status().reason
rng = np.random.default_rng(0)
for quantizer, n, lanes, lane_len in (("dq", 3000, 4, 128), ("scalar", 2500, 3, 200), ("dq", 700, 1, 700)):
    x = rng.standard_normal((1, n)).astype(np.float32)
    lv, _ = qz.search_step(x, 2.5, 0.0, quantizer, lanes=lanes, lane_len=lane_len)
    stream = bs.parse(np.frombuffer(bs.pack(coder.encode_stream(lv)), np.uint8), n)
    cpu = coder.decode_levels(stream, np.empty(n, np.int8))
    gpu = decode_levels_triton(stream, "cpu").numpy()
    assert np.array_equal(cpu, gpu), (quantizer, int((cpu != gpu).sum()))
    words = stream.words.copy(); words[len(words) // 2] ^= 0x0101
    bad = bs.RansStream(stream.quantizer, stream.lanes, stream.lane_len, n, stream.tables, stream.seg_end, words)
    try:
        decode_levels_triton(bad, "cpu")
    except VcCorruptDataError:
        pass
    else:
        raise AssertionError("a damaged stream decoded")
print("ok")
"""


@needs_triton
def test_auto_keeps_rans_on_the_cpu_until_triton_is_verified_on_a_gpu():
    from vc_quant.codec.decode import choose_backend
    from vc_quant.codec.rans import triton_decode

    if triton_decode.TRITON_VERIFIED:
        pytest.skip("verified: auto uses Triton")
    backend, reason = choose_backend("cuda", "rans", "auto")
    assert backend == "cpu" and "decode_backend='triton' opts in" in reason


def test_triton_decoder_is_bit_identical_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-3000:]


@pytest.fixture(scope="module")
def cuda():
    from vc_quant.codec.rans.triton_decode import triton_status

    status = triton_status()
    if not torch.cuda.is_available() or not status:
        reason = status.reason if not status else "no CUDA device"
        if REQUIRE_GPU:
            pytest.fail(f"VC_QUANT_REQUIRE_GPU=1 but the Triton decoder cannot run: {reason}")
        pytest.skip(f"Triton decoder unusable: {reason}")
    return torch.device("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("quantizer", ["dq", "scalar"])
@pytest.mark.parametrize("n", [1, 4097, 1 << 20, 3_000_001])
def test_triton_decoder_on_cuda_equals_the_cpu_decoder(cuda, quantizer, n):
    from vc_quant.codec.rans.triton_decode import decode_levels_triton

    x = np.random.default_rng(n).standard_normal((1, n)).astype(np.float32)
    lv, _ = qz.search_step(x, 3.0, 0.0, quantizer)
    stream = bs.parse(np.frombuffer(bs.pack(coder.encode_stream(lv)), np.uint8), n)
    cpu = coder.decode_levels(stream, np.empty(n, np.int8))
    assert np.array_equal(decode_levels_triton(stream, cuda).cpu().numpy(), cpu)


@pytest.mark.gpu
def test_decode_tensor_on_cuda_uses_triton(cuda):
    from vc_quant import decode_tensor, encode_tensor
    from vc_quant.codec.decode import choose_backend

    w = torch.randn(1536, 576, generator=torch.Generator().manual_seed(0)) * 0.02
    enc = encode_tensor(w, 2.5, codec="rans")
    assert choose_backend(cuda, "rans", "triton") == ("triton", None)
    gpu = decode_tensor(enc, device=cuda, backend="triton")
    cpu = decode_tensor(enc)
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-6)  # the same integers; the inverse rotation in another order
