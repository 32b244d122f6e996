"""BitstreamWindow: decode bitstream-resident layers just in time, a bounded number ahead.

The layers of a model run in a fixed order (their registration order for decoder
LMs: q, k, v, o, gate, up, down, then the next layer). When layer ``i`` asks for its
samples, the window hands over the decode started earlier (or decodes now) and starts
decoding layers ``i+1 … i+ahead`` (wrapping to the first layer for the next forward)
on the decode pool: CPU workers, or NVDEC sessions on a GPU — separate engines, so
decoding overlaps compute. After the forward the layer's samples are dropped.

On the CPU, forwards of few tokens (decode steps) run torch on one intra-op thread while
the window decodes (:meth:`BitstreamWindow.hook`): the decode is most of such a step, and
torch's spinning OpenMP workers would take the cores the decoders need.

Decoded samples go into ``ahead + 1`` reused slot buffers (each grown once to the largest
matrix it has held): no allocation per forward. rANS records decode straight into their
slot (CPU threads, or the Triton kernel on a side CUDA stream). Weight memory held at any
time: every bitstream + the slots (at most ``ahead + 1`` matrices).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING

import torch
from torch import nn

from vc_quant.codec.decode import DecodePool, decode_samples

if TYPE_CHECKING:
    from vc_quant.nn.linear import VcLinear


#: forwards of at most this many tokens run torch on one intra-op thread while the window decodes on the CPU.
#: Measured (SmolLM2-135M at 2.5 bits, 2 cores, one forward; 1 vs 2 threads): 1 token 86 vs 131 ms,
#: 16 tokens 120 vs 145, 64 tokens 156 vs 182 — but 512 tokens 813 vs 633 (compute dominates there).
FEW_TOKENS = 64


def forward_tokens(args: tuple, kwargs: dict) -> int | None:
    """Tokens in a causal LM's forward call (``input_ids`` or ``inputs_embeds``), None if neither is given."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(ids, torch.Tensor):
        return ids.numel()
    embeds = kwargs.get("inputs_embeds")
    if isinstance(embeds, torch.Tensor) and embeds.dim() >= 2:
        return embeds.numel() // embeds.shape[-1]
    return None


class _SavedThreads(threading.local):
    """Per calling thread: the intra-op thread counts to restore after each (nested) forward, or None."""

    def __init__(self) -> None:
        self.stack: list[int | None] = []


class BitstreamWindow:
    def __init__(self, modules: list[VcLinear], ahead: int = 7, backend: str = "auto") -> None:
        self.modules = list(modules)
        self.index = {id(m): i for i, m in enumerate(self.modules)}
        self.ahead = max(0, min(ahead, len(self.modules) - 1))
        self.pool = DecodePool(backend)
        self._pending: dict[int, Future] = {}
        self._views: dict[int, torch.Tensor] = {}  # module index -> its samples (a view into its slot)
        self._slot_of: dict[int, int] = {}  # module index -> slot holding its samples
        self._slots: list[torch.Tensor | None] = [None] * (self.ahead + 1)
        self._free = list(range(self.ahead + 1))
        # CUDA: decodes run on a side stream; a slot is rewritten only after the compute stream
        # has finished reading it (an event recorded at release)
        self._slot_free: list[torch.cuda.Event | None] = [None] * (self.ahead + 1)
        self._side: dict[torch.device, torch.cuda.Stream] = {}
        self._lock = threading.Lock()
        self._hooks: list = []  # the model's forward hooks (hook()); removed by close()
        self._saved_threads = _SavedThreads()
        self.decodes = 0  # decodes started (a measure of work, for tests and benchmarks)
        self.peak_bytes = 0  # most decoded bytes held at once (for benchmarks and memory bounds)

    def _slot_buffer(self, module: VcLinear) -> tuple[int, torch.Tensor]:
        """A free slot, grown if this matrix is larger than anything it held; the matrix view into it."""
        slot = self._free.pop()
        n, device = module.out_features * module.in_features, module.weight.device
        buf = self._slots[slot]
        if buf is None or buf.numel() < n or buf.device != device:
            buf = self._slots[slot] = torch.empty(n, dtype=torch.int8, device=device)
        return slot, buf[:n].view(module.out_features, module.in_features)

    def _submit(self, i: int) -> Future:
        module = self.modules[i]
        slot, out = self._slot_buffer(module)
        self._slot_of[i], self._views[i] = slot, out
        self.decodes += 1
        record, name = module.record(), module.meta.get("name", "weight")
        if not out.is_cuda:  # the record was verified when it was loaded; decode only
            return self.pool.submit(record, out, samples=True, name=name, verify=False)
        free, side = self._slot_free[slot], self._side_stream(out.device)

        def on_side_stream() -> torch.cuda.Event:
            with torch.cuda.stream(side):
                if free is not None:
                    side.wait_event(free)
                decode_samples(record, backend=self.pool.requested, threads=1, name=name, out=out)
                done = torch.cuda.Event()
                done.record(side)
            return done

        return self.pool.submit_call(on_side_stream, out.device, record.meta["codec"])

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._side:
            self._side[device] = torch.cuda.Stream(device=device)
        return self._side[device]

    def _drop(self, i: int) -> None:  # caller holds the lock
        if self._pending.pop(i, None) is not None:
            slot = self._slot_of.pop(i)
            view = self._views.pop(i)
            if view.is_cuda:  # reusable once the compute stream is past its last reader
                self._slot_free[slot] = torch.cuda.Event()
                self._slot_free[slot].record()
            self._free.append(slot)

    def _evict_farthest(self, i: int) -> None:  # caller holds the lock
        """Free a slot for module ``i`` (called out of order): drop the prefetch farthest ahead of it."""
        n = len(self.modules)
        far = max(self._pending, key=lambda j: (j - i) % n)
        self._pending[far].result()  # a worker writes its slot until the decode ends
        self._drop(far)

    def acquire(self, module: VcLinear) -> torch.Tensor:
        """The decoded int8 samples of ``module``; starts decoding the next ``ahead`` layers."""
        i = self.index[id(module)]
        with self._lock:
            job = self._pending.get(i)
            if job is None:
                if not self._free:
                    self._evict_farthest(i)
                job = self._pending[i] = self._submit(i)
            for k in range(1, self.ahead + 1):
                j = (i + k) % len(self.modules)
                if j not in self._pending and self.modules[j] is not None and self._free:
                    self._pending[j] = self._submit(j)
            self.peak_bytes = max(self.peak_bytes, self._held_bytes())
            view = self._views[i]
        done = job.result()
        if isinstance(done, torch.cuda.Event):
            torch.cuda.current_stream(view.device).wait_event(done)
        return view

    def release(self, module: VcLinear) -> None:
        """Hand ``module``'s slot back (called after its forward; its decode has finished)."""
        with self._lock:
            self._drop(self.index[id(module)])

    def remove(self, module: VcLinear) -> None:
        """Stop serving ``module`` (it left bitstream residency)."""
        with self._lock:
            i = self.index.pop(id(module))
            job = self._pending.get(i)
        if job is not None:
            job.result()  # its slot is written by a worker until the decode ends
        with self._lock:
            self._drop(i)
            self.modules[i] = None  # keep the other indices; a None is skipped when prefetching

    def held(self) -> int:
        """Decoded (or decoding) sample matrices held now."""
        with self._lock:
            return len(self._pending)

    def held_bytes(self) -> int:
        """Bytes the window holds (its slot buffers, in use or not)."""
        with self._lock:
            return self._held_bytes()

    def _held_bytes(self) -> int:  # caller holds the lock
        """Bytes of the slot buffers: the decoded window's memory (allocated once, reused)."""
        return sum(b.numel() for b in self._slots if b is not None)

    def on_cpu(self) -> bool:
        first = next((m for m in self.modules if m is not None), None)
        return first is not None and first.weight.device.type == "cpu"

    def hook(self, model: nn.Module) -> None:
        """Around every forward of ``model`` with at most :data:`FEW_TOKENS` tokens, while this window
        decodes on the CPU: torch on one intra-op thread, the caller's count restored afterwards
        (also when the forward raises)."""

        def before(module, args, kwargs):
            tokens, threads = forward_tokens(args, kwargs), torch.get_num_threads()
            few = tokens is not None and tokens <= FEW_TOKENS and threads > 1 and self.on_cpu()
            self._saved_threads.stack.append(threads if few else None)
            if few:
                torch.set_num_threads(1)

        def after(module, args, kwargs, output):
            saved = self._saved_threads.stack.pop()
            if saved is not None:
                torch.set_num_threads(saved)

        self._hooks += [model.register_forward_pre_hook(before, with_kwargs=True),
                        model.register_forward_hook(after, with_kwargs=True, always_call=True)]  # fmt: skip

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self.pool.shutdown(cancel=True)
        with self._lock:
            self._pending.clear()
            self._slot_of.clear()
            self._views.clear()
            self._slots = [None] * (self.ahead + 1)
            self._slot_free = [None] * (self.ahead + 1)
            self._free = list(range(self.ahead + 1))
