"""The tensor codec: tensors ↔ intra-coded video bitstreams (independent of transformers)."""

from vc_quant.codec.tensor_codec import CodecOptions, EncodedTensor, decode_tensor, encode_tensor

__all__ = ["CodecOptions", "EncodedTensor", "decode_tensor", "encode_tensor"]
