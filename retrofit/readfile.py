"""Reading files from others: the one way retrofit opens a save's files, and the limits on
what such a file may ask for.

Every file :func:`retrofit.load` (and ``retrofit diff``) reads goes through here:
``recipe.json``, a library's ``config.json``, a weights index, a safetensors header, a
training checkpoint and a trusted model file. Each is opened without blocking (a FIFO is
refused at once, never waited on), read only if it is a regular file (not ``/dev/zero``, a
socket or a device) and only up to a size cap; JSON is parsed with a cap on its nesting.
A safetensors header is read and checked by hand (every tensor's dtype, shape and byte
range against the file's size) before safetensors itself opens the file, so that the names
and shapes a load compares a recipe with are facts about the file, not claims.

The caps are a :class:`Limits`, with defaults far above what a real save needs; pass other
ones to :func:`retrofit.load` (``limits=Limits(...)``) or set them for a block with
:func:`limits_applied`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .errors import ModelLoadError, OptionError, first_line
from .text import excerpt

__all__ = [
    "Limits",
    "current_limits",
    "limits_applied",
    "open_regular",
    "read_regular",
    "parse_json",
    "read_json",
    "read_yaml",
    "file_in_folder",
    "json_depth",
    "SafetensorsHeader",
    "read_safetensors_header",
]

_MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """What a file from someone else may make retrofit read and build. Every default is far
    above what a real save needs; a file over a limit is refused with a
    :class:`~retrofit.errors.ModelLoadError` that names the limit.

    Example:
        >>> retrofit.load("big/", limits=Limits(weights_bytes=8 << 30))
    """

    json_bytes: int = 16 * _MiB  # recipe.json, config.json, a weights index, the recipe in a safetensors header
    header_bytes: int = 64 * _MiB  # a safetensors file's header (tensor names, shapes, metadata)
    weights_bytes: int = 1 << 40  # a weights file or a training checkpoint (1 TiB)
    model_file_bytes: int = 4 * _MiB  # a model file (file.py) a trusted recipe names
    json_depth: int = 128  # nesting of lists and tables in a recipe or config
    base_chain: int = 64  # levels of a recipe (a retrofit of a retrofit of ... a base model)
    # Elements of the tensors a recipe's model holds that the file does not (buffers that
    # are not saved): every saved tensor must match the file's header exactly, so this
    # bounds what building the model may allocate beyond the file's own size.
    unsaved_elements: int = 1 << 26
    input_elements: int = 1 << 28  # C x H x W of a recipe's input size
    # A recipe's class count where a library builds per-class data before any tensor (an
    # Ultralytics yaml's nc: a dict of 5,000,000 class names costs 1.4 GB); the command
    # line's --num-classes has the same cap.
    classes: int = 1_000_000
    # Layers a library's model config may ask for once its repeats are expanded (an
    # Ultralytics yaml's layers x their repeat counts x the depth multiple): the largest
    # YOLO builds a few hundred; a scale of 100000 would build modules for hours.
    model_layers: int = 4096
    # A trusted recipe's model file must lie in the save's folder (a save carries it there);
    # True also runs one elsewhere ('../net.py', as saves before 0.2.1 recorded it), its
    # sha256 checked all the same. Hub saves are always confined to their repository.
    model_file_outside_save: bool = False
    # A zip training checkpoint may expand to at most this many times its size (torch.save
    # stores its records uncompressed: 1 is enough for every checkpoint it writes).
    checkpoint_expansion: float = field(default=2.0)

    def __post_init__(self) -> None:
        for name in ("json_bytes", "header_bytes", "weights_bytes", "model_file_bytes", "json_depth", "base_chain",
                     "unsaved_elements", "input_elements", "classes", "model_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise OptionError(f"Limits({name}={value!r}) is not valid: a limit is an integer >= 1")


_DEFAULT = Limits()
_LIMITS: ContextVar[Limits | None] = ContextVar("retrofit_limits", default=None)


def current_limits() -> Limits:
    """The limits in force (set by :func:`limits_applied`, else the defaults)."""
    return _LIMITS.get() or _DEFAULT


@contextlib.contextmanager
def limits_applied(limits: Limits | None) -> Iterator[Limits]:
    """Use ``limits`` for the reads of the block (None: keep those in force)."""
    if limits is None:
        yield current_limits()
        return
    if not isinstance(limits, Limits):
        raise ModelLoadError(f"limits={limits!r} is not a retrofit.readfile.Limits")
    token = _LIMITS.set(limits)
    try:
        yield limits
    finally:
        _LIMITS.reset(token)


def _size(n: int) -> str:
    return f"{n / _MiB:.1f} MiB" if n >= _MiB else f"{n} bytes"


def _over(what: str, size: int, cap: int, limit: str) -> ModelLoadError:
    return ModelLoadError(f"cannot read {what}: {_size(size)}, over the limit of {_size(cap)} (Limits.{limit}); "
                          f"if the file is what you expect, load it with a larger limits=Limits({limit}=...)")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "folder"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "special file"


@contextlib.contextmanager
def open_regular(path: str | Path, what: str, cap: int, limit: str) -> Iterator[tuple[IO[bytes], int]]:
    """Open ``path`` for reading, refusing anything but a regular file of at most ``cap``
    bytes (``limit``: the :class:`Limits` field that sets it, for the message); yields the
    binary file and its size. A FIFO is opened without blocking and refused.

    Raises:
        ModelLoadError: missing, permission denied, not a regular file, or over the cap.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as e:
        raise ModelLoadError(f"cannot read {what}: not found ({str(path)!r})") from e
    except PermissionError as e:
        raise ModelLoadError(f"cannot read {what}: permission denied; check the file's permissions "
                             f"({str(path)!r})") from e
    except OSError as e:
        if e.errno == errno.ENXIO:  # a socket, or a FIFO no one writes to (some systems)
            raise ModelLoadError(f"cannot read {what}: not a regular file ({str(path)!r})") from e
        raise ModelLoadError(f"cannot read {what}: {e.strerror or first_line(e)} ({str(path)!r})") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ModelLoadError(f"cannot read {what}: not a regular file (a {_kind(st.st_mode)}: {str(path)!r}); "
                                 "retrofit reads regular files only")
        if st.st_size > cap:
            raise _over(what, st.st_size, cap, limit)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        yield f, st.st_size


def read_regular(path: str | Path, what: str, cap: int, limit: str) -> bytes:
    """The bytes of a regular file of at most ``cap`` bytes (see :func:`open_regular`).

    Raises:
        ModelLoadError: missing, permission denied, not a regular file, over the cap, or
            unreadable.
    """
    with open_regular(path, what, cap, limit) as (f, _):
        try:
            data = f.read(cap + 1)  # a file that grows meanwhile is still capped
        except OSError as e:
            raise ModelLoadError(f"cannot read {what}: {e.strerror or first_line(e)}") from e
    if len(data) > cap:
        raise _over(what, len(data), cap, limit)
    return data


def json_depth(value: Any, stop: int | None = None) -> int:
    """How deeply lists and tables nest in ``value`` (a scalar: 0), walked without
    recursion; stops counting past ``stop``."""
    deepest = 0
    todo: list[tuple[Any, int]] = [(value, 0)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, Mapping):
            items: Any = v.values()
        elif isinstance(v, (list, tuple)):
            items = v
        else:
            continue
        d += 1
        deepest = max(deepest, d)
        if stop is not None and deepest > stop:
            return deepest
        todo.extend((item, d) for item in items)
    return deepest


def parse_json(data: bytes | str, what: str) -> Any:
    """JSON from a file, under :func:`current_limits` (size, nesting).

    Raises:
        ModelLoadError: not UTF-8, not JSON, nested too deeply, or too large to parse.
    """
    limits = current_limits()
    if len(data) > limits.json_bytes:
        raise _over(what, len(data), limits.json_bytes, "json_bytes")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        value = json.loads(text)
    except UnicodeDecodeError as e:
        raise ModelLoadError(f"cannot read {what} (corrupted?): not UTF-8 text ({first_line(e)})") from e
    except RecursionError as e:
        raise ModelLoadError(f"cannot read {what}: its JSON nests deeper than the limit of {limits.json_depth} "
                             "(Limits.json_depth); it is not a file retrofit wrote") from e
    except MemoryError as e:
        raise ModelLoadError(f"cannot read {what}: its JSON does not fit in memory; is it corrupted?") from e
    except ValueError as e:  # json.JSONDecodeError; also "Exceeds the limit for integer string conversion"
        raise ModelLoadError(f"cannot read {what} (corrupted?): {first_line(e)}") from e
    if json_depth(value, limits.json_depth) > limits.json_depth:
        raise ModelLoadError(f"cannot read {what}: its JSON nests deeper than the limit of {limits.json_depth} "
                             "(Limits.json_depth); it is not a file retrofit wrote")
    return value


def read_json(path: str | Path, what: str) -> Any:
    """A JSON file (``recipe.json``, ``config.json``, a weights index) under the limits.

    Raises:
        ModelLoadError: see :func:`read_regular` and :func:`parse_json`.
    """
    return parse_json(read_regular(path, what, current_limits().json_bytes, "json_bytes"), what)


def file_in_folder(folder: Path, name: str, what: str, where: str) -> Path:
    """Where a file a save's recipe names (relative to the save, as retrofit writes it) lies:
    inside ``folder``, its folders' symbolic links resolved, unless
    ``Limits.model_file_outside_save``. Whether it exists is the caller's question.

    Raises:
        ModelLoadError: an absolute path, or (not allowed) a path that leads out of the save.
    """
    from pathlib import PureWindowsPath

    if Path(name).is_absolute() or PureWindowsPath(name).is_absolute():
        raise ModelLoadError(f"{where}: the recipe names {what} by an absolute path ({name!r}); a save names the files "
                             "it carries relative to itself. Not reading it")
    path = Path(folder) / name
    real = path.parent.resolve() / path.name
    if not real.is_relative_to(Path(folder).resolve()) and not current_limits().model_file_outside_save:
        raise ModelLoadError(f"{where}: the recipe names {what} {name!r}, outside the save's folder; a save carries "
                             "the files it needs. Not reading it (a file of your own elsewhere: "
                             "Limits(model_file_outside_save=True))")
    return real


def _yaml_loader() -> type:
    """A safe yaml loader (PyYAML's pure-Python one) that refuses aliases and counts nesting
    as it composes: an alias makes a small file expand into a huge object ("billion
    laughs": every model copy or JSON dump walks each shared list again), and the C loader
    recurses once per level, so a deeply nested file kills the interpreter."""
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        depth = 0
        what = "the yaml"

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise ModelLoadError(f"cannot read {self.what}: it uses a yaml alias (*{self.peek_event().anchor}, "
                                     f"line {mark.line + 1}); retrofit reads model yamls without aliases, which can "
                                     "make a small file expand without bound. Write the values out in full")
            self.depth += 1
            limit = current_limits().json_depth
            if self.depth > limit:
                mark = self.peek_event().start_mark
                raise ModelLoadError(f"cannot read {self.what}: it nests deeper than the limit of {limit} "
                                     f"(Limits.json_depth) at line {mark.line + 1}; a model yaml nests a few levels")
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    return BoundedLoader


def parse_yaml(data: bytes | str, what: str) -> Any:
    """A yaml document from a file, under :func:`current_limits` (size and nesting as for
    JSON); aliases are refused.

    Raises:
        ModelLoadError: not UTF-8, not yaml, an alias, nested too deeply, or over the size cap.
    """
    import yaml

    limits = current_limits()
    if len(data) > limits.json_bytes:
        raise _over(what, len(data), limits.json_bytes, "json_bytes")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as e:
        raise ModelLoadError(f"cannot read {what}: not UTF-8 text ({first_line(e)})") from e
    loader = _yaml_loader()(text)
    loader.what = what
    try:
        return loader.get_single_data()
    except ModelLoadError:
        raise
    except yaml.YAMLError as e:
        raise ModelLoadError(f"cannot read {what}: not valid yaml ({' '.join(str(e).split())})") from e
    except RecursionError as e:
        raise ModelLoadError(f"cannot read {what}: it nests too deeply to read") from e
    except MemoryError as e:
        raise ModelLoadError(f"cannot read {what}: it does not fit in memory; is it corrupted?") from e
    except ValueError as e:  # a number too long to convert ("Exceeds the limit for integer string conversion")
        raise ModelLoadError(f"cannot read {what}: {first_line(e)}") from e
    finally:
        loader.dispose()


def read_yaml(path: str | Path, what: str) -> Any:
    """A yaml file (an Ultralytics model yaml) under the limits, as :func:`parse_yaml`.

    Raises:
        ModelLoadError: see :func:`read_regular` and :func:`parse_yaml`.
    """
    return parse_yaml(read_regular(path, what, current_limits().json_bytes, "json_bytes"), what)


# --------------------------------------------------------------------------- safetensors

# Bits per element of the dtypes safetensors' torch loader reads (safetensors.torch._TYPES).
_DTYPE_BITS = {
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8, "BOOL": 8,
    "F8_E4M3": 8, "F8_E4M3FNUZ": 8, "F8_E5M2": 8, "F8_E5M2FNUZ": 8, "C64": 64, "U64": 64, "U32": 32, "U16": 16,
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as a safetensors header describes it (checked against the file's size)."""

    dtype: str  # safetensors' name ("F32", "BF16", ...)
    shape: tuple[int, ...]  # its shape


@dataclass(frozen=True)
class SafetensorsHeader:
    """What a safetensors file holds, read from its header alone."""

    tensors: dict[str, TensorEntry]  # every tensor, by name
    metadata: dict[str, str]  # the header's __metadata__ (a retrofit save keeps its recipe there)
    file_bytes: int  # the file's size


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_safetensors_header(path: str | Path, what: str) -> SafetensorsHeader:
    """The header of a safetensors file, checked before the file is opened by safetensors:
    a regular file under ``Limits.weights_bytes``, a header length under
    ``Limits.header_bytes`` that fits in the file, and for every tensor a known dtype, a
    shape of non-negative integers and a byte range of exactly its size inside the file.

    Raises:
        ModelLoadError: the file is not a safetensors file, is truncated, or is over a limit.
    """
    raw, size = _read_header_bytes(path, what)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _corrupted(what, f"its header is not JSON ({first_line(e)})") from e
    except MemoryError as e:
        raise _corrupted(what, "its header does not fit in memory") from e
    if not isinstance(header, dict):
        raise _corrupted(what, f"its header is a {type(header).__name__}, not a table")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise _corrupted(what, "its header's __metadata__ is not a table of strings")
    data_bytes = size - 8 - len(raw)
    tensors = {name: _tensor_entry(name, info, data_bytes, what) for name, info in header.items()}
    return SafetensorsHeader(tensors, meta, size)


def _corrupted(what: str, detail: str) -> ModelLoadError:
    return ModelLoadError(f"cannot read {what} (corrupted?): {detail}")


def _read_header_bytes(path: str | Path, what: str) -> tuple[bytes, int]:
    """A safetensors file's header (the JSON after its 8-byte length) and the file's size,
    the length checked against the file's size and ``Limits.header_bytes`` before it is read."""
    limits = current_limits()
    with open_regular(path, what, limits.weights_bytes, "weights_bytes") as (f, size):
        try:
            head = f.read(8)
            if len(head) < 8:
                raise _corrupted(what, f"{size} bytes, shorter than a safetensors header")
            n = int.from_bytes(head, "little")
            if 8 + n > size:  # first: a length no file of this size can hold is damage, not a large header
                raise _corrupted(what, f"its header claims to be {n} bytes long, but the whole file has {size} bytes "
                                       "(truncated, or not a safetensors file)")
            if n > limits.header_bytes:
                raise _over(f"the header of {what}", n, limits.header_bytes, "header_bytes")
            return f.read(n), size
        except OSError as e:
            raise ModelLoadError(f"cannot read {what}: {e.strerror or first_line(e)}") from e


def _tensor_entry(name: str, info: Any, data_bytes: int, what: str) -> TensorEntry:
    """One tensor's header entry, checked: a known dtype, a shape of integers >= 0, and a
    byte range of exactly its size within the file's ``data_bytes``."""
    if not isinstance(info, dict):
        raise _corrupted(what, f"tensor {name!r}: its entry is a {type(info).__name__}, not a table")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in _DTYPE_BITS:
        raise _corrupted(what, f"tensor {name!r}: unknown dtype {dtype!r} (valid: {', '.join(_DTYPE_BITS)})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _corrupted(what, f"tensor {name!r}: shape {excerpt(shape, 60)} is not a list of integers >= 0")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_bytes):
        raise _corrupted(what, f"tensor {name!r}: data_offsets {excerpt(offsets, 60)} do not lie in the file's "
                               f"{data_bytes} bytes of data (truncated?)")
    numel = 1
    for d in shape:
        numel *= d
    if numel * _DTYPE_BITS[dtype] != (offsets[1] - offsets[0]) * 8:
        raise _corrupted(what, f"tensor {name!r}: shape {shape} of {dtype} needs {numel * _DTYPE_BITS[dtype] // 8} "
                               f"bytes, its data_offsets give {offsets[1] - offsets[0]}")
    return TensorEntry(dtype, tuple(shape))
