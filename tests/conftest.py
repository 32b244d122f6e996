"""Shared fixtures and markers.

* ``slow`` tests use the real development model (SmolLM2-135M); they skip with a
  reason when its offline asset package is not installed, unless
  ``VC_QUANT_REQUIRE_ASSETS=1`` (CI sets it) turns the skip into a failure.
* ``gpu`` tests (the NVDEC path, tests/codec/test_nvcodec.py) skip with the reason
  without CUDA/NVDEC/PyNvVideoCodec and fail when ``VC_QUANT_REQUIRE_GPU=1``.
"""

from __future__ import annotations

import os

import pytest
import torch

from hf_fixtures import copy_dir, tiny_quantized, tiny_src  # noqa: F401  (shared fixtures)


def _required(var: str) -> bool:
    return os.environ.get(var, "") not in ("", "0")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    from vc_quant.testing import AssetMissingError, smollm2_checkpoint

    try:
        return smollm2_checkpoint()
    except AssetMissingError as exc:
        if _required("VC_QUANT_REQUIRE_ASSETS"):
            raise
        pytest.skip(f"real model not installed: {exc}")


@pytest.fixture(scope="session")
def smollm2_state(smollm2_dir):
    from safetensors.torch import load_file

    return load_file(str(smollm2_dir / "model.safetensors"))


@pytest.fixture
def gaussian():
    def make(rows: int, cols: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(rows, cols, generator=g) * 0.02).to(dtype)

    return make
