"""Progress bars for long commands (rich, which textual already brings): only when stdout is
a terminal, drawn on stderr and erased when done, so pipes and ``--json`` see nothing of them.

The work reports through a plain ``callback(done, total)``: the library code that does the
work never draws anything itself, and a node passes its own callback (events) instead.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator

ProgressCallback = Callable[[int, int], None]


def wanted() -> bool:
    return sys.stdout.isatty() and sys.stderr.isatty()


@contextlib.contextmanager
def progress_bar(description: str, unit: str = "") -> Iterator[ProgressCallback | None]:
    """Yield a ``callback(done, total)`` that moves a bar, or None when no bar is wanted."""
    if not wanted():
        yield None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn(unit), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)
        yield update
