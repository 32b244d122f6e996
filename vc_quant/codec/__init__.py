"""The tensor codec: tensors ↔ intra-coded video bitstreams (independent of transformers).

* :mod:`~vc_quant.codec.options` — :class:`CodecOptions` (every default, declared once) and the bits range;
* :mod:`~vc_quant.codec.record` — :class:`EncodedTensor`, its checksum and integrity checks;
* :mod:`~vc_quant.codec.encode` — :func:`encode_tensor` (rate control to a fractional budget);
* :mod:`~vc_quant.codec.decode` — :func:`decode_tensor` / :func:`decode_samples` / :class:`DecodePool`
  (CPU or NVDEC, with the fallback reason);
* :mod:`~vc_quant.codec.transform`, :mod:`~vc_quant.codec.frames`, :mod:`~vc_quant.codec.ratecontrol`,
  :mod:`~vc_quant.codec.backends` — the pieces.
"""

from vc_quant.codec.decode import DecodePool, decode_samples, decode_tensor
from vc_quant.codec.encode import encode_tensor
from vc_quant.codec.options import BITS_RANGE, CodecOptions, check_bits
from vc_quant.codec.record import FORMAT_VERSION, EncodedTensor

__all__ = [
    "BITS_RANGE",
    "FORMAT_VERSION",
    "CodecOptions",
    "DecodePool",
    "EncodedTensor",
    "check_bits",
    "decode_samples",
    "decode_tensor",
    "encode_tensor",
]
