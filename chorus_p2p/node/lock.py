"""One process per data dir: an OS file lock (``DATA_DIR/node.lock``), held while the node runs.

Two nodes on one data dir would both write the ledger and the state in place and both claim the
same node id; the second ``up`` is refused with the PID that holds the lock instead. The lock is
``flock``'d, so the kernel releases it when the process dies, ``kill -9`` included: a stale lock
file never blocks a restart. Offline tools (``chorus-node gc``) take the same lock, or, when a
node holds it, talk to that node instead.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

LOCK_FILE = "node.lock"


class DataDirBusy(Exception):
    def __init__(self, data_dir: Path, holder: dict[str, object]):
        self.holder = holder
        pid = holder.get("pid", "?")
        super().__init__(f"{data_dir} is in use by another chorus-node (PID {pid}); stop it "
                         "first, or give this one another --data-dir")


class DataDirLock:
    def __init__(self, data_dir: str | os.PathLike):
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "DataDirLock":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DataDirBusy(self.data_dir, self.holder()) from None
        self._fd = fd
        self.describe()
        return self

    def describe(self, **info: object) -> None:
        """Record who holds the lock (PID, and the URL once listening) for the refusal message
        and for tools that want to reach the running node."""
        assert self._fd is not None
        data = json.dumps({"pid": os.getpid(), **info}).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def holder(self) -> dict[str, object]:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def running_url(self) -> str | None:
        """The URL of the node that holds this data dir now, or None if none runs.

        Tested with a shared lock attempt (it fails only while a node holds the exclusive one),
        so a lock file left behind by a dead node never points anywhere.
        """
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            url = self.holder().get("url")
            return str(url) if url else None
        finally:
            os.close(fd)  # also drops the shared lock if we got it
        return None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "DataDirLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
