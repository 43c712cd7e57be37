"""Content-addressed blob store: ``blobs/ab/abcdef...`` named by sha256.

A blob is written to a temp file, fsynced, and renamed into place, so a crash leaves either the
whole blob or a stray temp file (swept on start), never a truncated blob under its real name.
Every read can verify the hash, so a blob fetched from disk or from a peer is what its name says.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

from chorus_p2p.atomic import fsync_dir

_SHA = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 20


class BlobError(Exception):
    """A blob is missing or does not match its name."""


def is_sha256(text: str) -> bool:
    return bool(_SHA.match(text))


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class BlobStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    def sweep_partials(self) -> int:
        """Remove temp files left by a crash mid-write (they were never named by the ledger)."""
        removed = 0
        for item in self.tmp.iterdir():
            if item.is_dir():
                shutil.rmtree(item, ignore_errors=True)
            else:
                item.unlink(missing_ok=True)
            removed += 1
        return removed

    def path(self, sha: str) -> Path:
        if not is_sha256(sha):
            raise BlobError(f"{sha!r} is not a sha256 hex digest")
        return self.root / sha[:2] / sha

    def has(self, sha: str) -> bool:
        return is_sha256(sha) and self.path(sha).is_file()

    def new_temp(self, suffix: str = "") -> tuple[BinaryIO, Path]:
        fd, name = tempfile.mkstemp(dir=self.tmp, suffix=suffix)
        return os.fdopen(fd, "wb"), Path(name)

    def adopt(self, temp_path: Path, sha: str) -> Path:
        """Move a fully written, already hashed temp file into place (idempotent)."""
        target = self.path(sha)
        if target.exists():
            temp_path.unlink(missing_ok=True)
            return target
        with open(temp_path, "rb") as fh:
            os.fsync(fh.fileno())
        target.parent.mkdir(exist_ok=True)
        os.replace(temp_path, target)
        fsync_dir(target.parent)
        return target

    def put_file(self, source: str | os.PathLike, *, move: bool = False) -> str:
        """Copy a file in (or, with ``move``, rename a finished file on the same file system
        into place, saving a copy); returns its sha256."""
        if move:
            sha = sha256_file(source)
            self.adopt(Path(source), sha)
            return sha
        out, temp = self.new_temp()
        digest = hashlib.sha256()
        with out, open(source, "rb") as src:
            for chunk in iter(lambda: src.read(CHUNK), b""):
                digest.update(chunk)
                out.write(chunk)
        sha = digest.hexdigest()
        self.adopt(temp, sha)
        return sha

    def put_bytes(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if self.has(sha):
            return sha
        out, temp = self.new_temp()
        with out:
            out.write(data)
        self.adopt(temp, sha)
        return sha

    def verified_path(self, sha: str) -> Path:
        """The blob's path after re-hashing it: bit rot or tampering is caught, not served."""
        path = self.path(sha)
        if not path.is_file():
            raise BlobError(f"blob {sha[:12]}... is not in this store")
        actual = sha256_file(path)
        if actual != sha:
            raise BlobError(f"blob {sha[:12]}... is corrupt on disk (hash {actual[:12]}...)")
        return path

    def read_bytes(self, sha: str) -> bytes:
        return self.verified_path(sha).read_bytes()
