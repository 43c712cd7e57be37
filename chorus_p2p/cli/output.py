"""How commands print: human text by default, one JSON document with ``--json``.

With ``--json`` the human progress lines still appear, on stderr, so ``cmd --json | jq`` gets
clean JSON on stdout and the terminal still shows what is happening.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from typing import Any, Iterator


def _default(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return str(value)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=_default), flush=True)


def print_json_line(data: Any) -> None:
    """One JSON document per line (JSON Lines), for commands that report as they go."""
    print(json.dumps(data, sort_keys=True, default=_default), flush=True)


@contextlib.contextmanager
def human_output(json_mode: bool) -> Iterator[None]:
    """Send what the block prints to stderr when the command's stdout is for JSON."""
    if not json_mode:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield
