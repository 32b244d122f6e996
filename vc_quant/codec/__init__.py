"""The tensor codec (independent of transformers): two families behind one entry point.

* :mod:`~vc_quant.codec.video` — intra-coded video (H.265, AV1, H.264): 8-bit pixels, 4:2:0
  frames, FFmpeg/dav1d on CPUs and NVDEC on every NVIDIA GPU;
* :mod:`~vc_quant.codec.rans` — the dedicated tensor codec: trellis-coded quantization and
  interleaved rANS, native CPU kernels and a Triton GPU decoder.

Shared by both: :mod:`~vc_quant.codec.transform` (the seeded rotation),
:mod:`~vc_quant.codec.record` (:class:`EncodedTensor`, checksum, integrity checks),
:mod:`~vc_quant.codec.ratecontrol` (rate search, :class:`~vc_quant.codec.ratecontrol.StepPredictor`),
:mod:`~vc_quant.codec.options` (:class:`CodecOptions`, the bits range) and the entry points
:func:`encode_tensor` / :func:`decode_tensor` / :func:`decode_samples` / :class:`DecodePool`.
"""

from vc_quant.codec.decode import DecodePool, decode_samples, decode_tensor
from vc_quant.codec.encode import encode_tensor
from vc_quant.codec.options import BITS_RANGE, CodecOptions, check_bits, max_rate
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
    "max_rate",
]
