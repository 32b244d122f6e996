"""NVDEC facts the GPU backend's design rests on (run on a GPU; results/gpu/nvdec_experiments.txt).

* does one decoder session survive a change of picture size, with and without
  ``setReconfigParams`` (measured: without it, surfaces keep the old size)?
* what a session costs to create;
* how decode throughput scales with threads, one session each (is the GIL
  released while NVDEC works?), and with one thread driving several sessions.

    python scripts/nvdec_experiments.py
"""

from __future__ import annotations

import itertools
import threading
import time

import torch

from vc_quant import encode_tensor
from vc_quant.codec.decode import decode_frames
from vc_quant.codec.video import frames as fr
from vc_quant.codec.video.backends import nvcodec as nv

DEVICE = torch.device("cuda", 0)


def layout(enc) -> fr.FrameLayout:
    return fr.FrameLayout.from_dict(enc.meta["layout"])


class _NoReconfigure(nv._Session):
    def set_size(self, width: int, height: int) -> None:  # what the backend did before the fix
        self.size = (width, height)


def reconfigure(encs) -> None:
    for cls in (_NoReconfigure, nv._Session):
        session, results = cls(DEVICE, 2048), []
        for enc in encs:
            try:
                got = session.decode_canvas(enc, layout(enc), "probe")
                torch.cuda.synchronize()
                results.append(torch.equal(fr.frames_to_canvas(decode_frames(enc), layout(enc)), got.cpu()))
            except Exception as exc:  # the experiment reports any failure
                results.append(f"error: {str(exc)[:90]}")
        print(f"one session, sizes {[layout(e).width for e in encs]}, {cls.__name__}: {results}", flush=True)


def session_cost() -> None:
    t0 = time.perf_counter()
    sessions = [nv._Session(DEVICE, 2048) for _ in range(8)]
    torch.cuda.synchronize()
    print(f"session creation: {(time.perf_counter() - t0) / len(sessions) * 1e3:.1f} ms each", flush=True)


def thread_scaling(enc, reps: int = 6) -> None:
    lay = layout(enc)
    for k in (1, 2, 4, 7, 14):
        barrier = threading.Barrier(k + 1)

        def worker(barrier=barrier) -> None:
            session = nv._Session(DEVICE, 2048)
            session.decode_canvas(enc, lay, "warm-up")
            session.stream.synchronize()
            barrier.wait()
            for _ in range(reps):
                session.decode_canvas(enc, lay, "timed")
            session.stream.synchronize()

        threads = [threading.Thread(target=worker) for _ in range(k)]
        for t in threads:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        secs = time.perf_counter() - t0
        print(f"threads={k:2d}: {lay.samples * reps * k / secs / 1e9:.3f} GB/s of samples", flush=True)


def one_thread_many_sessions(enc, rounds: int = 4) -> None:
    data = enc.bitstream.contiguous()
    offsets = list(itertools.accumulate(enc.meta["frame_bytes"], initial=0))
    lay = layout(enc)
    for k in (1, 4, 7):
        sessions = [nv._Session(DEVICE, 2048) for _ in range(k)]
        for s in sessions:
            s.set_size(lay.width, lay.height)

        def one_round(sessions=sessions) -> None:  # launch every session, then drain each
            for s in sessions:
                for a, b in itertools.pairwise(offsets):
                    s._decode(data, a, b - a)
            for s in sessions:
                s._flush()

        one_round()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(rounds):
            one_round()
        torch.cuda.synchronize()
        secs = time.perf_counter() - t0
        print(f"1 thread, {k} sessions interleaved: {lay.samples * rounds * k / secs / 1e9:.3f} GB/s", flush=True)


def main() -> None:
    status = nv.nvdec_status()
    if not status:
        raise SystemExit(f"needs NVDEC: {status.reason}")
    g = torch.Generator().manual_seed(0)
    small_a = encode_tensor(torch.randn(576, 576, generator=g) * 0.02, 2.5)
    small_b = encode_tensor(torch.randn(1536, 576, generator=g) * 0.02, 2.5)
    big = encode_tensor(torch.randn(5632, 2048, generator=g) * 0.02, 2.5, rate_control="predict")
    print("layouts:", layout(small_a), layout(small_b), layout(big), flush=True)
    reconfigure([small_a, small_b, small_a, big])
    session_cost()
    thread_scaling(big)
    one_thread_many_sessions(big)


if __name__ == "__main__":
    main()
