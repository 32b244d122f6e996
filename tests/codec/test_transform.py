import pytest
import torch

from vc_quant.codec import transform as tf
from vc_quant.errors import VcConfigError


@pytest.mark.parametrize("n", [2, 7, 64, 576, 1536, 2048, 1000])
def test_rotation_is_orthogonal_and_exactly_invertible(n):
    x = torch.randn(5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    y = tf.rotate(x, seed=3)
    assert torch.allclose(y.norm(dim=1), x.norm(dim=1), rtol=1e-12)
    assert torch.allclose(tf.unrotate(y, seed=3), x, atol=1e-12)
    assert not torch.allclose(y, x)


def test_rotation_depends_on_seed_and_is_deterministic():
    x = torch.randn(3, 576, dtype=torch.float64)
    assert torch.equal(tf.rotate(x, 1), tf.rotate(x, 1))
    assert not torch.allclose(tf.rotate(x, 1), tf.rotate(x, 2))


def test_rotation_spreads_an_outlier():
    x = torch.zeros(1, 1536, dtype=torch.float64)
    x[0, 7] = 100.0
    y = tf.rotate(x, 0)
    # energy of one spike spreads over all coordinates: max |y| is ~ 100 / sqrt(n/ m)
    assert y.abs().max() < 100.0 / 10


def test_rotation_rejects_large_odd_factor():
    with pytest.raises(VcConfigError, match="odd factor"):
        tf.rotate(torch.zeros(1, 4099), 0)


def test_fwht_matches_dense_hadamard():
    n = 8
    h = torch.tensor([[1.0]], dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    x = torch.randn(4, n, dtype=torch.float64)
    assert torch.allclose(tf.fwht(x), x @ h.t() / n**0.5, atol=1e-12)


@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("amplitude", [1.0, 0.9])
def test_pixel_map_error_is_at_most_half_a_step(per_row, amplitude):
    x = torch.randn(40, 300) * torch.linspace(0.1, 3, 40).unsqueeze(1)
    center, step = tf.pixel_map(x, amplitude, per_row)
    px = tf.to_pixels(x, center, step)
    assert px.dtype == torch.uint8
    xh = tf.from_pixels(px, center, step)
    assert ((xh - x).abs() <= step.float() * 0.5 + 1e-6).all()
    used = int(px.max()) - int(px.min())
    assert used >= int(250 * amplitude) - 2  # the amplitude knob controls the range used


def test_pixel_map_constant_input():
    x = torch.full((3, 10), 0.25)
    center, step = tf.pixel_map(x, 1.0, per_row=True)
    assert torch.equal(tf.from_pixels(tf.to_pixels(x, center, step), center, step), x)
