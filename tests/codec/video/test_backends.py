"""Video backends: the AV1 backend's own contract (HEVC/H.264 are covered through the tensor codec)."""

import itertools
import os

import numpy as np
import pytest
import torch

from vc_quant import VcConfigError, decode_tensor, encode_tensor
from vc_quant.codec.video.backends import EncoderSettings, get_backend
from vc_quant.codec.video.backends.pyav import av1_log2_step, svt_preset
from vc_quant.errors import VcCodecError


def rel_mse(a, b):
    return float(((a.float() - b.float()) ** 2).sum() / (b.float() ** 2).sum())


def test_av1_step_grows_with_qp():
    steps = [av1_log2_step(q) for q in range(1, 64)]
    assert all(b > a for a, b in itertools.pairwise(steps))
    # measured: ~0.1 log2 units per qp above qp 30 (a doubling every ~10 qp)
    assert 0.08 < (av1_log2_step(60) - av1_log2_step(30)) / 30 < 0.12


def test_av1_presets_accept_digits_and_x265_names():
    assert svt_preset("8") == 8 and svt_preset("superfast") == 8 and svt_preset("slow") < svt_preset("superfast")
    with pytest.raises(VcConfigError, match="SVT-AV1 preset"):
        svt_preset("14")
    with pytest.raises(VcConfigError, match="preset='turbo'"):
        encode_tensor(torch.randn(64, 64), 3.0, codec="av1", preset="turbo")


def test_av1_packets_decode_on_their_own():
    backend = get_backend("av1")
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (216, 144), dtype=np.uint8) for _ in range(3)]
    packets = backend.encode(frames, 20, EncoderSettings(preset="10"))
    assert len(packets) == 3
    # each packet alone (its own sequence header): the last frame decodes without the others
    alone = backend.decode([packets[2]], 144, 144)[0]
    together = backend.decode(packets, 144, 144)[2]
    assert np.array_equal(alone, together)
    assert np.abs(alone.astype(int) - frames[2]).mean() < 8


def test_av1_refuses_thin_pictures_instead_of_hanging():
    with pytest.raises(VcCodecError, match="below 64"):
        get_backend("av1").encode([np.zeros((24, 512), np.uint8)], 30, EncoderSettings(preset="10"))


def test_av1_beats_hevc_per_bit_on_gaussian_weights(gaussian):
    """Measured (results/codec/av1_vs_hevc.md): ~10% lower MSE at the same rate."""
    w = gaussian(512, 768, seed=4)
    errs = {}
    for codec in ("hevc", "av1"):
        enc = encode_tensor(w, 3.0, codec=codec)
        assert abs(enc.bits_per_value - 3.0) <= 0.03
        errs[codec] = rel_mse(decode_tensor(enc), w)
    assert errs["av1"] < 0.97 * errs["hevc"]
    assert errs["av1"] < 1.7 * 2**-6  # measured ~1.55x the Gaussian Shannon bound


@pytest.mark.skipif(not hasattr(os, "sched_getscheduler"), reason="Linux scheduling API")
def test_av1_encode_leaves_the_thread_scheduling_alone():
    """SVT-AV1 run as root switches its calling thread to SCHED_FIFO 99; the backend restores it."""
    before = (os.sched_getscheduler(0), os.sched_getparam(0))
    encode_tensor(torch.randn(256, 256), 3.0, codec="av1")
    assert (os.sched_getscheduler(0), os.sched_getparam(0)) == before
