import pytest
import torch

from vc_quant.codec.video import pixels as px


@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("amplitude", [1.0, 0.9])
def test_pixel_map_error_is_at_most_half_a_step(per_row, amplitude):
    x = torch.randn(40, 300) * torch.linspace(0.1, 3, 40).unsqueeze(1)
    center, step = px.pixel_map(x, amplitude, per_row)
    p = px.to_pixels(x, center, step)
    assert p.dtype == torch.uint8
    xh = px.from_pixels(p, center, step)
    assert ((xh - x).abs() <= step.float() * 0.5 + 1e-6).all()
    used = int(p.max()) - int(p.min())
    assert used >= int(250 * amplitude) - 2  # the amplitude knob controls the range used


def test_pixel_map_constant_input():
    x = torch.full((3, 10), 0.25)
    center, step = px.pixel_map(x, 1.0, per_row=True)
    assert torch.equal(px.from_pixels(px.to_pixels(x, center, step), center, step), x)
