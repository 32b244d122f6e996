"""Weight-conversion ops that transformers' loader calls for every parameter.

* :class:`VcQuantize` — quantize on load: hands the tensor to the quantizer's encoder
  pool and returns it unchanged; the quantizer turns each module into its resident
  form once loading is done (encodes run in parallel, without a second copy of the model).
* :class:`VcDeserialize` — pre-quantized load: hands a record's four stored entries to
  the quantizer, which returns the tensor the module keeps (dense weights, int8 samples
  or the bitstream) and verifies + decodes it in its worker pool. Plain ``weight`` and
  ``bias`` tensors have their CRC32 checked and are cast to the parameter's dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers.core_model_loading import ConversionOps

from vc_quant import format as fmt

if TYPE_CHECKING:
    from vc_quant.hf.quantizer import VcHfQuantizer


def _first(value):
    return value[0] if isinstance(value, list) else value


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
    """Never raises: transformers' loader would turn an error into a generic "issues during conversion"
    and go on with an uninitialised parameter. The quantizer keeps the first error and raises it,
    as it is, once loading ends (:meth:`VcHfQuantizer.raise_load_errors`)."""

    def convert(self, input_dict: dict, model=None, full_layer_name: str | None = None, **kwargs) -> dict:
        tensors = {pattern: _first(v) for pattern, v in input_dict.items()}
        module_name, _, param = full_layer_name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        target = getattr(module, param)
        stored = tensors[param]
        try:
            if param + fmt.META_SUFFIX not in tensors:  # a plain parameter
                self.hf_quantizer.check_plain(full_layer_name, stored)
                if stored.is_floating_point() and stored.dtype != target.dtype:
                    stored = stored.to(target.dtype)
                return {full_layer_name: stored}
            # the loader left them on the host (force_cpu): FFmpeg and NVDEC read host memory
            entries = {full_layer_name + name.removeprefix(param): t.cpu() for name, t in tensors.items()}
            return {full_layer_name: self.hf_quantizer.load_record(module, full_layer_name, entries)}
        except Exception as exc:  # kept, re-raised after loading (see the class docstring)
            self.hf_quantizer.load_errors.append(exc)
            return {full_layer_name: torch.zeros(target.shape, dtype=target.dtype)}
