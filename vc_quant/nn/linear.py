"""VcLinear: a linear layer whose weight stays compressed in memory.

Three residency modes (``resident``):

* ``"dense"`` — a plain float weight (the decoded matrix); fastest compute.
* ``"int8"`` — the codec's decoded 8-bit samples in the rotated domain, one byte per
  weight. With ``W ≈ (center + step·S)·R`` (``S`` the int8 samples, ``R`` the
  codec's orthogonal rotation along the input dimension) the layer computes
  ``y = (x Rᵀ) Wrotᵀ = step·((x Rᵀ) Sᵀ) + center·Σᵢ(x Rᵀ)ᵢ`` — the rotation moves
  from the weight to the activations (O(n log n) per token), the matrix stays int8.
* ``"bitstream"`` — only the compressed bytes stay; the samples are decoded just
  before the forward (by a :class:`~vc_quant.nn.prefetch.BitstreamWindow` that decodes
  the next layers ahead) and dropped after it.

The module subclasses ``nn.Linear`` so that tools which look for linear layers (PEFT's
LoRA, device-map planning) find it; in the int8/bitstream modes ``weight`` is an
int8/uint8 *buffer*, never a float parameter. :meth:`dequantize_weight` gives the
dense weight in every mode.
"""

from __future__ import annotations

import zlib
from functools import lru_cache
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from vc_quant.codec import transform as tf
from vc_quant.codec.decode import decode_samples, decode_tensor
from vc_quant.codec.record import EncodedTensor
from vc_quant.errors import VcConfigError

if TYPE_CHECKING:
    from vc_quant.nn.prefetch import BitstreamWindow
    from vc_quant.nn.source import RecordSource

RESIDENT_MODES = ("dense", "int8", "bitstream")
# up to this many tokens a bf16 forward uses torch's int8 weight-only kernel (measured on
# 2 CPU cores, 576x1536: 33 us vs 74 us dense at 1 token; slower than dequantize + matmul
# from ~8 tokens on, and much slower in fp32/fp16 at any size: scripts/bench_resident.py)
_INT8_KERNEL_MAX_TOKENS = 4
_CUDA_INT8_MAX_TOKENS = 16


def check_resident(mode: object) -> str:
    if mode not in RESIDENT_MODES:
        raise VcConfigError(f"resident={mode!r}: expected one of {RESIDENT_MODES}")
    return mode  # type: ignore[return-value]


class VcLinear(nn.Linear):
    """A linear layer holding a vc_quant-compressed weight (see the module docstring)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
        resident: str = "dense", bitstream_bytes: int = 0,
    ) -> None:  # fmt: skip
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.resident = check_resident(resident)
        self.compute_dtype = dtype or torch.get_default_dtype()
        if resident == "dense":
            self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        elif resident == "int8":
            self.register_buffer("weight", torch.empty(out_features, in_features, device=device, dtype=torch.int8))
        else:
            self.register_buffer("weight", torch.empty(bitstream_bytes, device=device, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        # the rotated-domain affine map (int8 / bitstream): per tensor (1, 1) or per row (rows, 1).
        # Plain CPU tensors, not buffers (transformers re-creates non-persistent buffers after
        # loading); _affine() caches them per device.
        self.weight_center: torch.Tensor | None = None
        self.weight_step: torch.Tensor | None = None
        self.col_scale: torch.Tensor | None = None  # input-column scales of the record (fp16), if any
        self._affine_cache: dict[torch.device, tuple] = {}
        self.meta: dict | None = None  # the record's metadata (rotation seed, scale, layout, …)
        self.source: RecordSource | None = None  # where the stored record lives (for saving)
        self.fingerprint: int | None = None  # of the resident weight when its record was attached
        self.window: BitstreamWindow | None = None  # decodes ahead in bitstream mode
        self._bitstream_record: tuple | None = None  # (weight identity, record) in bitstream mode

    @classmethod
    def like(cls, linear: nn.Linear, resident: str = "dense", bitstream_bytes: int = 0) -> VcLinear:
        """An empty VcLinear with ``linear``'s shape, bias, device and dtype (on meta: no memory)."""
        return cls(
            linear.in_features, linear.out_features, linear.bias is not None, device=linear.weight.device,
            dtype=linear.weight.dtype, resident=resident, bitstream_bytes=bitstream_bytes,
        )  # fmt: skip

    def reset_parameters(self) -> None:  # weights come from a record, never from an initialiser
        pass

    def extra_repr(self) -> str:
        bits = ""
        if self.meta is not None and self.source is not None:
            bits = f", bits={8 * self.source.nbytes / (self.in_features * self.out_features):.2f}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"resident={self.resident}{bits}")  # fmt: skip

    # --- state ---------------------------------------------------------------------------
    def attach(self, enc: EncodedTensor, source: RecordSource) -> None:
        """Take the record's metadata and map (the resident weight itself is set by the caller)."""
        self.meta = enc.meta
        self.source = source
        self.weight_center, self.weight_step = enc.center.detach().cpu().clone(), enc.step.detach().cpu().clone()
        self.col_scale = enc.col_scale.detach().cpu().clone() if enc.col_scale is not None else None
        self._affine_cache = {}

    def _affine(self, device: torch.device) -> tuple:
        """``(center, step, 1/col_scale)`` on ``device``: Python floats for a per-tensor map (no
        copies), vectors per row; the inverse column scale (float32) or None."""
        if device not in self._affine_cache:
            c, s = self.weight_center, self.weight_step
            # per tensor: a Python float (no copies); per row: a vector (rANS records with a step
            # per row keep a scalar centre of 0)
            c = float(c) if c.numel() == 1 else c.reshape(-1).float().to(device)
            s = float(s) if s.numel() == 1 else s.reshape(-1).float().to(device)
            inv = (1.0 / self.col_scale.float()).to(device) if self.col_scale is not None else None
            self._affine_cache[device] = (c, s, inv)
        return self._affine_cache[device]

    def set_resident_weight(self, enc: EncodedTensor, source: RecordSource, device=None) -> None:
        """Decode ``enc`` into this module's residency mode (used after quantize-on-load)."""
        device = torch.device(device or (self.weight.device if self.weight.device.type != "meta" else "cpu"))
        self.attach(enc, source)
        name = enc.meta.get("name", "weight")
        if self.resident == "dense":
            self.weight = nn.Parameter(decode_tensor(enc, device, self.compute_dtype, name=name),
                                       requires_grad=self.weight.requires_grad)  # fmt: skip
        elif self.resident == "int8":
            self.weight = decode_samples(enc, device, name=name)
        else:
            self.weight = enc.bitstream
        self.fingerprint = self.resident_fingerprint()

    def resident_fingerprint(self) -> int:
        return fingerprint(self.weight)

    def is_modified(self) -> bool:
        """True when the resident weight differs from the one the record decoded to (an edit, a merge).

        Weights offloaded to disk (meta here) cannot be edited in place: never modified."""
        if self.weight.device.type == "meta":
            return False
        return self.fingerprint is None or self.resident_fingerprint() != self.fingerprint

    def record(self) -> EncodedTensor:
        """The stored record of this weight (bitstream mode: the resident bytes themselves)."""
        if self.source is None:
            raise VcConfigError("this VcLinear holds no record")
        if self.resident == "bitstream":
            key = (id(self.weight), self.weight._version, self.weight.device)
            if self._bitstream_record is None or self._bitstream_record[0] != key:
                # built once while the resident bytes stay the same: its parsed stream is kept with it
                # (the window decodes every layer at every forward)
                enc = EncodedTensor(self.weight.cpu(), self.weight_center, self.weight_step, self.meta,
                                    col_scale=self.col_scale)  # fmt: skip
                self._bitstream_record = (key, enc)
            return self._bitstream_record[1]
        return self.source.load()

    def to_dense(self) -> None:
        """Switch to dense residency in place (the decoded weight; e.g. before merging an adapter).

        The stored record still describes this weight, so a save without further changes
        writes it as it is; a change after this (a merge) is detected and re-encoded.
        """
        if self.resident == "dense":
            return
        weight = self.dequantize_weight()
        if self.window is not None:
            self.window.remove(self)
            self.window = None
        del self.weight
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.resident = "dense"
        self.fingerprint = self.resident_fingerprint()

    def held_bytes(self) -> int:
        """Host bytes held outside parameters and buffers: records kept for saving, the affine map."""
        record = self.source.held_bytes if self.source is not None and self.resident != "bitstream" else 0
        maps = (self.weight_center, self.weight_step, self.col_scale)
        return record + sum(t.numel() * t.element_size() for t in maps if t is not None)

    # --- compute -------------------------------------------------------------------------
    def dequantize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ``(out, in)`` weight in every mode."""
        dtype = dtype or self.compute_dtype
        if self.resident == "dense":
            return self.weight.to(dtype)
        samples = self.weight if self.resident == "int8" else self._decode_samples()
        center, step, inv_scale = self._affine(samples.device)
        center = center if isinstance(center, float) else center[:, None]
        step = step if isinstance(step, float) else step[:, None]
        x = samples.to(torch.float32) * step + center
        if self.meta["rotation_seed"] is not None:
            x = tf.unrotate(x, self.meta["rotation_seed"])
        if inv_scale is not None:
            x = x / self.col_scale.float().to(x.device)  # the decoder's exact operation (not * inv)
        return x.to(dtype)

    def _decode_samples(self) -> torch.Tensor:
        return decode_samples(self.record(), self.weight.device, name=self.meta.get("name", "weight"))

    def _samples(self) -> torch.Tensor:
        if self.resident == "int8":
            return self.weight
        if self.window is not None:
            return self.window.acquire(self)
        return self._decode_samples()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resident == "dense":
            return F.linear(x, self.weight, self.bias)
        samples = self._samples()
        try:
            center, step, inv_scale = self._affine(samples.device)
            return int8_linear(x, samples, center, step, self.meta["rotation_seed"], self.bias, inv_scale)
        finally:
            if self.window is not None:
                self.window.release(self)


_FP_CHUNK = 1 << 20
_FP_MUL, _FP_ADD = -7046029254386353131, 7240297564713848857  # 0x9E3779B97F4A7C15, 0x647A1F9C1B4D5A19 as int64


@lru_cache(maxsize=4)
def _fp_base(device: torch.device) -> torch.Tensor:
    return torch.arange(_FP_CHUNK, dtype=torch.int64, device=device) * _FP_MUL + _FP_ADD


def fingerprint(t: torch.Tensor) -> int:
    """A 64-bit hash of a tensor's bytes, computed on the tensor's own device (no host copy).

    ``Σ word_i · m_i mod 2^64`` over the bytes read as int64 words, with an odd
    multiplier ``m_i`` per position: a change of any one word changes the sum (odd
    multipliers are invertible mod 2^64) and several changes cancel with probability
    ~2^-64. Same value on every device. Change detection of resident weights must be
    certain and cheap, and a GPU-resident model is not copied to the host for it.
    """
    b = t.detach().contiguous().reshape(-1).view(torch.uint8)
    pad = (-b.numel()) % 8
    if pad:
        b = torch.cat([b, b.new_zeros(pad)])
    words = b.view(torch.int64)
    base = _fp_base(t.device)
    total = torch.zeros((), dtype=torch.int64, device=t.device)
    for start in range(0, words.numel(), _FP_CHUNK):
        chunk = words[start : start + _FP_CHUNK]
        offset = (start * _FP_MUL + 2**63) % 2**64 - 2**63  # the chunk's shift, wrapped into int64 in Python
        mult = (base[: chunk.numel()] + offset) | 1  # int64 arithmetic wraps mod 2^64
        total += (chunk * mult).sum()
    return int(total) ^ (t.numel() << 1) ^ zlib.crc32(str(t.dtype).encode())


def _int8_kernel(xd: torch.Tensor) -> bool:
    """Whether torch's int8 weight-only kernel computes this product (no autograd through it).

    CPU: bf16 with at most _INT8_KERNEL_MAX_TOKENS tokens (measured; fp32/fp16 are slower there).
    CUDA: fp16/bf16 with at most _CUDA_INT8_MAX_TOKENS tokens (decode steps: the weight is read once
    as int8, half of bf16's bytes); larger batches dequantise and use cuBLAS. Not measured on a GPU yet.
    """
    if torch.is_grad_enabled() and xd.requires_grad:
        return False
    if xd.device.type == "cpu":
        return xd.dtype == torch.bfloat16 and xd.shape[0] <= _INT8_KERNEL_MAX_TOKENS
    return xd.device.type == "cuda" and xd.dtype in (torch.float16, torch.bfloat16) and \
        xd.shape[0] <= _CUDA_INT8_MAX_TOKENS  # fmt: skip


def int8_linear(
    x: torch.Tensor, samples: torch.Tensor, center: torch.Tensor | float, step: torch.Tensor | float,
    seed: int | None, bias: torch.Tensor | None, inv_col_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """``x @ Wᵀ + bias`` for ``W = unrotate(center + step·samples)·diag(inv_col_scale)`` without building ``W``.

    ``center``/``step``: floats (one map per tensor) or ``(out,)`` vectors (one per row);
    ``inv_col_scale``: the record's inverse input-column scales (they move to the activations).
    The rotation runs on the activations in float32; the matmul runs on the int8 samples
    (torch's int8 weight-only kernel for a few tokens, :func:`_int8_kernel`; else the samples
    cast to the activation dtype, scaled per output channel after the product).
    """
    dtype = x.dtype
    lead = x.shape[:-1]
    xf = x.float() if inv_col_scale is None else x.float() * inv_col_scale
    xr = (tf.rotate(xf, seed) if seed is not None else xf).reshape(-1, x.shape[-1])
    xd = xr.to(dtype)
    step_v = step.to(dtype) if isinstance(step, torch.Tensor) else step
    if _int8_kernel(xd):
        scales = step_v if isinstance(step_v, torch.Tensor) else torch.full((samples.shape[0],), step_v, dtype=dtype,
                                                                             device=xd.device)  # fmt: skip
        y = torch.ops.aten._weight_int8pack_mm(xd, samples, scales)
    elif dtype == torch.float16:
        # the un-scaled product (|samples| <= 128) could overflow fp16: scale the weight first
        scaled = samples.to(dtype) * (step_v[:, None] if isinstance(step_v, torch.Tensor) else step_v)
        y = F.linear(xd, scaled)
    else:
        y = F.linear(xd, samples.to(dtype)) * step_v
    center_v = center.to(dtype) if isinstance(center, torch.Tensor) else center
    if not (isinstance(center_v, float) and center_v == 0.0):  # rANS records: no centre term
        y = y + xr.sum(dim=-1, keepdim=True).to(dtype) * center_v
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, samples.shape[0])
