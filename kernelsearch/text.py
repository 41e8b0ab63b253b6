"""Text from a spec or a user, made safe to show: nothing it contains can drive a terminal."""
from __future__ import annotations

import unicodedata


def printable(text, keep_newlines: bool = False) -> str:
    """`text` with control and format characters written as escapes (\\x1b, \\n, \\u202e, ...).

    Escape sequences (colours, cursor moves, window titles), carriage returns that overwrite what
    was printed and bidirectional overrides all become visible, inert text. `keep_newlines` keeps
    line breaks for multi-line messages whose lines are otherwise escaped.
    """
    text = str(text)
    if text.isprintable():   # the common case, checked in C
        return text
    return "".join(_shown(char, keep_newlines) for char in text)


def _shown(char: str, keep_newlines: bool) -> str:
    if char == "\n" and keep_newlines:
        return char
    if char.isprintable():
        return char
    if unicodedata.category(char) == "Zs":   # non-breaking and other spaces are harmless
        return char
    return repr(char)[1:-1]

