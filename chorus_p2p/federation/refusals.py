"""The one refusal type every check raises; the API maps its ``code`` to an HTTP status.

Kept apart from ``spec`` (which needs torch) so that light modules (the DP policy, the admin
routes) can raise it without importing torch."""

from __future__ import annotations

from typing import Any


class UpdateRejected(Exception):
    """An upload that is well-formed HTTP but not an acceptable update; ``code`` goes to the API,
    ``extra`` adds fields to the JSON error (e.g. where the coordinator is)."""

    def __init__(self, code: str, message: str, extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra or {}
