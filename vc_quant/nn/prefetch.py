"""BitstreamWindow: decode bitstream-resident layers just in time, a bounded number ahead.

The layers of a model run in a fixed order (their registration order for decoder
LMs: q, k, v, o, gate, up, down, then the next layer). When layer ``i`` asks for its
samples, the window hands over the decode started earlier (or decodes now) and starts
decoding layers ``i+1 … i+ahead`` (wrapping to the first layer for the next forward)
on the decode pool: CPU workers, or NVDEC sessions on a GPU — separate engines, so
decoding overlaps compute. After the forward the layer's samples are dropped.

Weight memory held at any time: every bitstream + at most ``ahead + 1`` decoded int8
matrices.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING

import torch

from vc_quant.codec.decode import DecodePool

if TYPE_CHECKING:
    from vc_quant.nn.linear import VcLinear


class BitstreamWindow:
    def __init__(self, modules: list[VcLinear], ahead: int = 7, backend: str = "auto") -> None:
        self.modules = list(modules)
        self.index = {id(m): i for i, m in enumerate(self.modules)}
        self.ahead = max(0, min(ahead, len(self.modules) - 1))
        self.pool = DecodePool(backend)
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()
        self.decodes = 0  # decodes started (a measure of work, for tests and benchmarks)
        self.peak_bytes = 0  # most decoded bytes held at once (for benchmarks and memory bounds)

    def _submit(self, i: int) -> Future:
        module = self.modules[i]
        out = torch.empty(module.out_features, module.in_features, dtype=torch.int8, device=module.weight.device)
        self.decodes += 1
        # the record was verified when it was loaded; decode only
        return self.pool.submit(module.record(), out, samples=True, name=module.meta.get("name", "weight"),
                                verify=False)  # fmt: skip

    def acquire(self, module: VcLinear) -> torch.Tensor:
        """The decoded int8 samples of ``module``; starts decoding the next ``ahead`` layers."""
        i = self.index[id(module)]
        with self._lock:
            job = self._pending.get(i) or self._submit(i)
            self._pending[i] = job
            for k in range(1, self.ahead + 1):
                j = (i + k) % len(self.modules)
                if j not in self._pending and self.modules[j] is not None:
                    self._pending[j] = self._submit(j)
            self.peak_bytes = max(self.peak_bytes, self._held_bytes())
        return job.result()

    def release(self, module: VcLinear) -> None:
        """Drop ``module``'s decoded samples (called after its forward)."""
        with self._lock:
            self._pending.pop(self.index[id(module)], None)

    def remove(self, module: VcLinear) -> None:
        """Stop serving ``module`` (it left bitstream residency)."""
        with self._lock:
            i = self.index.pop(id(module))
            self._pending.pop(i, None)
            self.modules[i] = None  # keep the other indices; a None is skipped when prefetching

    def held(self) -> int:
        """Decoded (or decoding) sample matrices held now."""
        with self._lock:
            return len(self._pending)

    def held_bytes(self) -> int:
        with self._lock:
            return self._held_bytes()

    def _held_bytes(self) -> int:  # caller holds the lock
        return sum(self.modules[i].in_features * self.modules[i].out_features for i in self._pending
                   if self.modules[i] is not None)  # fmt: skip

    def close(self) -> None:
        with self._lock:
            self._pending.clear()
        self.pool.shutdown(cancel=True)
