"""Error types shared by the math, the node and the CLI.

Every error a user can cause carries enough context (file, module) to be printed as one line,
and an exit code, so the CLI never has to guess how to report it.
"""

from __future__ import annotations


class ChorusError(Exception):
    """Base class for errors that are reported to the user as a single line."""

    exit_code = 1
    code = "error"


class UsageError(ChorusError):
    """The command line or call was malformed (wrong count of weights, bad option mix)."""

    exit_code = 2
    code = "usage"


class Refused(ChorusError):
    """The command was well formed but cannot run on this data: the data dir is in use by
    another node, or its ledger is damaged (README: a refusal is always exit code 3)."""

    exit_code = 3
    code = "refused"


class AdapterError(ChorusError):
    """An adapter (or residual/base file) is unreadable, malformed or inconsistent.

    ``source`` names the file and ``module`` the target module, so a user can find the culprit
    among dozens of client uploads.
    """

    exit_code = 3
    code = "bad_adapter"

    def __init__(self, message: str, *, source: str | None = None, module: str | None = None):
        self.source = source
        self.module = module
        self.detail = message
        where = []
        if source:
            where.append(str(source))
        if module:
            where.append(f"module {module}")
        prefix = ": ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)
