"""Make vc checkpoints load wherever transformers loads, without ``import vc_quant``.

Installed with vc_quant, imported at interpreter start by ``vc_quant-autoload.pth`` in
site-packages. It costs one entry on ``sys.meta_path`` and imports nothing: when (and
only when) ``transformers.quantizers.auto`` is imported, the ``vc`` method is added to
transformers' quantizer registry as a lazy entry, and vc_quant itself is imported the
first time a ``vc`` config is actually met (a checkpoint's ``config.json`` or a
``VcQuantizationConfig``). So ``lm_eval --model hf --model_args pretrained=DST``, a
pipeline or any ``from_pretrained`` reads a vc checkpoint like any other.

Nothing here may fail an interpreter start: every error is swallowed (and the loading of
a vc checkpoint then fails loudly in transformers, as without vc_quant). Nothing is
imported at start-up but ``sys`` and ``os`` (already loaded by ``site``; the finder and
loader follow the import protocol without ``importlib.abc``). ``VC_QUANT_AUTOLOAD=0``
turns it off. vc_quant reuses :func:`after_import` for its PEFT integration.
"""

import sys

_METHOD = "vc"
_HOOKS: dict = {}  # module name -> callbacks run right after that module is first imported


def _vc_quant():
    try:
        import vc_quant
    except Exception as exc:  # a broken install: say what is needed
        raise ImportError(
            "this checkpoint was written by vc_quant (quant_method 'vc'), which failed to import: "
            f"{exc}. Install or repair it: pip install vc_quant"
        ) from exc
    return vc_quant


class _LazyVcConfig:
    """Stands in for VcQuantizationConfig until a vc config is met."""

    @classmethod
    def from_dict(cls, config_dict, return_unused_kwargs=False, **kwargs):
        return _vc_quant().VcQuantizationConfig.from_dict(config_dict, return_unused_kwargs, **kwargs)


class _LazyVcQuantizer:
    """Stands in for VcHfQuantizer (by then vc_quant is imported and the real class registered)."""

    def __new__(cls, quantization_config, **kwargs):
        return _vc_quant().hf.VcHfQuantizer(quantization_config, **kwargs)


def _register_lazy(module) -> None:
    module.AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(_METHOD, _LazyVcConfig)
    module.AUTO_QUANTIZER_MAPPING.setdefault(_METHOD, _LazyVcQuantizer)


class _Loader:
    """Runs the real loader, then the callbacks registered for the module it filled."""

    def __init__(self, loader, name) -> None:
        self.loader, self.name = loader, name

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        self.loader.exec_module(module)
        for callback in _HOOKS.pop(self.name, ()):
            try:  # noqa: SIM105 — no contextlib: it costs start-up time
                callback(module)
            except Exception:  # never break the import it follows
                pass


class _Finder:
    """A meta path finder for the hooked module names; every other import passes straight through."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _HOOKS:
            return None
        for finder in sys.meta_path:  # the real spec, from the other finders
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _Loader(spec.loader, fullname)
                return spec
        return None


def after_import(name: str, callback) -> None:
    """Run ``callback(module)`` once ``name`` is imported (at once if it already is)."""
    if name in sys.modules:
        callback(sys.modules[name])
        return
    _HOOKS.setdefault(name, []).append(callback)
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def install() -> None:
    import os  # already imported by site: free

    if os.environ.get("VC_QUANT_AUTOLOAD", "1") != "0":  # "0": opt out (how tests simulate an absent vc_quant)
        after_import("transformers.quantizers.auto", _register_lazy)


try:  # noqa: SIM105 — no contextlib: it costs start-up time
    install()
except Exception:  # an interpreter start must never fail because of us
    pass
