"""The exceptions retrofit raises on bad user input or models it cannot handle.

Every error is a :class:`RetrofitError` and also a built-in ``ValueError`` or
``RuntimeError``, so callers that already catch those keep working. Messages say what
failed, where (file, rule, node or module), what is valid and what to try.
"""

from __future__ import annotations

__all__ = [
    "first_line",
    "RetrofitError",
    "RuleError",
    "AttentionError",
    "TraceError",
    "SiteError",
    "ModelLoadError",
    "OptionError",
    "SaveError",
    "DataError",
    "UntrustedCodeError",
]


class RetrofitError(Exception):
    """Base class of every error retrofit raises on purpose."""


class RuleError(RetrofitError, ValueError):
    """A rule file or rule set is invalid (syntax, unknown key, wrong type, ...)."""


class AttentionError(RetrofitError, ValueError):
    """An attention type is unknown, or its arguments are invalid."""


class TraceError(RetrofitError, RuntimeError):
    """torch.fx could not trace the model."""


class SiteError(RetrofitError, ValueError):
    """A site cannot take the requested attention (wrong rank, shape, ...)."""


class ModelLoadError(RetrofitError, ValueError):
    """A model could not be built or loaded from what the user named."""


class UntrustedCodeError(ModelLoadError):
    """A file asks to run code (a model file, an attention or leaf-module class to import)
    and the caller did not allow it (``trust_code=True``, ``--trust-code``)."""


class OptionError(RetrofitError, ValueError):
    """An option value is invalid (input size, gate, ...)."""


class SaveError(RetrofitError, RuntimeError):
    """A model could not be written (unwritable path, existing file without force, ...)."""


class DataError(RetrofitError, ValueError):
    """A dataset is missing or its files are malformed (the message says how to get it)."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
