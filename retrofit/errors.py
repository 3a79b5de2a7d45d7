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
    """torch.fx could not trace the model.

    Where tracing broke is kept as fields, so callers do not parse the message: ``model``
    (class of the module being traced), ``module`` (path of the innermost module whose
    forward failed, relative to it; ``""`` for its own forward), ``module_class``,
    ``file``, ``line``, ``code`` (the source line) and ``reason`` (torch.fx's message).
    """

    def __init__(self, message: str, *, model: str | None = None, module: str | None = None,
                 module_class: str | None = None, file: str | None = None, line: int | None = None,
                 code: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.model, self.module, self.module_class = model, module, module_class
        self.file, self.line, self.code, self.reason = file, line, code, reason

    @property
    def where(self) -> str:
        """Where tracing broke, in one phrase: "module 'layer3.1' (NanGuard) at file:line `code`"."""
        if self.model is None:
            return str(self).split(". ", 1)[0]
        what = f"module {self.module!r} ({self.module_class})" if self.module else \
            f"the top-level forward of {self.module_class}"
        at = f" at {self.file}:{self.line}" if self.file else ""
        code = f" `{self.code}`" if self.code else ""
        return f"cannot trace {self.model}: {what}{at}{code}: {self.reason}"


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
