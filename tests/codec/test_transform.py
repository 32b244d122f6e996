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
