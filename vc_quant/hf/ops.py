"""Weight-conversion ops that transformers' loader calls for every parameter.

* :class:`VcQuantize` — quantize on load: hands the tensor to the quantizer's
  encoder pool and returns it unchanged; the quantizer swaps in the decoded
  weights once loading is done (so encodes run in parallel, one tensor at a time
  per worker, without a second copy of the model).
* :class:`VcDeserialize` — pre-quantized load: rebuilds the record from its four
  stored entries, verifies it and has it decoded to the parameter's dtype/device
  (in the quantizer's worker pool, so tensors decode side by side).
  Parameters without vc companions (norms, embeddings, skipped linears) pass
  through with a cast to the parameter's dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from transformers.core_model_loading import ConversionOps

from vc_quant import format as fmt

if TYPE_CHECKING:
    from vc_quant.hf.quantizer import VcHfQuantizer


def _first(value):
    return value[0] if isinstance(value, list) else value


def _split_name(full_name: str) -> tuple[str, str]:
    module_name, _, param = full_name.rpartition(".")
    return module_name, param


class _QuantizerOp(ConversionOps):
    def __init__(self, hf_quantizer: VcHfQuantizer) -> None:
        self.hf_quantizer = hf_quantizer

    def __deepcopy__(self, memo) -> _QuantizerOp:
        # the loader deep-copies converters per parameter; all copies must report to
        # the one quantizer that waits for the workers (and copying it is slow)
        return type(self)(self.hf_quantizer)


class VcQuantize(_QuantizerOp):
    def convert(self, input_dict: dict, model=None, full_layer_name: str | None = None, **kwargs) -> dict:
        key, value = next(iter(input_dict.items()))
        tensor = _first(value)
        self.hf_quantizer.submit_encode(model, full_layer_name or key, tensor)
        return {key: tensor}


class VcDeserialize(_QuantizerOp):
    def convert(self, input_dict: dict, model=None, full_layer_name: str | None = None, **kwargs) -> dict:
        tensors = {pattern: _first(v) for pattern, v in input_dict.items()}
        module_name, param = _split_name(full_layer_name)
        module = model.get_submodule(module_name) if module_name else model
        target = getattr(module, param)
        stored = tensors[param]
        if param + fmt.META_SUFFIX not in tensors:  # a plain parameter
            if stored.is_floating_point() and stored.dtype != target.dtype:
                stored = stored.to(target.dtype)
            return {full_layer_name: stored}
        # the loader left them on the host (force_cpu): FFmpeg and NVDEC read host memory
        renamed = {full_layer_name + name.removeprefix(param): t.cpu() for name, t in tensors.items()}
        enc = fmt.from_state_dict(full_layer_name, renamed, verify=False)  # checksummed by the decode job
        if tuple(enc.shape) != tuple(target.shape):
            raise ValueError(
                f"{full_layer_name}: stored shape {tuple(enc.shape)} does not match the model's {tuple(target.shape)}"
            )
        module._vc_encoded = {**getattr(module, "_vc_encoded", {}), param: enc}
        # decoded by the quantizer's worker pool into this buffer; waited for after loading
        device = self.hf_quantizer.target_device(full_layer_name)
        dense = self.hf_quantizer.decode_into(full_layer_name, enc, device=device, dtype=target.dtype)
        return {full_layer_name: dense}
