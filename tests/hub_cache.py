"""A Hugging Face Hub cache laid out by hand, as ``huggingface_hub`` leaves one after a download.

There is no network in the tests: a test writes the files a repository holds into a cache
folder and points ``HF_HUB_CACHE`` there with ``HF_HUB_OFFLINE=1``; ``hf_hub_download``
then serves them from it. The layout (``huggingface_hub.file_download.hf_hub_download``'s
docstring):

    models--ORG--NAME/
        blobs/<git sha1 of a small file, sha256 of an LFS file>    the file contents
        refs/main                                                  the commit main points to
        snapshots/<commit>/<path in the repo>                      a relative symlink to the blob
        .no_exist/<commit>/<path in the repo>                      an empty file: the Hub said it is absent

Stdlib only: the wheel test imports this module in a virtual environment without the tests.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

_LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")  # what the Hub stores with Git LFS


def _blob_name(path: str, data: bytes) -> str:
    """The name the Hub's ETag gives a blob: sha256 for LFS files, Git's blob sha1 otherwise."""
    if path.endswith(_LFS_SUFFIXES):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lay_out(cache: Path, repo_id: str, files: Mapping[str, bytes], *, refs: Iterable[str] = ("main",),
            absent: Iterable[str] = ()) -> str:
    """Put one commit of ``repo_id`` holding ``files`` (path in the repo -> contents) into the
    cache at ``cache``, with each of ``refs`` pointing at it; ``absent`` files are recorded
    as known to be missing. Returns the commit hash."""
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repr((repo_id, sorted(files.items()))).encode()).hexdigest()
    for path, data in files.items():
        blob = repo / "blobs" / _blob_name(path, data)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for path in absent:
        marker = repo / ".no_exist" / commit / path
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return commit


def lay_out_folder(cache: Path, repo_id: str, folder: Path, **kwargs: Iterable[str]) -> str:
    """:func:`lay_out` with the files of ``folder`` (as an upload of the folder would put them)."""
    files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}
    return lay_out(cache, repo_id, files, **kwargs)
