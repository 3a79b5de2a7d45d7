"""Text from files, made safe to print on a terminal.

Names read from files (tensor names in a safetensors header, rule names, package versions
in a save's header, recipe fields) reach error lines, warnings and tables. A name holding
``"\\x1b[2J"`` would clear the user's screen, ``"\\r"`` would overwrite the line it is on,
and ``"\\u202e"`` would print the rest of the line reversed. :func:`printable` writes every
such character as the escape Python's ``repr`` uses (``\\x1b``, ``\\r``, ``\\u202e``);
letters, digits, punctuation and symbols of any script stay as they are. Lone surrogates
(how Python holds the bytes of a file name that is not UTF-8) are escaped too, so the line
can always be encoded.

Colour and bold codes (ANSI "select graphic rendition", ``"\\x1b[1m"``), which other
libraries put in their messages (torch's ``weights_only`` error) and which only style the
text, are removed instead: escaped, they would be noise in the one line a user reads.

This module imports nothing from retrofit: every layer may use it.
"""

from __future__ import annotations

import re

__all__ = ["printable", "printable_lines", "shorten", "excerpt"]

# ESC [ (or the one-character CSI, U+009B), numbers separated by ";", then "m".
_SGR = re.compile("(?:\x1b\\[|\x9b)[0-9;]*m")


_SHORT = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}  # as repr() writes them


def _escape(char: str) -> str:
    if char in _SHORT:
        return _SHORT[char]
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def printable(text: str) -> str:
    """``text`` with each character that is not printable written as its escape.

    Not printable is what ``str.isprintable`` says: the C0 and C1 control characters
    (``\\n``, ``\\t``, ``\\x1b``, ``\\x7f``, ``\\x9b``), format characters (bidirectional
    overrides, zero-width spaces), separators other than the ASCII space (``\\u2028``,
    ``\\xa0``), surrogates and unassigned code points. A backslash already in ``text`` is
    left alone: the point is a safe terminal, not a reversible encoding. Colour and bold
    codes (``"\\x1b[1m"``, ``"\\x1b[0m"``) are removed.

    Example:
        >>> printable("layer1\\x1b[2J.weight")
        'layer1\\\\x1b[2J.weight'
        >>> printable("Größe 重み")
        'Größe 重み'
    """
    if text.isprintable():
        return text
    text = _SGR.sub("", text)
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def printable_lines(text: str) -> str:
    """:func:`printable` on each line of ``text``, keeping its ``"\\n"`` line breaks (for
    tables and multi-line output; a ``"\\r"`` is still escaped)."""
    return "\n".join(printable(line) for line in text.split("\n"))


def shorten(text: str, width: int) -> str:
    """``text`` in at most about ``width`` characters, cut where a sentence or a clause ends
    (after ``.``, ``;``, ``:`` or ``,``), else between words, and marked with ``" ..."``:
    never in the middle of a word. Text that fits is returned as it is.

    Example:
        >>> shorten("first part; second part that is long", 20)
        'first part; ...'
    """
    text = " ".join(text.split())
    if len(text) <= width:
        return text
    head = text[:width + 1]
    for marks in ((". ", "; ", ": "), (", ",)):
        cut = max(head.rfind(m) for m in marks)
        if cut >= width // 3:
            return text[:cut + 1] + " ..."
    cut = head.rfind(" ")
    return (text[:cut] if cut > 0 else text[:width]) + " ..."


def excerpt(value: object, width: int = 60) -> str:
    """``repr(value)`` in at most ``width`` characters; a longer one is cut and ends in ``...``
    (for a value from a file quoted in a message: its start says what it is)."""
    text = repr(value)
    return text if len(text) <= width else text[:max(width - 3, 1)] + "..."
