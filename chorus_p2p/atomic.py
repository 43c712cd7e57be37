"""Outputs that appear whole or not at all.

A failed or killed run must leave nothing a later reader could mistake for a result, so every
output is built under a temporary name beside its destination, fsynced, and renamed into place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from chorus_p2p.errors import UsageError


def fsync_path(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (POSIX needs the directory itself synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _refuse_existing(out: Path, force: bool) -> None:
    is_empty_dir = out.is_dir() and not any(out.iterdir())
    if out.exists() and not is_empty_dir and not force:
        raise UsageError(f"{out}: already exists (use --force to replace it)")


def _replace(scratch: Path, out: Path) -> None:
    if out.exists():
        graveyard = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, graveyard / "old")
        os.replace(scratch, out)
        shutil.rmtree(graveyard, ignore_errors=True)
    else:
        os.replace(scratch, out)
    fsync_dir(out.parent)


@contextmanager
def atomic_output_dir(out: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a scratch folder that becomes ``out`` only if the block succeeds."""
    out = Path(out)
    _refuse_existing(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield scratch
        for path in sorted(scratch.rglob("*")):
            if path.is_file():
                fsync_path(path)
        _replace(scratch, out)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


@contextmanager
def atomic_output_file(out: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a scratch file path that becomes ``out`` only if the block succeeds."""
    out = Path(out)
    _refuse_existing(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.partial-", dir=out.parent)
    os.close(fd)
    scratch = Path(name)
    try:
        yield scratch
        fsync_path(scratch)
        _replace(scratch, out)
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise
