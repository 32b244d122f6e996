"""VcHfQuantizer: the transformers side of vc_quant (quantize on load, save, load a saved checkpoint).

Quantized linears become :class:`~vc_quant.nn.VcLinear` modules before any weight is
loaded (on the meta device), in the residency the config asks for. Decoding itself —
backend choice, worker pools, NVDEC fallback — is :class:`~vc_quant.codec.DecodePool`'s;
this module keeps the transformers concerns: which modules, which files, what is saved.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from tqdm.auto import tqdm
from transformers.quantizers.base import HfQuantizer
from transformers.quantizers.quantizers_utils import get_module_from_name

from vc_quant import format as fmt
from vc_quant.allocation import calibration_sequences, plan_bits
from vc_quant.checkpoint import Checkpoint
from vc_quant.codec import DecodePool, encode_tensor
from vc_quant.codec.decode import choose_backend
from vc_quant.codec.video.backends.nvcodec import nvdec_status
from vc_quant.config import VcQuantizationConfig
from vc_quant.errors import VcConfigError, VcCorruptDataError
from vc_quant.hf.ops import VcDeserialize, VcQuantize
from vc_quant.hf.saving import install_model_hooks, reencode_options, uninstall_model_hooks
from vc_quant.nn import BitstreamWindow, CheckpointRecord, InMemoryRecord, VcLinear
from vc_quant.nn.linear import fingerprint

logger = logging.getLogger(__name__)


@dataclass
class QuantizationReport:
    """What a load did: tensors, values, all-in bits, residency and timings."""

    tensors: int = 0
    values: int = 0
    stored_bytes: int = 0
    seconds: float = 0.0
    resident: str = "dense"
    decode_backend: str = "cpu"
    decode_fallback_reason: str | None = None
    per_tensor: dict[str, dict] = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.stored_bytes / max(self.values, 1)

    def add(self, name: str, module: VcLinear) -> None:
        numel = module.in_features * module.out_features
        self.tensors += 1
        self.values += numel
        self.stored_bytes += module.source.nbytes
        self.per_tensor[name] = {"shape": [module.out_features, module.in_features],
                                 "bpw": 8.0 * module.source.nbytes / numel, "qp": module.meta.get("qp")}  # fmt: skip


def vc_linears(model: torch.nn.Module):
    """``(module_name, VcLinear)`` for every compressed linear of ``model``."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, VcLinear)]


class VcHfQuantizer(HfQuantizer):
    requires_calibration = False
    quantization_config: VcQuantizationConfig
    # stored entries of a quantized "weight" (companions first: the loader's regex alternation
    # must try them before the bare name); "bias" goes through the same op for its CRC check
    serialized_names: ClassVar[dict[str, list[str]]] = {
        "weight": [f"weight{s}" for s in fmt.COMPANIONS.values()] + ["weight"],
        "bias": ["bias"],
    }

    def __init__(self, quantization_config: VcQuantizationConfig, **kwargs) -> None:
        super().__init__(quantization_config, **kwargs)
        self._pool: ThreadPoolExecutor | None = None
        self._decoder: DecodePool | None = None
        self._jobs: dict[str, Future] = {}
        self._deferred: list[str] = []
        self._sync_decode = False  # set by validate_environment (disk offload)
        self._device_map: dict | None = None
        self._started = 0.0
        self._checkpoint: Checkpoint | None = None
        self._ckpt_keys: dict[str, str] = {}  # model param name -> checkpoint key
        self._plain_crc: dict[str, int] = {}
        self.load_errors: list[Exception] = []  # from the load op, raised once loading ends
        self.modules_to_not_convert: list[str] = []
        self.report = QuantizationReport()

    # --- environment and planning -------------------------------------------------------------
    def validate_environment(self, device_map=None, **kwargs) -> None:
        # called with the user's map, and again with the inferred one for "auto"/"balanced"
        self.quantization_config.post_init()  # loading attributes merged into a saved config: check the result
        self._device_map = device_map if isinstance(device_map, dict) else None
        disk = isinstance(device_map, dict) and "disk" in device_map.values()
        self._sync_decode = disk  # disk offload writes each param as soon as it is loaded
        if not self.pre_quantized:
            self.quantization_config.check_calibration_file()
            if disk:
                raise VcConfigError(
                    "quantizing on load with disk offload is not supported: compress first "
                    "(`vc-quant compress SRC DST`), then load DST with device_map"
                )
        if disk and self.quantization_config.resident != "dense":
            raise VcConfigError(
                f"resident={self.quantization_config.resident!r} with disk offload: offloaded weights are "
                "stored dense; load with VcQuantizationConfig(resident='dense')"
            )
        backend, codec = self.quantization_config.decode_backend, self.quantization_config.codec
        if backend in ("nvdec", "triton"):  # the merged config: the checkpoint's codec, the user's backend
            from vc_quant.codec.decode import GPU_BACKEND

            family = "rans" if codec == "rans" else "video"
            if GPU_BACKEND[family] != backend:
                raise VcConfigError(f"decode_backend={backend!r} does not decode codec={codec!r}; its GPU decoder "
                                    f"is {GPU_BACKEND[family]!r} (or use 'auto' / 'cpu')")  # fmt: skip
        if backend == "nvdec":
            status = nvdec_status(codec)
            if not status:
                raise VcConfigError(f"decode_backend='nvdec' but NVDEC cannot run here: {status.reason}")

    def update_dtype(self, dtype):
        return dtype

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs) -> None:
        self._started = time.perf_counter()
        resident = self.quantization_config.resident
        if self.pre_quantized:
            targets = self._read_checkpoint(model, checkpoint_files)
        else:
            self.modules_to_not_convert = self.get_modules_to_not_convert(
                model, self.quantization_config.skip_list(), getattr(model, "_keep_in_fp32_modules", None),
                add_default_skips=True,
            )  # fmt: skip
            targets = {name: 0 for name, m in model.named_modules() if self._wants(name, m)}
            if not targets:
                kinds = sorted({type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__
                                or "Conv1D" in type(m).__name__})  # fmt: skip
                raise VcConfigError(
                    "vc_quant found no torch.nn.Linear layer to quantize in this model (layer types: "
                    f"{kinds or 'none'}); GPT-2-style Conv1D layers are not supported, and modules_to_not_convert"
                    "/overrides/min_numel may exclude everything"
                )
            resident = "dense"  # float placeholders: the weights arrive in full precision
        for name, nbytes in targets.items():
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, VcLinear.like(getattr(parent, child), resident, bitstream_bytes=nbytes))

    def _wants(self, module_name: str, module: torch.nn.Module) -> bool:
        """Quantize on load: a linear layer not skipped, not overridden to 0 bits, large enough."""
        if not isinstance(module, torch.nn.Linear) or self._skipped(module_name):
            return False
        if self.quantization_config.bits_for(module_name) == 0:
            return False
        return module.weight.numel() >= self.quantization_config.min_numel

    def _skipped(self, module_name: str) -> bool:
        return any(
            module_name == skip or module_name.endswith("." + skip) or f".{skip}." in f".{module_name}."
            for skip in self.modules_to_not_convert
        )

    def _read_checkpoint(self, model, checkpoint_files) -> dict[str, int]:
        """Headers of the saved checkpoint: its records, their sizes, save identity and plain CRCs."""
        if not checkpoint_files:
            raise VcConfigError("a vc_quant checkpoint must be loaded from safetensors files")
        ckpt = Checkpoint([Path(f) for f in checkpoint_files])
        if ckpt.problems:
            raise VcCorruptDataError(f"{ckpt.files[0].parent}: {ckpt.problems[0]}")
        ckpt.check_save(self.quantization_config.save_id)
        self._checkpoint, self._plain_crc = ckpt, ckpt.plain_crc()
        params = {name for name, _ in model.named_parameters()}
        targets: dict[str, int] = {}
        for key in ckpt.quantized_keys():
            param = _resolve(key, params, model.base_model_prefix)
            if param is None or not param.endswith(".weight"):
                raise VcCorruptDataError(f"{key}: the checkpoint holds a record for a parameter this model lacks")
            module_name = param.removesuffix(".weight")
            if not isinstance(model.get_submodule(module_name), torch.nn.Linear):
                raise VcCorruptDataError(f"{key}: a record for {module_name}, which is not a linear layer here")
            self._ckpt_keys[param] = key
            targets[module_name] = ckpt.entries[key].shape[0]
        self._ckpt_keys.update({_resolve(k, params, model.base_model_prefix) or k: k for k in ckpt.plain_keys()})
        return targets

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module, tensor_name = get_module_from_name(model, param_name)
        return isinstance(module, VcLinear) and tensor_name == "weight"

    def param_element_size(self, model, param_name: str, param: torch.Tensor) -> float:
        """Bytes per element for device-map planning: what the weight will take once resident."""
        if not self.pre_quantized and self.param_needs_quantization(model, param_name):
            resident = self.quantization_config.resident
            return {"int8": 1.0, "bitstream": self.quantization_config.bits / 8}.get(resident, param.element_size())
        return param.element_size()  # pre-quantized placeholders already have the resident dtype and size

    # --- quantize on load -------------------------------------------------------------------------
    def get_quantize_ops(self):
        return VcQuantize(self)

    def submit_encode(
        self, model, param_name: str, tensor: torch.Tensor, bits: float | None = None,
        col_scale: torch.Tensor | None = None,
    ) -> None:  # fmt: skip
        """Queue one encode; the worker pool keeps all cores busy while loading goes on.

        With the Fisher pass (model-wide allocation or column scales) the encode waits until
        the whole model is loaded (the pass needs it); tensors with an override go at once.
        """
        config = self.quantization_config
        module_name = param_name.rpartition(".")[0]
        if bits is None:
            if config.uses_fisher() and config.override_for(module_name) is None:
                self._deferred.append(param_name)
                return
            bits = config.bits_for(module_name)
        self._jobs[param_name] = self._executor().submit(
            encode_tensor, tensor.detach().to("cpu"), bits, name=param_name, col_scale=col_scale,
            **config.codec_kwargs(),
        )  # fmt: skip

    def _finish_encodes(self, model) -> None:
        resident = self.quantization_config.resident
        try:
            for param_name, job in tqdm(self._jobs.items(), desc="vc_quant: encoding", unit="tensor"):
                enc = job.result()
                placeholder = model.get_submodule(param_name.removesuffix(".weight"))
                device = placeholder.weight.device
                if resident != "dense":  # swap in a module of the wanted residency (frees the float weight)
                    module = VcLinear.like(placeholder, resident)
                    module.bias = placeholder.bias
                    _replace(model, param_name.removesuffix(".weight"), module)
                else:
                    module = placeholder
                module.set_resident_weight(enc, InMemoryRecord(enc), device=device)
        finally:
            self._shutdown()

    # --- pre-quantized load -------------------------------------------------------------------------
    def check_plain(self, param_name: str, stored: torch.Tensor) -> None:
        """A plain tensor's CRC32 against the shard metadata (old checkpoints have none)."""
        expected = self._plain_crc.get(self._ckpt_keys.get(param_name, param_name))
        if expected is not None and fmt.tensor_crc32(stored) != expected:
            raise VcCorruptDataError(f"{param_name}: checksum mismatch (the stored tensor is corrupted)")

    def load_record(self, module: VcLinear, param_name: str, entries: dict[str, torch.Tensor]) -> torch.Tensor:
        """The tensor ``module`` keeps for ``param_name``; verification and decoding run in the pool."""
        key = self._ckpt_keys.get(param_name, param_name)
        enc = fmt.from_state_dict(param_name, entries, verify=False)  # verified by the decode job
        if enc.meta.get("shape") != [module.out_features, module.in_features]:
            raise VcCorruptDataError(
                f"{param_name}: stored shape {enc.meta.get('shape')} does not match the model's "
                f"{[module.out_features, module.in_features]}"
            )
        files = self._checkpoint.record_files(key)
        source = CheckpointRecord(key, files, enc.meta.get("crc32"), self._checkpoint.record_nbytes(key))
        device = self.target_device(param_name)
        module.attach(enc, source)
        if self._decoder is None:
            self._decoder = DecodePool(self.quantization_config.decode_backend)
        if module.resident == "bitstream":
            out = enc.bitstream
            job = self._executor().submit(enc.verify, param_name, key)
        else:
            samples = module.resident == "int8"
            shape = (module.out_features, module.in_features)
            out = torch.empty(shape, dtype=torch.int8 if samples else module.compute_dtype, device=device)
            job = self._decoder.submit(enc, out, samples=samples, name=param_name, expect_name=key)
        if self._sync_decode:
            job.result()
        self._jobs[param_name] = job
        return out

    def _finish_decodes(self, model) -> None:
        try:
            if self.load_errors:
                raise self.load_errors[0]
            for job in self._jobs.values():
                job.result()  # re-raises a verify/decode error, naming the tensor
        finally:
            self._shutdown()
        modules = vc_linears(model)
        for _, module in modules:
            if module.weight.device.type != "meta":  # offloaded to disk: never edited in place
                module.fingerprint = fingerprint(module.weight)
        bitstream = [m for _, m in modules if m.resident == "bitstream"]
        if bitstream:
            window = BitstreamWindow(bitstream, self.quantization_config.prefetch,
                                     self.quantization_config.decode_backend)  # fmt: skip
            for module in bitstream:
                module.window = window
            window.hook(model)
            model.vc_bitstream_window = window

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="vc-quant")
        return self._pool

    def _shutdown(self) -> None:
        if self._decoder is not None:
            self.report.decode_backend = self._decoder.backend_used
            self.report.decode_fallback_reason = self._decoder.fallback_reason
            self._decoder.shutdown(cancel=True)  # after an error: skip the rest
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool, self._decoder, self._jobs = None, None, {}

    def get_load_operations(self) -> dict:
        return {"deserialize": VcDeserialize}

    def get_weight_conversions(self):
        # force_cpu: the loader leaves our entries on the host. Bitstreams are parsed there
        # anyway (FFmpeg and NVDEC read host memory) and load_record places the resident
        # tensor on the parameter's device itself (target_device), so no bitstream makes a
        # round trip through GPU memory; the loader then moves plain parameters to their device.
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

    # --- after loading ------------------------------------------------------------------------------
    def _process_model_after_weight_loading(self, model, **kwargs):
        config = self.quantization_config
        if not self.pre_quantized:
            if self._deferred:
                extra = {}
                if config.calibration:
                    extra["sequences"] = calibration_sequences(model, config.calibration)
                plan = plan_bits(model, self._deferred, config.bits, config.allocation, config.scaling,
                                 r_max=config.max_rate(), **extra)  # fmt: skip
                for name, item in plan.items():
                    self.submit_encode(model, name, model.get_parameter(name), bits=item.bits,
                                       col_scale=item.col_scale)  # fmt: skip
                self._deferred = []
            self._finish_encodes(model)
        else:
            self._finish_decodes(model)
            # our converter has no reverse op: drop it, or a later save_pretrained fails
            model._weight_conversions = [
                c for c in getattr(model, "_weight_conversions", []) if not _is_vc_converter(c)
            ]
        report = QuantizationReport(resident=config.resident, decode_backend=self.report.decode_backend,
                                    decode_fallback_reason=self.report.decode_fallback_reason)  # fmt: skip
        if not self.pre_quantized:
            report.decode_backend = "cpu"
        window = getattr(model, "vc_bitstream_window", None)
        if window is not None and report.decode_backend == "none":  # decoded at every forward, not on load
            first = window.modules[0]
            backend, reason = choose_backend(first.weight.device, first.meta["codec"], config.decode_backend)
            report.decode_backend, report.decode_fallback_reason = f"{backend} (at every forward)", reason
        for name, module in vc_linears(model):
            report.add(name + ".weight", module)
        report.seconds = time.perf_counter() - self._started
        self.report = report
        model.vc_quant_report = report
        install_model_hooks(model)
        verb = "decoded" if self.pre_quantized else "quantized"
        logger.info(
            "vc_quant: %s %d tensors (%.1f M values) at %.3f bits/weight all-in in %.1f s (resident: %s; decode: %s%s)",
            verb, report.tensors, report.values / 1e6, report.bits_per_weight, report.seconds, report.resident,
            report.decode_backend,
            f", fallback: {report.decode_fallback_reason}" if report.decode_fallback_reason else "",
        )  # fmt: skip
        return model

    # --- saving -------------------------------------------------------------------------------------
    def get_state_dict_and_metadata(self, model):
        """What ``save_pretrained`` writes: records for compressed weights, CRC32s and a save id.

        Unchanged weights reuse their stored bitstreams byte for byte; weights changed since
        they were loaded (an edit, a merged adapter, a training step) are re-encoded at their
        recorded rate — never replaced by their stale bitstreams.
        """
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        state_dict = model.state_dict()
        modules = vc_linears(model)
        changed = [(name, m) for name, m in modules if m.is_modified()]
        if changed:
            self._reencode(changed)
        for name, module in modules:
            key = name + ".weight"
            state_dict.pop(key, None)
            state_dict.update(fmt.to_state_dict(key, module.record()))
        state_dict = remove_tied_weights_from_state_dict(state_dict, model)
        plain = {k: fmt.tensor_crc32(t) for k, t in state_dict.items()
                 if not fmt.is_companion(k) and k + fmt.META_SUFFIX not in state_dict}  # fmt: skip
        save_id = fmt.new_save_id()
        self.quantization_config.save_id = save_id  # config.json is written after this call
        return state_dict, fmt.shard_metadata(save_id, plain)

    def _reencode(self, changed: list[tuple[str, VcLinear]]) -> None:
        config = self.quantization_config
        jobs = {}
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="vc-reencode") as pool:
            for name, module in changed:
                old = module.source.load() if module.source is not None else None
                bits, options = reencode_options(config, old, module)
                logger.info("vc_quant: %s.weight changed since it was loaded; re-encoding at %.3f bits/weight", name,
                            bits)  # fmt: skip
                weight = module.dequantize_weight(torch.float32).detach().cpu()
                jobs[name] = pool.submit(encode_tensor, weight.to(module.compute_dtype), bits, name=name + ".weight",
                                         **options)  # fmt: skip
            for name, module in tqdm(changed, desc="vc_quant: re-encoding changed weights", unit="tensor"):
                enc = jobs[name].result()
                module.attach(enc, InMemoryRecord(enc))
                if module.resident == "bitstream":
                    module.weight = enc.bitstream
                module.fingerprint = fingerprint(module.weight)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        # adapters (LoRA) train in full precision on top of the compressed base, as with QLoRA
        return True

    def _dequantize(self, model, dtype=None):
        """Replace every VcLinear by a plain ``nn.Linear`` holding the decoded weight."""
        for name, module in vc_linears(model):
            dense = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                    device=module.weight.device, dtype=dtype or module.compute_dtype)  # fmt: skip
            with torch.no_grad():
                dense.weight.copy_(module.dequantize_weight(dense.weight.dtype))
                if module.bias is not None:
                    dense.bias.copy_(module.bias)
            _replace(model, name, dense)
        window = getattr(model, "vc_bitstream_window", None)
        if window is not None:
            window.close()
            del model.vc_bitstream_window
        uninstall_model_hooks(model)
        return model


def _replace(model, module_name: str, module: torch.nn.Module) -> None:
    parent_name, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _resolve(key: str, params: set[str], prefix: str) -> str | None:
    """The model parameter a checkpoint key loads into (transformers adds or drops the base prefix)."""
    for candidate in (key, f"{prefix}.{key}", key.removeprefix(prefix + ".")):
        if candidate in params:
            return candidate
    return None


def _is_vc_converter(conversion) -> bool:
    return any(isinstance(op, VcDeserialize) for op in getattr(conversion, "operations", ()))
