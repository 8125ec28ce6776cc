"""The one path by which operator errors leave the program."""

from __future__ import annotations

import sys
from typing import NoReturn


class HoshikageError(Exception):
    """An error an operator can act on: a sentence, an optional hint, an exit code."""

    def __init__(self, message: str, hint: str | None = None, code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


def die(message: str, hint: str | None = None, code: int = 1) -> NoReturn:
    raise HoshikageError(message, hint, code)


def report(err: HoshikageError) -> int:
    print(f"hoshikage: {err}", file=sys.stderr)
    return err.code
