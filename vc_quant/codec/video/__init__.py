"""The video family: rotated values → 8-bit pixels → intra-coded video (H.265, AV1, H.264).

* :mod:`~vc_quant.codec.video.pixels` — the affine map onto 8-bit pixels;
* :mod:`~vc_quant.codec.video.frames` — tiling and 4:2:0 plane packing of matrices into frames;
* :mod:`~vc_quant.codec.video.backends` — one module per video backend (PyAV/FFmpeg on the CPU,
  PyNvVideoCodec/NVDEC on NVIDIA GPUs) behind a small registry;
* :mod:`~vc_quant.codec.video.encode` / :mod:`~vc_quant.codec.video.decode` — a rotated matrix ↔
  a record, with the QP/amplitude rate control.

Every NVIDIA GPU carries hardware decoders for these streams; that is what the family is for.
"""
