"""Exception types raised by vc_quant.

Every error derives from :class:`VcQuantError` and also from the built-in
exception a caller would naturally catch (``ValueError`` for bad input,
``RuntimeError`` for codec failures, ``ImportError`` for missing optional
libraries), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class VcQuantError(Exception):
    """Base class of every vc_quant error."""


class VcConfigError(VcQuantError, ValueError):
    """An option or configuration value is invalid; the message names it."""


class VcInputError(VcQuantError, ValueError):
    """A tensor handed to the codec cannot be encoded (NaN/Inf, empty, bad dtype)."""


class VcCorruptDataError(VcQuantError, ValueError):
    """A stored bitstream or its metadata failed an integrity check."""


class VcCodecError(VcQuantError, RuntimeError):
    """The underlying video encoder or decoder failed."""


class VcBackendUnavailableError(VcQuantError, ImportError):
    """A codec backend cannot run here (library, driver or hardware missing)."""
