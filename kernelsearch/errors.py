"""The two kinds of error a user can cause, and nothing else.

`SpecError` is a malformed spec (or a bad parameter given at load time): it names the
source location and says what is wrong and what would be right.  `UsageError` is bad
command-line or API input that is not about a spec (a missing file, a bad storage URL).
The CLI turns both into one line on stderr and exit code 2, without a traceback; text they
quote from a spec or a command line is shown escaped (`text.printable`).
"""
from __future__ import annotations

from dataclasses import dataclass

from .text import printable


@dataclass(frozen=True)
class SourceLocation:
    file: str
    line: int      # 1-based
    column: int    # 1-based

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


class KernelsearchError(Exception):
    """Base class for errors that are the user's to fix (exit code 2)."""


class UsageError(KernelsearchError):
    pass


class SpecError(KernelsearchError):
    def __init__(self, message: str, location: SourceLocation | None = None, hint: str | None = None):
        self.message = message
        self.location = location
        self.hint = hint
        super().__init__(str(self))

    def __str__(self) -> str:
        # messages quote spec text: escaped, so that one error is one line (and its hint) and inert
        where = f"{printable(self.location)}: " if self.location else ""
        hint = f"\n  hint: {printable(self.hint)}" if self.hint else ""
        return f"{where}error: {printable(self.message)}{hint}"
