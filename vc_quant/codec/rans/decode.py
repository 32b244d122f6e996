"""The rANS family's decoders: a record → its int8 samples (reconstruction integers) or the tensor.

* CPU: the native decoder (segments split over threads), then — for the dense tensor — the
  native fused dequantise + inverse rotation + column unscaling, row by row in cache.
* CUDA: the Triton decoder writes the samples straight into GPU memory (bit-identical to the
  CPU decoder); dequantisation and the inverse rotation run in torch on the GPU.

Records are assumed verified (:meth:`~vc_quant.codec.record.EncodedTensor.verify`); the
stream is still parsed (cheap: header, tables, offsets) and every decoder checks the
integer invariants of the stream (:mod:`~vc_quant.codec.rans.coder`).
"""

from __future__ import annotations

import numpy as np
import torch

from vc_quant.codec import transform as tf
from vc_quant.codec.rans import bitstream as bs
from vc_quant.codec.rans import coder, native
from vc_quant.codec.record import FLOAT_DTYPES, EncodedTensor, matrix_shape


def stream_of(enc: EncodedTensor, name: str = "tensor") -> bs.RansStream:
    """The record's parsed stream (parsed once and kept with the record: blocks decode every step)."""
    stream = enc.derived.get("stream")
    if stream is None:
        rows, cols = matrix_shape(enc.meta["shape"])
        stream = enc.derived["stream"] = bs.parse(enc.bitstream.cpu().numpy(), rows * cols, name)
    return stream


def samples_cpu(
    enc: EncodedTensor, workers: int | None = None, name: str = "tensor", out: np.ndarray | None = None
) -> np.ndarray:
    """The int8 ``(rows, cols)`` samples, decoded on the CPU (into ``out`` when given)."""
    rows, cols = matrix_shape(enc.meta["shape"])
    out = np.empty(rows * cols, dtype=np.int8) if out is None else out.reshape(-1)
    coder.decode_levels(stream_of(enc, name), out, workers, name)
    return out.reshape(rows, cols)


def decode_samples_rans(
    enc: EncodedTensor, device: torch.device, backend: str, workers: int | None = None, name: str = "tensor",
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """The int8 samples on ``device``: Triton on CUDA (``backend == "triton"``), else the CPU decoder.

    ``out``: a contiguous int8 ``(rows, cols)`` tensor on ``device`` to decode into (no temporary)."""
    rows, cols = matrix_shape(enc.meta["shape"])
    if backend == "triton":
        from vc_quant.codec.rans.triton_decode import decode_levels_triton

        flat = out.reshape(-1) if out is not None else None
        return decode_levels_triton(stream_of(enc, name), device, name=name, out=flat).reshape(rows, cols)
    if out is not None and out.device.type == "cpu" and out.is_contiguous():
        samples_cpu(enc, workers, name, out=out.numpy())
        return out
    samples = torch.from_numpy(samples_cpu(enc, workers, name)).to(device)
    return samples if out is None else out.copy_(samples)


def decode_tensor_rans(
    enc: EncodedTensor, device: torch.device, dtype: torch.dtype | None, backend: str, workers: int | None = None,
    name: str = "tensor",
) -> torch.Tensor:  # fmt: skip
    """The dense tensor on ``device`` in ``dtype`` (default: the record's)."""
    if backend == "triton" or not native.status():
        return enc.dequantize_samples(decode_samples_rans(enc, device, backend, workers, name), dtype)
    samples = enc.derived.get("samples")  # the encoder's own record (keep_samples): no entropy decode
    if samples is None:
        samples = samples_cpu(enc, workers, name)
    step = float(enc.step.reshape(())) if enc.step.numel() == 1 else enc.step.reshape(-1).float().numpy()
    x = torch.from_numpy(tf.unrotate_levels(samples, step, enc.meta["rotation_seed"], enc.col_scale))
    n = samples.size if len(enc.meta["shape"]) >= 2 else int(np.prod(enc.meta["shape"]))
    out_dtype = dtype or FLOAT_DTYPES.get(enc.meta["dtype"], torch.float32)
    return x.reshape(-1)[:n].reshape(enc.meta["shape"]).to(device=device, dtype=out_dtype)


def decode_alike_rans(encs: list[EncodedTensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Records of one shape and rotation (KV-cache blocks) → ``(len(encs), *shape)``, decoded at once.

    The blocks' integers decode side by side on the worker threads, then one native dequantise +
    inverse rotation runs over all their rows (each row with its record's step).
    """
    first = encs[0].meta
    rows, cols = matrix_shape(first["shape"])
    samples = np.empty((len(encs), rows * cols), dtype=np.int8)
    streams = [stream_of(e, e.meta.get("name", "tensor")) for e in encs]
    if len({(s.lanes, s.lane_len, s.n_segments) for s in streams}) == 1:
        coder.decode_many(streams, samples, name=first.get("name", "tensor"))
    else:  # blocks coded with different lane layouts (not written by the KV cache): one by one
        for i, stream in enumerate(streams):
            coder.decode_levels(stream, samples[i], workers=1, name=encs[i].meta.get("name", "tensor"))
    steps = np.concatenate([np.broadcast_to(e.step.reshape(-1).float().numpy(), (rows,)) for e in encs])
    if native.status():
        x = torch.from_numpy(tf.unrotate_levels(samples.reshape(-1, cols), steps, first["rotation_seed"]))
    else:
        x = torch.from_numpy(samples.reshape(-1, cols)).float() * torch.from_numpy(steps)[:, None]
        if first["rotation_seed"] is not None:
            x = tf.unrotate(x, first["rotation_seed"])
    n = int(np.prod(first["shape"]))
    return x.reshape(len(encs), -1)[:, :n].reshape(len(encs), *first["shape"]).to(dtype)
