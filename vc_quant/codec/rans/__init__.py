"""The rANS family: the dedicated tensor codec (``codec="rans"``; the paper's proposed "T.265").

After the shared seeded rotation the values of a weight row are close to i.i.d. Gaussian: a
video codec's intra prediction and DCT find little left, and its 8-bit pixel map and serial
CABAC only cost. This family keeps what matters and does it directly:

* :mod:`~vc_quant.codec.rans.quantizer` — rate–distortion quantization on one step per tensor:
  dependent (trellis-coded) quantization or scalar RDOQ, and the rate control that hits a
  budget by computation (rates from the frequency tables, no trial encodes);
* :mod:`~vc_quant.codec.rans.tables` — static frequency tables, costs, exact rates;
* :mod:`~vc_quant.codec.rans.coder` — interleaved rANS (lanes in segments, one word stream
  per segment); :mod:`~vc_quant.codec.rans.bitstream` — the stream format (docs/rans_format.md);
* :mod:`~vc_quant.codec.rans.native` — the C kernels (``_native.c``: rotation, quantizers,
  coder) loaded with ctypes; :mod:`~vc_quant.codec.rans.reference` — the NumPy reference
  decoder; :mod:`~vc_quant.codec.rans.triton_decode` — the GPU decoder, bit-identical;
* :mod:`~vc_quant.codec.rans.encode` / :mod:`~vc_quant.codec.rans.decode` — a rotated matrix ↔
  a record.
"""
