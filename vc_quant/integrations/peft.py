"""PEFT LoRA on vc models: adapters train in full precision on the compressed base (as QLoRA does).

PEFT wraps a :class:`~vc_quant.nn.VcLinear` like any ``nn.Linear`` (forward and training
work in every residency). Merging needs the base weight dense: in the int8 and bitstream
modes, :class:`VcLoraLinear` decodes it first (``VcLinear.to_dense``), then merges as PEFT
does; ``save_pretrained`` then re-encodes the merged weights at their stored rates.

PEFT has no public registry for out-of-tree layer types (``LoraConfig._register_custom_module``
is marked experimental and needs every user to call it), so :func:`install` wraps
``LoraModel._create_new_module`` once to choose :class:`VcLoraLinear` for compressed
linears; everything else goes to PEFT unchanged. vc_quant installs it when it is imported
with PEFT present, or when PEFT's LoRA module is imported later.
"""

from __future__ import annotations

_PEFT_MODULE = "peft.tuners.lora.model"


def install() -> bool:
    """Route compressed linears to :class:`VcLoraLinear` (idempotent); False if PEFT is absent."""
    try:
        from peft.tuners.lora import layer as lora_layer
        from peft.tuners.lora import model as lora_model
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    original = lora_model.LoraModel._create_new_module
    if getattr(original, "_vc_quant", False):
        return True

    from vc_quant.nn.linear import VcLinear

    class VcLoraLinear(lora_layer.Linear):
        """PEFT's LoRA linear over a VcLinear: merging decodes a compressed base weight first."""

        def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
            self.get_base_layer().to_dense()
            super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def create_new_module(lora_config, adapter_name, target, **kwargs):
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, VcLinear) and not lora_config.fan_in_fan_out:
            return VcLoraLinear(target, adapter_name, config=lora_config, **kwargs)
        return original(lora_config, adapter_name, target, **kwargs)

    create_new_module._vc_quant = True
    lora_model.LoraModel._create_new_module = staticmethod(create_new_module)
    globals()["VcLoraLinear"] = VcLoraLinear
    return True


def install_when_imported() -> None:
    """Install now if PEFT's LoRA module is loaded, else right after it is first imported."""
    from _vc_quant_autoload import after_import

    after_import(_PEFT_MODULE, lambda module: install())
