import pytest
import torch

from vc_quant.codec.video import frames as fr
from vc_quant.errors import VcConfigError


@pytest.mark.parametrize(
    "rows,cols,tile",
    [
        (1, 1, 2048),
        (3, 5, 2048),
        (576, 576, 2048),
        (576, 1536, 2048),
        (1536, 576, 2048),
        (100, 5000, 2048),
        (4000, 144, 256),
        (49, 2049, 1024),
        (2, 143, 144),
        (7000, 300, 512),
    ],
)
def test_pack_unpack_is_exact_and_frames_are_nvdec_sized(rows, cols, tile):
    mat = torch.randint(0, 256, (rows, cols), dtype=torch.uint8, generator=torch.Generator().manual_seed(rows))
    layout = fr.plan_layout(rows, cols, tile)
    frames = fr.pack(mat, layout)
    assert len(frames) == layout.n_frames
    for f in frames:
        h2, w = f.shape
        assert (h2, w) == (layout.height * 3 // 2, layout.width)
        assert w % 16 == 0 and layout.height % 16 == 0
        assert fr.MIN_SIDE <= w <= tile and fr.MIN_SIDE <= layout.height <= tile
    assert torch.equal(fr.unpack(frames, layout), mat)
    assert layout.samples >= rows * cols
    assert fr.FrameLayout.from_dict(layout.to_dict()) == layout


def test_chroma_planes_carry_data():
    # a 576x576 matrix fits one 384x576 frame: 2/3 of it in luma, 1/3 in chroma
    layout = fr.plan_layout(576, 576)
    assert (layout.n_frames, layout.height, layout.width) == (1, 384, 576)
    assert layout.samples == 576 * 576


def test_bad_tile_is_rejected():
    with pytest.raises(VcConfigError, match="tile=100"):
        fr.plan_layout(10, 10, 100)
    with pytest.raises(VcConfigError, match="tile=9000"):
        fr.plan_layout(10, 10, 9000)
