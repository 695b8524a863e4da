"""Errors users see. Each carries the file it concerns and the exit code the CLI returns.

Exit codes follow the scanner convention (modelscan): 0 pass, 1 risk, 2 error or bad input,
3 inconclusive / nothing scannable.
"""

from __future__ import annotations

from pathlib import Path

EXIT_PASS = 0
EXIT_RISK = 1
EXIT_ERROR = 2
EXIT_INCONCLUSIVE = 3


class AuditkitError(Exception):
    """A problem with an input, reported as one line: ``<file>: <problem>``."""

    exit_code = EXIT_ERROR

    def __init__(self, path: str | Path | None, problem: str):
        self.path = str(path) if path is not None else None
        self.problem = problem
        super().__init__(str(self))

    def __str__(self) -> str:
        # One line, always: newlines from untrusted content must not split the message.
        text = f"{self.path}: {self.problem}" if self.path else self.problem
        return " ".join(text.split())


class BadInput(AuditkitError):
    """The input is malformed, unsafe or inconsistent (exit 2)."""


class Unscannable(AuditkitError):
    """The input is well-formed but holds nothing auditkit can analyse yet (exit 3)."""

    exit_code = EXIT_INCONCLUSIVE
