"""VcHfQuantizer: the transformers side of vc_quant (quantize on load, save, decode on load)."""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from tqdm.auto import tqdm
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name

from vc_quant import format as fmt
from vc_quant.allocation import calibration_sequences, plan_bits
from vc_quant.codec import EncodedTensor, decode_tensor, encode_tensor
from vc_quant.codec.backends.nvcodec import NVDEC_CODECS, NvdecDecoderPool, decode_tensor_nvdec, nvdec_status
from vc_quant.config import VcQuantizationConfig
from vc_quant.errors import VcConfigError
from vc_quant.hf.ops import VcDeserialize, VcQuantize

logger = logging.getLogger(__name__)


@dataclass
class QuantizationReport:
    """What a load did: tensors, values, all-in bits and timings."""

    tensors: int = 0
    values: int = 0
    stored_bytes: int = 0
    seconds: float = 0.0
    decode_backend: str = "cpu"
    decode_fallback_reason: str | None = None
    per_tensor: dict[str, dict] = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.stored_bytes / max(self.values, 1)

    def add(self, name: str, enc: EncodedTensor) -> None:
        self.tensors += 1
        self.values += enc.numel
        self.stored_bytes += enc.nbytes
        self.per_tensor[name] = {"shape": list(enc.shape), "bpw": enc.bits_per_value, "qp": enc.meta.get("qp")}


def encoded_params(model: torch.nn.Module):
    """Yield ``(param_key, module, param_name, EncodedTensor)`` for every quantized parameter."""
    for module_name, module in model.named_modules():
        for param, enc in getattr(module, "_vc_encoded", {}).items():
            yield (f"{module_name}.{param}" if module_name else param), module, param, enc


class VcHfQuantizer(HfQuantizer):
    requires_calibration = False
    quantization_config: VcQuantizationConfig
    # the stored entries of a quantized "weight" (companions first: the loader's regex
    # alternation must try them before the bare name)
    serialized_names: ClassVar[dict[str, list[str]]] = {
        "weight": [f"weight{s}" for s in fmt.COMPANIONS.values()] + ["weight"]
    }

    def __init__(self, quantization_config: VcQuantizationConfig, **kwargs) -> None:
        super().__init__(quantization_config, **kwargs)
        self._pool: ThreadPoolExecutor | None = None
        self._nvdec_pool: NvdecDecoderPool | None = None
        self._jobs: dict[str, Future] = {}
        self._deferred: list[str] = []
        self._sync_decode = False  # set by validate_environment (disk offload)
        self._device_map: dict | None = None
        self._started = 0.0
        self.modules_to_not_convert: list[str] = []
        self.report = QuantizationReport()

    # --- environment and planning -------------------------------------------------
    def validate_environment(self, device_map=None, **kwargs) -> None:
        # called with the user's map, and again with the inferred one for "auto"/"balanced"
        self._device_map = device_map if isinstance(device_map, dict) else None
        # disk offload writes each param as soon as it is loaded: decode synchronously then
        self._sync_decode = isinstance(device_map, dict) and "disk" in device_map.values()
        if not self.pre_quantized and isinstance(device_map, dict) and "disk" in device_map.values():
            raise VcConfigError(
                "quantizing on load with disk offload is not supported: compress first "
                "(`vc-quant compress SRC DST`), then load DST with device_map"
            )
        if self.quantization_config.decode_backend == "nvdec":
            if self.quantization_config.codec not in NVDEC_CODECS:
                raise VcConfigError(
                    f"decode_backend='nvdec' but this checkpoint's codec is {self.quantization_config.codec!r}; "
                    f"the NVDEC path decodes {NVDEC_CODECS}: use decode_backend='cpu' or 'auto'"
                )
            status = nvdec_status()
            if not status:
                raise VcConfigError(f"decode_backend='nvdec' but NVDEC cannot run here: {status.reason}")

    def update_dtype(self, dtype):
        return dtype

    def _process_model_before_weight_loading(self, model, **kwargs) -> None:
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model,
            self.quantization_config.skip_list(),
            getattr(model, "_keep_in_fp32_modules", None),
            add_default_skips=True,
        )
        self._started = time.perf_counter()

    def _skipped(self, module_name: str) -> bool:
        return any(
            module_name == skip or module_name.endswith("." + skip) or f".{skip}." in f".{module_name}."
            for skip in self.modules_to_not_convert
        )

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized:
            return False
        module, tensor_name = get_module_from_name(model, param_name)
        if tensor_name != "weight" or not isinstance(module, torch.nn.Linear):
            return False
        module_name = param_name.rpartition(".")[0]
        if self._skipped(module_name) or self.quantization_config.bits_for(module_name) == 0:
            return False
        return module.weight.numel() >= self.quantization_config.min_numel

    # --- quantize on load -------------------------------------------------------------
    def get_quantize_ops(self):
        return VcQuantize(self)

    def submit_encode(self, model, param_name: str, tensor: torch.Tensor, bits: float | None = None) -> None:
        """Queue one encode; the worker pool keeps all cores busy while loading goes on.

        With a model-wide allocation the encode waits until the whole model is
        loaded (the allocation needs it); tensors with an override go at once.
        """
        config = self.quantization_config
        module_name = param_name.rpartition(".")[0]
        if bits is None:
            if config.allocation != "uniform" and config.override_for(module_name) is None:
                self._deferred.append(param_name)
                return
            bits = config.bits_for(module_name)
        self._jobs[param_name] = self._executor("vc-encode").submit(
            encode_tensor, tensor.detach().to("cpu"), bits, name=param_name, **config.codec_kwargs()
        )

    def _finish_encodes(self, model) -> None:
        try:
            for param_name, job in tqdm(self._jobs.items(), desc="vc_quant: encoding", unit="tensor"):
                enc = job.result()
                module_name, _, param = param_name.rpartition(".")
                module = model.get_submodule(module_name)
                current = getattr(module, param)
                dense = self.decode(enc, device=current.device, dtype=current.dtype, name=param_name)
                with torch.no_grad():
                    current.data = dense
                module._vc_encoded = {**getattr(module, "_vc_encoded", {}), param: enc}
        finally:
            self._shutdown()

    # --- decode ----------------------------------------------------------------------------
    def _use_nvdec(self, device: torch.device, codec: str) -> bool:
        """NVDEC for CUDA targets unless the config says cpu; records why not."""
        if device.type != "cuda" or self.quantization_config.decode_backend == "cpu":
            return False
        if codec not in NVDEC_CODECS:
            self.report.decode_fallback_reason = f"the NVDEC path decodes {NVDEC_CODECS} streams, not {codec!r}"
            return False
        status = nvdec_status()
        if not status:
            self.report.decode_fallback_reason = status.reason
        return bool(status)

    def decode(self, enc: EncodedTensor, device, dtype: torch.dtype, name: str = "tensor") -> torch.Tensor:
        """Decode on the configured backend; CPU FFmpeg when NVDEC is not usable."""
        device = torch.device(device)
        if self._use_nvdec(device, enc.meta["codec"]):
            self.report.decode_backend = "nvdec"
            return decode_tensor_nvdec(enc, device=device, dtype=dtype, name=name)
        return decode_tensor(enc, device="cpu", dtype=dtype).to(device)

    def decode_into(self, param_name: str, enc: EncodedTensor, device, dtype: torch.dtype) -> torch.Tensor:
        """Return the buffer that will hold ``param_name``'s decoded weight.

        The decode runs in a worker pool while the loader goes on (CPU: one tensor
        per core; CUDA: one NVDEC session per worker, several engines busy at once);
        :meth:`_process_model_after_weight_loading` waits for it. With disk offload
        it decodes right away.
        """
        device = torch.device(device)
        if self._sync_decode:
            enc.verify(param_name)
            return self.decode(enc, device, dtype, name=param_name)
        out = torch.empty(enc.shape, dtype=dtype, device=device)
        if self._use_nvdec(device, enc.meta["codec"]):
            self.report.decode_backend = "nvdec"
            if self._nvdec_pool is None:
                self._nvdec_pool = NvdecDecoderPool()
            pool = self._nvdec_pool

            def decode() -> None:
                decode_tensor_nvdec(enc, out=out, name=param_name)
        else:
            pool = self._executor("vc-decode")

            def decode() -> None:
                out.copy_(decode_tensor(enc, device="cpu", dtype=dtype, threads=1))

        def job() -> None:
            enc.verify(param_name)  # checksum first: corrupt data is never decoded
            decode()

        self._jobs[param_name] = pool.submit(job)
        return out

    def _executor(self, prefix: str) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix=prefix)
        return self._pool

    def _finish_decodes(self) -> None:
        try:
            for job in self._jobs.values():
                job.result()  # re-raises a decode error, naming the tensor
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        for pool in (self._pool, self._nvdec_pool):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)  # after an error: skip the rest
        self._pool, self._nvdec_pool, self._jobs = None, None, {}

    def get_load_operations(self) -> dict:
        return {"deserialize": VcDeserialize}

    def get_weight_conversions(self):
        # force_cpu: the loader leaves our entries on the host. Bitstreams are parsed
        # there anyway (FFmpeg and NVDEC read host memory), and the op decodes straight
        # to the parameter's device (target_device), so no bitstream makes a round trip
        # through GPU memory; the loader then moves plain parameters to their device.
        conversions = super().get_weight_conversions()
        for conversion in conversions:
            conversion.force_cpu = True
        return conversions

    def target_device(self, param_name: str) -> torch.device:
        """Where ``param_name`` lives after loading, from the (expanded) device map."""
        if not self._device_map:
            return torch.device("cpu")
        from transformers.integrations.accelerate import get_device

        device = get_device(self._device_map, param_name, valid_torch_device=True)
        return torch.device(f"cuda:{device}" if isinstance(device, int) else device)

    # --- after loading -----------------------------------------------------------------
    def _process_model_after_weight_loading(self, model, **kwargs):
        if not self.pre_quantized:
            if self._deferred:
                config = self.quantization_config
                extra = {}
                if config.calibration:
                    extra["sequences"] = calibration_sequences(model, config.calibration)
                plan = plan_bits(model, self._deferred, config.bits, config.allocation, **extra)
                for name, bits in plan.items():
                    self.submit_encode(model, name, model.get_parameter(name), bits=bits)
                self._deferred = []
            self._finish_encodes(model)
        else:
            self._finish_decodes()
            # our converter has no reverse op: drop it, or a later save_pretrained fails
            model._weight_conversions = [
                c for c in getattr(model, "_weight_conversions", []) if not _is_vc_converter(c)
            ]
        report = QuantizationReport(
            decode_backend=self.report.decode_backend, decode_fallback_reason=self.report.decode_fallback_reason
        )
        for key, _, _, enc in encoded_params(model):
            report.add(key, enc)
        report.seconds = time.perf_counter() - self._started
        self.report = report
        model.vc_quant_report = report
        verb = "decoded" if self.pre_quantized else "quantized"
        logger.info(
            "vc_quant: %s %d tensors (%.1f M values) at %.3f bits/weight all-in in %.1f s (decode: %s%s)",
            verb, report.tensors, report.values / 1e6, report.bits_per_weight, report.seconds,
            report.decode_backend,
            f", fallback: {report.decode_fallback_reason}" if report.decode_fallback_reason else "",
        )  # fmt: skip
        return model

    # --- saving -------------------------------------------------------------------------------
    def get_state_dict_and_metadata(self, model):
        state_dict = model.state_dict()
        for key, _, _, enc in encoded_params(model):
            state_dict.update(fmt.to_state_dict(key, enc))  # replaces the dense weight: no re-encode
        return state_dict, {"vc_quant_format": str(fmt.FORMAT_VERSION)}

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _is_vc_converter(conversion) -> bool:
    return any(isinstance(op, VcDeserialize) for op in getattr(conversion, "operations", ()))
