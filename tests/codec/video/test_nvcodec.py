"""The NVDEC backend.

CPU-side checks always run. ``gpu`` tests need CUDA + NVDEC + PyNvVideoCodec and
skip with the reason without them; ``VC_QUANT_REQUIRE_GPU=1`` turns the skip into
a failure (for runs on a GPU machine). HEVC and AV1 decoding are normative, so NVDEC
frames must equal the CPU decoder's (FFmpeg's HEVC, dav1d) bit for bit on every stream
our encoder writes. The AV1 tests have not run on a GPU yet (the "auto" policy keeps AV1
on the CPU until they have).

Real weights: SmolLM2's first decoder layer when the offline asset is installed,
else the safetensors file named by ``VC_QUANT_REAL_WEIGHTS`` (written by
``scripts/bench_load.py --export-real-weights``, for GPU machines without the asset).
"""

import os
from pathlib import Path

import pytest
import torch

from vc_quant import decode_tensor, encode_tensor
from vc_quant.codec.decode import decode_frames
from vc_quant.codec.video import frames as fr
from vc_quant.codec.video.backends import nvcodec
from vc_quant.errors import VcBackendUnavailableError

REQUIRE_GPU = os.environ.get("VC_QUANT_REQUIRE_GPU", "") not in ("", "0")


def test_status_never_raises_and_says_why():
    status = nvcodec.nvdec_status()
    assert isinstance(status.reason, str) and status.reason
    assert bool(status) == status.usable
    if not status.usable:
        assert status.reason != "ok"


def test_unusable_nvdec_raises_with_the_reason(monkeypatch, gaussian):
    unusable = nvcodec.NvdecStatus(False, "no NVDEC in this test")
    monkeypatch.setattr(nvcodec, "nvdec_status", lambda codec="hevc": unusable)
    enc = encode_tensor(gaussian(64, 64), 4.0, codec="hevc")
    with pytest.raises(VcBackendUnavailableError, match="no NVDEC in this test"):
        nvcodec.decode_tensor_nvdec(enc, device="cuda")


@pytest.fixture(scope="module")
def nvdec():
    status = nvcodec.nvdec_status()
    if not status:
        if REQUIRE_GPU:
            pytest.fail(f"VC_QUANT_REQUIRE_GPU=1 but NVDEC is unusable: {status.reason}")
        pytest.skip(f"NVDEC unusable: {status.reason}")
    return status


@pytest.fixture(scope="module")
def real_matrices(nvdec) -> dict[str, torch.Tensor]:
    path = os.environ.get("VC_QUANT_REAL_WEIGHTS")
    if path:
        from safetensors.torch import load_file

        return load_file(path)
    from vc_quant.testing import AssetMissingError, smollm2_checkpoint

    try:
        ckpt = smollm2_checkpoint()
    except AssetMissingError as exc:
        if REQUIRE_GPU:
            raise
        pytest.skip(f"real weights unavailable: {exc}")
    from safetensors.torch import load_file

    state = load_file(str(Path(ckpt) / "model.safetensors"))
    return {k: v for k, v in state.items() if ".layers.0." in k and v.dim() == 2}


def _assert_frames_identical(enc, name):
    layout = fr.FrameLayout.from_dict(enc.meta["layout"])
    cpu = fr.frames_to_canvas(decode_frames(enc), layout).split(layout.height * 3 // 2)
    gpu = nvcodec.decode_canvas_nvdec(enc, "cuda", name=name).cpu().split(layout.height * 3 // 2)
    assert len(cpu) == len(gpu)
    for i, (a, b) in enumerate(zip(cpu, gpu, strict=True)):
        mismatches = int((a != b).sum())
        assert mismatches == 0, f"{name} frame {i}: {mismatches} of {a.numel()} samples differ from FFmpeg"


@pytest.mark.gpu
@pytest.mark.parametrize("codec", ["hevc", "av1"])
@pytest.mark.parametrize("bits", [2.0, 2.5, 4.0, 6.0])
def test_frames_bit_identical_to_the_cpu_decoder_on_real_weights(real_matrices, bits, codec):
    assert len(real_matrices) >= 7
    for name, w in real_matrices.items():
        _assert_frames_identical(encode_tensor(w, bits, name=name, codec=codec), f"{name}@{bits} {codec}")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "shape,options",
    [
        ((576, 576), {"qp": 0}),  # the largest bitstream the encoder writes
        ((576, 576), {"qp": 51}),  # the coarsest
        ((576,), {"qp": 20}),  # 1-D: folded into a picture
        ((1000, 64), {"qp": 25}),  # narrow: rows grouped side by side
        ((300, 1536), {"qp": 25, "tile": 144}),  # smallest frames, many of them, strips
        ((600, 5000), {"qp": 30, "tile": 4096}),  # the large-picture session class
        ((256, 256), {"qp": 22, "preset": "slow"}),  # other encoder tools
    ],
)
@pytest.mark.parametrize("codec", ["hevc", "av1"])
def test_frames_bit_identical_across_layouts_and_qps(nvdec, gaussian, shape, options, codec):
    rows = shape[0] if len(shape) > 1 else 1
    t = gaussian(rows, shape[-1]).reshape(shape)
    if codec == "av1":  # AV1's qp runs 1..63: the same extremes
        options = {**options, "qp": {0: 1, 51: 63}.get(options["qp"], options["qp"])}
    _assert_frames_identical(encode_tensor(t, None, codec=codec, **options), f"{shape}{options} {codec}")


@pytest.mark.gpu
def test_pixel_matrix_of_the_load_path_is_bit_identical(real_matrices):
    """decode_tensor_nvdec writes NV12 surfaces straight into the canvas: same pixels as FFmpeg."""
    for name, w in real_matrices.items():
        enc = encode_tensor(w, 2.5, name=name)
        ref = fr.unpack(decode_frames(enc), fr.FrameLayout.from_dict(enc.meta["layout"]))
        assert torch.equal(nvcodec.decode_pixels_nvdec(enc, "cuda", name=name).cpu(), ref), name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dense_decode_matches_cpu(nvdec, gaussian, dtype):
    w = gaussian(1536, 576, dtype=dtype)
    enc = encode_tensor(w, 3.0)
    ref = decode_tensor(enc)
    out = nvcodec.decode_tensor_nvdec(enc, "cuda")
    assert out.device.type == "cuda" and out.dtype == dtype and out.shape == w.shape
    # same pixels; the float inverse (rotation matmul on cuBLAS) may round differently
    err = float((out.cpu().float() - ref.float()).norm() / ref.float().norm())
    assert err < (1e-2 if dtype == torch.bfloat16 else 1e-3 if dtype == torch.float16 else 1e-5)
    buf = torch.full(w.shape, float("nan"), dtype=dtype, device="cuda")
    assert nvcodec.decode_tensor_nvdec(enc, out=buf) is buf
    assert torch.equal(buf, out)


@pytest.mark.gpu
def test_pool_decodes_many_tensors_side_by_side(nvdec, gaussian):
    encs = [encode_tensor(gaussian(384 + 64 * (i % 4), 576, seed=i), 2.5) for i in range(24)]
    outs = [torch.full(e.shape, float("nan"), device="cuda") for e in encs]
    with nvcodec.NvdecDecoderPool(sessions=4) as pool:
        jobs = [pool.decode(e, o, name=f"t{i}") for i, (e, o) in enumerate(zip(encs, outs, strict=True))]
        for j in jobs:
            j.result()
    for e, o in zip(encs, outs, strict=True):
        ref = decode_tensor(e)
        assert float((o.cpu() - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.gpu
def test_from_pretrained_to_cuda_decodes_on_nvdec(nvdec, tiny_quantized):
    from transformers import AutoModelForCausalLM

    path, ref_logits = tiny_quantized
    model = AutoModelForCausalLM.from_pretrained(path, device_map="cuda")
    report = model.vc_quant_report
    assert report.decode_backend == "nvdec" and report.decode_fallback_reason is None
    assert all(p.device.type == "cuda" for p in model.parameters())
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4, 5]], device="cuda")).logits.cpu()
    assert torch.allclose(logits, ref_logits, atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
def test_decode_backend_cpu_still_loads_to_cuda(nvdec, tiny_quantized):
    from transformers import AutoModelForCausalLM

    import vc_quant

    path, ref_logits = tiny_quantized
    model = AutoModelForCausalLM.from_pretrained(
        path, device_map="cuda", quantization_config=vc_quant.VcQuantizationConfig(bits=3, decode_backend="cpu")
    )
    assert model.vc_quant_report.decode_backend == "cpu"
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4, 5]], device="cuda")).logits.cpu()
    assert torch.allclose(logits, ref_logits, atol=1e-3, rtol=1e-3)
