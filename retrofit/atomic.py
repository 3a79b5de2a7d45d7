"""Atomic, exclusive writes of files and folders: what every save and checkpoint goes through.

A write is staged in a **private folder** (``mkdtemp``, mode 0700) created beside the
target and named ``.retrofit-tmp-<pid>-<host>-<random>``. Other users cannot create or
replace anything in it, so a link planted where a temporary file will be cannot redirect
a write; what a writer leaves there (safetensors' own temporary file, a half-written file)
goes away with the folder. The finished file gets the mode a new file gets under the
user's umask, set through a descriptor opened with ``O_NOFOLLOW``, and is flushed to disk
(``fsync``) before it takes its name.

- :func:`write_file_atomic` puts a file in place with one rename. Without ``replace`` the
  name is claimed atomically: ``renameat2(RENAME_NOREPLACE)`` on Linux, else a hard link
  (``os.link`` fails if the name exists), else an ``O_EXCL`` claim of the name followed by
  ``os.replace``. Of two writers racing for one name exactly one succeeds; the other gets
  :class:`~retrofit.errors.SaveError` ("exists") and leaves the winner's file as it is.
  With ``replace`` the last writer wins, and each file is complete.
- :func:`write_folder_atomic` (and :func:`new_folder`, for callers that fill the folder
  themselves) writes a complete new folder and puts it in place with one rename:
  ``renameat2(RENAME_NOREPLACE)`` without ``replace``; with ``replace``, the other files the
  old folder had are carried over (hard links, copies where links fail) and the two folders
  are swapped in one step with ``renameat2(RENAME_EXCHANGE)``, then the old one is deleted.
- A name that is a symbolic link, even a dangling one, exists: it is not replaced without
  ``replace``, and with it the link itself is replaced, never its target.
- :func:`clean_stale` (run at the start of every write) deletes what a killed write of
  this machine left: temporary names whose process is gone.

Guarantees and limits, as measured on Linux (ext4, tmpfs):

- A write interrupted at any point (an exception, ``KeyboardInterrupt``, ``SIGKILL``,
  power loss after the rename) leaves the previous file or folder as it was, loadable, and
  no name that blocks the next write; a killed write's temporary folder is deleted by the
  next write in that folder.
- Where ``renameat2`` is missing (not Linux, or a filesystem without it, such as NFS), a
  new folder is put in place after checking the name is free: a concurrent writer that
  creates an *empty* folder there in between loses it (nothing else is lost). A replaced
  folder is then renamed away and the new one renamed in: a write killed between those
  two renames leaves no folder at the name until :func:`clean_stale` renames the old one
  back (the next write does it). Without hard links, a killed new-file write can leave
  an empty file at the name.
- ``replace`` carries over the old folder's other files as they were when the new folder
  was staged; a file added to the old folder while the new one is written is lost.
- The folder of a target must not be writable by other users without the sticky bit
  (``/tmp`` has it): there they can rename anything, the staging folder included.
- On Windows, renames are not atomic replacements of folders and stale temporary names
  are never deleted (there is no safe "is this process alive" check): they must be
  deleted by hand.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import os
import re
import secrets
import shutil
import socket
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from .errors import SaveError, first_line

__all__ = ["WriteFn", "write_file_atomic", "write_folder_atomic", "new_folder"]

TEMP_PREFIX = ".retrofit-tmp-"  # every temporary name: .retrofit-tmp-<pid>-<host>-<random>[-was-<name>]
WriteFn = Callable[[Path], object]  # writes a complete file at the path it is given
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]  # pids of other machines are not ours
_TEMP = re.compile(rf"^{re.escape(TEMP_PREFIX)}(\d+)-([0-9a-f]{{8}})-")
_WAS = "-was-"  # an old folder renamed away while a new one is renamed in (no RENAME_EXCHANGE)
_OLD_TEMP = re.compile(r"^\.(.+)\.\d+\.tmp$")  # retrofit <= 0.3 wrote ".<name>.<pid>.tmp" inside a save folder
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2  # renameat2(2) flags
_AT_FDCWD = -100
_NO_SUPPORT = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}
_NO_LINKS = _NO_SUPPORT | {errno.EPERM, errno.EMLINK, errno.EXDEV}


def write_file_atomic(dest: str | Path, write: WriteFn, *, replace: bool) -> Path:
    """Write a file at ``dest`` so that it appears complete or not at all.

    Args:
        dest: the file to write; its folder must exist.
        write: called with the path of a new file in a private staging folder beside
            ``dest``; it may write it in place or write another file and rename it there.
        replace: replace whatever is at ``dest`` (a file or a link, not a folder). Without
            it, ``dest`` is claimed atomically and the write fails if the name exists.

    Returns:
        ``dest``.

    Raises:
        SaveError: ``dest`` exists (without ``replace``), or an ``OSError`` while writing
            (``write``'s other exceptions pass through; nothing is left behind either way).
    """
    dest, parent = _claimable(dest, replace)
    try:
        with _staging(parent) as stage:
            tmp = stage / dest.name
            write(tmp)
            _seal(tmp, 0o666 & ~_umask())
            if replace:
                os.replace(tmp, dest)
            else:
                _claim_file(tmp, dest)
        _fsync_dir(parent)
    except OSError as e:
        raise _cannot(dest, e) from e
    return dest


def write_folder_atomic(dest: str | Path, files: Mapping[str, WriteFn], *, replace: bool) -> Path:
    """Write a folder holding ``files`` (``{name: write}``) at ``dest`` in one rename.

    Args:
        dest: the folder to write; its parent must exist.
        files: each file's name and the function that writes it (see :func:`write_file_atomic`).
        replace: replace an existing folder at ``dest``; its other files are kept. Without
            it, the write fails if ``dest`` exists (an empty folder or a link too).

    Returns:
        ``dest``.

    Raises:
        SaveError: as :func:`write_file_atomic`.
    """
    with new_folder(dest, replace=replace) as stage:
        for name, write in files.items():
            write(stage / name)
            _seal(stage / name, 0o666 & ~_umask())
    return Path(dest)


@contextlib.contextmanager
def new_folder(dest: str | Path, *, replace: bool) -> Iterator[Path]:
    """A private, empty staging folder to fill; when the ``with`` block ends without an
    exception it becomes ``dest`` in one rename (as :func:`write_folder_atomic`), else it is
    deleted. The files at its top level are flushed to disk first (not those in subfolders);
    they keep the mode they were written with.

    Raises:
        SaveError: ``dest`` exists (without ``replace``), or an ``OSError`` in the block or
            while putting the folder in place.

    Example:
        >>> with new_folder("out/run3", replace=False) as stage:
        ...     (stage / "notes.txt").write_text("hello")
    """
    dest, parent = _claimable(dest, replace)
    try:
        with _staging(parent) as stage:
            yield stage
            _fsync_files(stage)
            old = _real_folder(dest) if replace else None
            if old is not None:
                _carry_over(dest, stage)
            _seal_folder(stage, stat.S_IMODE(old.st_mode) if old is not None else 0o777 & ~_umask())
            if not replace:
                _rename_new(stage, dest)
            elif os.path.lexists(dest):
                _swap(stage, dest)  # `stage` now names the old folder: _staging deletes it
            else:
                try:
                    os.rename(stage, dest)
                except OSError as e:  # one appeared meanwhile: replace it
                    if e.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                        raise
                    _swap(stage, dest)
        _fsync_dir(parent)
    except OSError as e:
        raise _cannot(dest, e) from e


def clean_stale(folder: str | Path) -> list[Path]:
    """Delete the temporary files and folders that killed writes of this machine left in
    ``folder`` (names starting with ``.retrofit-tmp-`` whose process no longer exists);
    an old folder renamed away by a write killed before it renamed the new one in is
    renamed back instead. Best effort: what cannot be deleted stays. Does nothing on Windows.

    Returns:
        The paths deleted, and the names restored.
    """
    folder = Path(folder)
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there
        return []
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    done: list[Path] = []
    for name in names:
        match = _TEMP.match(name)
        if match is None or match[2] != _HOST or _alive(int(match[1])):
            continue
        path = folder / name
        try:
            if _WAS in name and not os.path.lexists(folder / name.split(_WAS, 1)[1]):
                os.rename(path, folder / name.split(_WAS, 1)[1])
                done.append(folder / name.split(_WAS, 1)[1])
            else:
                _remove(path)
                done.append(path)
        except OSError:
            continue
    return done


# --------------------------------------------------------------------------- helpers


def _parent(dest: Path) -> Path:
    return dest.parent if str(dest.parent) else Path(".")


def _exists(dest: Path) -> SaveError:
    link = " (a symbolic link)" if dest.is_symlink() else ""
    return SaveError(f"{str(dest)!r} exists{link}; not overwriting it (pass --force / force=True to replace it)")


def _cannot(dest: Path, e: OSError) -> SaveError:
    where = f" ({e.filename!s})" if e.filename and str(e.filename) != str(dest) and TEMP_PREFIX not in str(
        e.filename) else ""
    return SaveError(f"cannot write {str(dest)!r}{where}: {e.strerror or first_line(e)}; check that its folder "
                     "is writable and has free space")


def _umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (ours counts: a write in progress)."""
    if pid <= 0 or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process
        return True
    return True


def _claimable(dest: str | Path, replace: bool) -> tuple[Path, Path]:
    """``dest`` and its folder, the folder's stale temps removed; refuses an existing
    ``dest`` (a symbolic link included) unless ``replace``."""
    dest = Path(dest)
    parent = _parent(dest)
    clean_stale(parent)
    if not replace and os.path.lexists(dest):
        raise _exists(dest)
    return dest, parent


@contextlib.contextmanager
def _staging(parent: Path) -> Iterator[Path]:
    """A new private folder in ``parent``, deleted (with whatever it names then) on exit."""
    stage = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-{_HOST}-", dir=parent))
    try:
        yield stage
    finally:
        with contextlib.suppress(OSError):
            _remove(stage)


def _remove(path: Path) -> None:
    """Delete a file, link or folder tree, never following a link."""
    if stat.S_ISDIR(os.lstat(path).st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _open_nofollow(path: Path, flags: int) -> int:
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))


def _seal(path: Path, mode: int) -> None:
    """Give the file ``write`` made its final mode and flush it to disk, through a
    descriptor (a link at ``path`` is refused, not followed)."""
    fd = _open_nofollow(path, os.O_RDONLY)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "the writer did not leave a regular file", str(path))
        _chmod(fd, path, mode)
        os.fsync(fd)
    finally:
        os.close(fd)


def _seal_folder(folder: Path, mode: int) -> None:
    fd = _open_nofollow(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        _chmod(fd, folder, mode)
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _chmod(fd: int, path: Path, mode: int) -> None:
    if hasattr(os, "fchmod"):
        os.fchmod(fd, mode)
    else:  # Windows
        os.chmod(path, mode)


def _fsync_files(folder: Path) -> None:
    for entry in os.scandir(folder):
        if entry.is_file(follow_symlinks=False):
            fd = _open_nofollow(Path(entry.path), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (the rename) to disk, where the system can."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@functools.cache
def _libc_renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28, musl >= 1.2.2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the system or the filesystem lacks it.

    Raises:
        OSError: the rename failed (``FileExistsError`` for ``RENAME_NOREPLACE``).
    """
    fn = _libc_renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in _NO_SUPPORT:
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _claim_file(tmp: Path, dest: Path) -> None:
    """Rename ``tmp`` to ``dest``, failing if ``dest`` exists (a link or anything else)."""
    try:
        if _renameat2(tmp, dest, _RENAME_NOREPLACE):
            return
        try:
            os.link(tmp, dest, follow_symlinks=False)
            return  # the staging folder's cleanup unlinks tmp
        except NotImplementedError:
            pass
        except OSError as e:
            if e.errno not in _NO_LINKS:
                raise
        # No hard links here: claim the name, then replace our own claim.
        os.close(_open_nofollow(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
        os.replace(tmp, dest)
    except FileExistsError:
        raise _exists(dest) from None


def _rename_new(stage: Path, dest: Path) -> None:
    """Rename the staged folder to ``dest``, failing if ``dest`` exists."""
    try:
        if _renameat2(stage, dest, _RENAME_NOREPLACE):
            return
        if os.path.lexists(dest):
            raise _exists(dest)
        os.rename(stage, dest)  # fails on a non-empty folder or a file; replaces an empty folder
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise _exists(dest) from None
        raise


def _swap(stage: Path, dest: Path) -> None:
    """Put the staged folder at ``dest`` and the old ``dest`` at ``stage``, in one step where
    the filesystem allows, else in two renames that :func:`clean_stale` can undo."""
    if _renameat2(stage, dest, _RENAME_EXCHANGE):
        return
    away = _parent(dest) / f"{TEMP_PREFIX}{os.getpid()}-{_HOST}-{secrets.token_hex(4)}{_WAS}{dest.name}"
    if len(os.fsencode(away.name)) > 255:
        away = away.with_name(away.name.split(_WAS, 1)[0])  # too long to record the name: not restorable
    os.rename(dest, away)
    try:
        os.rename(stage, dest)
    except BaseException:
        os.rename(away, dest)
        raise
    os.rename(away, stage)  # on success: gone with the staging folder


def _real_folder(path: Path) -> os.stat_result | None:
    """``path``'s stat if it is a folder (not a link to one)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st if stat.S_ISDIR(st.st_mode) else None


def _carry_over(old: Path, stage: Path) -> None:
    """Link (or copy) into ``stage`` the entries of ``old`` it does not have, links as links."""
    new = set(os.listdir(stage))
    for entry in os.scandir(old):
        debris = _OLD_TEMP.match(entry.name)
        if entry.name in new or entry.name.startswith(TEMP_PREFIX) or (debris and debris[1] in new):
            continue
        target = stage / entry.name
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), target)
        elif entry.is_dir(follow_symlinks=False):
            shutil.copytree(entry.path, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry.path, target)


def _link_or_copy(src: str, dst: str | Path) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except (OSError, NotImplementedError):
        shutil.copy2(src, dst, follow_symlinks=False)
