"""Durable replay protection without an fsync per request on the event loop.

Every authenticated request's nonce must survive a restart (a request captured before it must
stay refused after it). Writing each one to the ledger with a full fsync, on the event loop,
made every request wait for the disk: under 100 uploaders, ``/v1/health`` took a second.

The journal keeps nonces in their own SQLite file (no lock contention with the ledger) and
writes them from one worker thread in batches: one transaction and one fsync for everything
that arrived meanwhile (group commit). A request that changes state waits for its nonce's batch
before it runs; a read does not (replaying a read changes nothing, and a captured read's answer
was visible to whoever captured it). A full disk fails the batch: writes are refused with 507,
reads go on.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import sqlite3
import threading
import time
from pathlib import Path

log = logging.getLogger("chorus_p2p.auth")

NONCE_FILE = "nonces.sqlite"
BATCH = 2000


class NonceJournal:
    def __init__(self, path: str | Path, window: float):
        self.path = Path(path)
        self.window = window
        self._queue: "queue.Queue[tuple[str, float, concurrent.futures.Future] | None]" = \
            queue.Queue()
        conn = self._connect()
        conn.execute("create table if not exists nonces (nonce text primary key, ts real)")
        conn.execute("create index if not exists nonces_ts on nonces (ts)")
        conn.close()
        self._thread = threading.Thread(target=self._run, name="chorus-nonces", daemon=True)
        self._thread.start()
        self._warned = False

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def recent(self, since: float) -> list[tuple[str, float]]:
        conn = self._connect()
        try:
            return conn.execute("select nonce, ts from nonces where ts >= ?", [since]).fetchall()
        finally:
            conn.close()

    def add(self, nonce: str, ts: float) -> concurrent.futures.Future:
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((nonce, ts, done))
        return done

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        conn = self._connect()
        last_prune = 0.0
        stopping = False
        while not stopping:
            item = self._queue.get()
            batch = []
            while item is not None and len(batch) < BATCH:
                batch.append(item)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    item = ()  # type: ignore[assignment]
                    break
            if item is None:
                stopping = True
            elif item and len(batch) >= BATCH:
                self._queue.put(item)  # next batch
            if not batch:
                continue
            try:
                conn.execute("begin")
                conn.executemany("insert or ignore into nonces (nonce, ts) values (?, ?)",
                                 [(n, ts) for n, ts, _ in batch])
                now = time.time()
                if now - last_prune > 60:
                    conn.execute("delete from nonces where ts < ?", [now - self.window])
                    last_prune = now
                conn.execute("commit")
            except sqlite3.Error as exc:
                try:
                    conn.execute("rollback")
                except sqlite3.Error:
                    pass
                if not self._warned:
                    log.error("cannot record request nonces (%s): writes are refused until it "
                              "can", exc)
                    self._warned = True
                for _, _, done in batch:
                    done.set_exception(exc)
                continue
            self._warned = False
            for _, _, done in batch:
                done.set_result(None)
        conn.close()
