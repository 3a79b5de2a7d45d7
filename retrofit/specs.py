"""How a user's model file is named: ``path/to/file.py:factory``. Parsed here only."""

from __future__ import annotations

__all__ = ["is_file_spec", "split_file_spec"]


def is_file_spec(spec: str) -> bool:
    """``path/to/file.py:factory``: a user's model file (running it runs its code)."""
    return ".py:" in spec


def split_file_spec(spec: str) -> tuple[str, str]:
    """``("path/to/file.py", "factory")`` of ``path/to/file.py:factory`` (the last colon
    separates them: a Windows drive letter or a colon in a folder name stays in the path)."""
    file, _, factory = spec.rpartition(":")
    return file, factory
