"""Plain weights into a model: a user's checkpoint into the model before it is retrofitted
(``--checkpoint``), and the one strict state-dict load that :func:`retrofit.load` uses too.

(:mod:`retrofit.saving` reads and writes the files retrofit itself makes; :mod:`retrofit.recipe`
is how a model is built.)
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .errors import ModelLoadError, first_line
from .readfile import current_limits, open_regular

__all__ = ["load_checkpoint", "assign_weights"]

_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
# Keys under which training scripts commonly nest the model's state dict.
_NESTED = ("state_dict", "model", "model_state_dict", "module")


def _is_torch_save(path: Path) -> bool:
    """Whether the file starts as ``torch.save`` writes (a zip archive, or a legacy pickle)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict: ``.safetensors``, or ``.pt``/``.pth``/``.bin`` with ``weights_only=True``.

    A dict that nests the weights under ``state_dict`` / ``model`` is unwrapped, and the
    ``module.`` prefix DistributedDataParallel adds is removed.

    Only a regular file under ``Limits.weights_bytes`` is read (a FIFO or a device is
    refused at once; :mod:`retrofit.readfile`).

    Raises:
        ModelLoadError: the file is missing, has another suffix, is not a regular file, or
            is corrupted.
    """
    path = Path(path)
    if path.suffix not in _SUFFIXES:
        raise ModelLoadError(f"checkpoint {str(path)!r}: unknown suffix {path.suffix!r} "
                             f"(valid: {', '.join(_SUFFIXES)})")
    if not os.path.lexists(path):
        raise ModelLoadError(f"checkpoint {str(path)!r} not found")
    from safetensors import SafetensorError

    try:
        with open_regular(path, f"checkpoint {str(path)!r}", current_limits().weights_bytes, "weights_bytes") as (f, _):
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                obj: object = load_file(str(path))
            else:
                obj = torch.load(f, map_location="cpu", weights_only=True)
    except ModelLoadError:  # not a regular file, over the cap: said already
        raise
    except MemoryError as e:
        raise ModelLoadError(f"cannot read checkpoint {str(path)!r}: it does not fit in memory") from e
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, KeyError,
            UnicodeDecodeError) as e:
        hint = ""
        if isinstance(e, SafetensorError) and _is_torch_save(path):
            hint = "; it is a torch.save file: name it .pt to read it that way"
        raise ModelLoadError(
            f"cannot read checkpoint {str(path)!r} (corrupted or not a checkpoint): {first_line(e)}{hint}"
        ) from e
    while isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _NESTED if k in obj), None)
        if inner is None:
            break
        obj = inner
    sd = ({k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
          if isinstance(obj, Mapping) else {})
    if not sd:
        raise ModelLoadError(f"checkpoint {str(path)!r} holds no state dict (no tensors in its {type(obj).__name__})")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _untie(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fill in the names of tied tensors that a file stored once (safetensors keeps one name
    per storage): a missing name that shares its tensor with a present one gets its value."""
    own = model.state_dict(keep_vars=True)
    by_storage: dict[tuple[int, tuple[int, ...]], str] = {}
    for k, v in own.items():
        if k in sd and v.device.type != "meta":
            by_storage.setdefault((v.data_ptr(), tuple(v.shape)), k)
    out = dict(sd)
    for k, v in own.items():
        if k not in out and v.device.type != "meta":
            twin = by_storage.get((v.data_ptr(), tuple(v.shape)))
            if twin is not None:
                out[k] = sd[twin]
    return out


def assign_weights(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str, hint: str,
                   keep_dtype: bool = False) -> None:
    """Load ``sd`` into ``model`` strictly, converting to the model's dtypes, or with
    ``keep_dtype`` giving each tensor the dtype it has in ``sd``.

    With ``keep_dtype`` an fp16 or bf16 state dict makes an fp16 or bf16 model (all of its
    floating tensors, non-persistent buffers included, when the state dict has one
    floating dtype), so a round trip gives back the model that was saved.

    Raises:
        ModelLoadError: keys or shapes that do not match; the message names them, then ``hint``.
    """
    sd = _untie(model, dict(sd))
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {list(sd[k].shape)} vs {list(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            parts.append(f"{len(wrong)} of another shape (e.g. {'; '.join(wrong[:2])})")
        raise ModelLoadError(f"{source} does not fit {type(model).__name__}: {', '.join(parts)}; {hint}")
    floating = {v.dtype for v in sd.values() if v.is_floating_point()}
    if keep_dtype and len(floating) == 1:
        model.to(floating.pop())
    model.load_state_dict(sd)
    for k, t in model.state_dict(keep_vars=True).items() if keep_dtype else ():
        if t.dtype != sd[k].dtype:  # a state dict of several floating dtypes
            t.data = t.data.to(sd[k].dtype)


def load_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a checkpoint into ``model`` (strict), or raise naming what does not match.

    Raises:
        ModelLoadError: unreadable file, or keys / shapes that do not match the model.
    """
    sd = read_state_dict(path)
    unexpected_only = set(sd) - set(model.state_dict()) and not set(model.state_dict()) - set(sd)
    hint = ("is it an already retrofitted model? load those with retrofit.load()" if unexpected_only
            else "check the model name and --num-classes")
    assign_weights(model, sd, f"checkpoint {str(path)!r}", hint)
