"""The round ledger: the federation's durable memory, in SQLite (WAL) through sqlite-utils.

Tables: ``meta`` (schema version, federation settings), ``members``, ``terms`` and ``votes`` (for
the election), ``rounds``, ``updates`` and ``events``. Every state change a crash could interrupt
is one transaction, and blobs are written before the rows that name them, so after ``kill -9`` the
ledger never points at a blob that is not on disk.

Refused requests are not recorded here (they change no state); they go to the log and the live
event stream.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import sqlite_utils

from chorus_p2p.consensus.rounds import replaces_closed, takes_over
from chorus_p2p.federation.round_states import COMMITTED, InvalidMove, check_move

log = logging.getLogger("chorus_p2p.ledger")
LIVE_STATES = ("open", "collecting")
CLOSED_STATES = ("aggregating", "proposed")

SCHEMA_VERSION = 8



def _migration_1(db: sqlite_utils.Database) -> None:
    db["members"].create({"node_id": str, "name": str, "addresses": str, "public_key": str,
                          "admitted_at": float, "last_seen": float, "status": str},
                         pk="node_id", if_not_exists=True)
    db["terms"].create({"term": int, "coordinator": str, "started_at": float}, pk="term",
                       if_not_exists=True)
    db["votes"].create({"term": int, "voted_for": str, "voted_at": float}, pk="term",
                       if_not_exists=True)
    db["rounds"].create({"round": int, "term": int, "coordinator": str, "state": str,
                         "strategy": str, "config": str, "trained_from": int, "opened_at": float,
                         "deadline_at": float, "aggregating_at": float, "committed_at": float,
                         "adapter_sha": str, "adapter_config_sha": str, "residual_sha": str,
                         "cumulative_sha": str, "metrics": str}, pk="round", if_not_exists=True)
    db["updates"].create({"round": int, "node_id": str, "blob_sha": str, "examples": int,
                          "trained_from": int, "size": int, "norm": float, "received_at": float},
                         pk=("round", "node_id"), if_not_exists=True)
    db["events"].create({"id": int, "ts": float, "kind": str, "round": int, "data": str},
                        pk="id", if_not_exists=True)


def _migration_2(db: sqlite_utils.Database) -> None:
    """Clients may report their held-out loss with an update (shown per round in the TUI)."""
    db["updates"].add_column("eval_loss", float)
    db["updates"].add_column("train_loss", float)


def _migration_3(db: sqlite_utils.Database) -> None:
    """Robust filters record why an update was left out; nonces survive a restart."""
    db["updates"].add_column("status", str)
    db["updates"].add_column("reason", str)
    db["nonces"].create({"nonce": str, "ts": float}, pk="nonce", if_not_exists=True)
    db["nonces"].create_index(["ts"], if_not_exists=True)


def _migration_4(db: sqlite_utils.Database) -> None:
    """The state redesign: ``R`` is no longer a blob per round but a dense checkpointed state.

    Rounds gain ``state_sketch`` (the state's fingerprint after the round, see
    :mod:`chorus_p2p.state.sketch`), ``log_hash`` (a hash chain over the committed history) and
    ``pruned_at`` (when this node dropped the round's blobs). ``cumulative_sha`` stays only so a
    0.1 data dir can be converted (:mod:`chorus_p2p.node.migrate`); new rounds leave it empty."""
    db["rounds"].add_column("state_sketch", str)
    db["rounds"].add_column("log_hash", str)
    db["rounds"].add_column("pruned_at", float)


def _migration_5(db: sqlite_utils.Database) -> None:
    """No acknowledged update is ever deleted silently, no committed round is ever replaced.

    ``dropped_updates`` keeps (with the reason) any update row a node had to give up because the
    committed record does not list it; ``rounds_archive`` keeps a diverged history's rounds when
    an admin resolves the divergence. Updates are looked up by (client, content hash) so the same
    bytes are never counted in two rounds."""
    db["dropped_updates"].create({"round": int, "node_id": str, "blob_sha": str, "examples": int,
                                  "trained_from": int, "dropped_at": float, "reason": str},
                                 if_not_exists=True)
    db["rounds_archive"].create({"archived_at": float, "round": int, "record": str},
                                if_not_exists=True)
    db["updates"].create_index(["node_id", "blob_sha"], if_not_exists=True)
    db["members"].add_column("verified", int)  # NULL: admitted by 0.1, which checked nothing more


def _migration_6(db: sqlite_utils.Database) -> None:
    """The term an update was accepted in: of two different updates from one client for one
    round, the later term's is the one that may have been acknowledged (see mirror_round)."""
    db["updates"].add_column("term", int)  # NULL: accepted before 6, treated as term 0


def _migration_7(db: sqlite_utils.Database) -> None:
    """Blobs this node lost (damaged or missing, found by ``doctor``): the rows that name them
    stay as they are, and the node fetches the bytes back from a peer. Marking their rounds
    pruned instead let the next GC delete every other file of those rounds."""
    db["lost_blobs"].create({"sha": str, "lost_at": float, "reason": str}, pk="sha",
                            if_not_exists=True)


def _migration_8(db: sqlite_utils.Database) -> None:
    """What a node measured of each committed global model on its own held-out data
    (``up --eval-data``): per round and node, a JSON of metrics."""
    db["evaluations"].create({"round": int, "node_id": str, "metrics": str,
                              "evaluated_at": float}, pk=("round", "node_id"),
                             if_not_exists=True)


MIGRATIONS: dict[int, Callable[[sqlite_utils.Database], None]] = {
    1: _migration_1, 2: _migration_2, 3: _migration_3, 4: _migration_4, 5: _migration_5,
    6: _migration_6, 7: _migration_7, 8: _migration_8}
LOG_GENESIS = "chorus-p2p/log/v1"
# What a round's log hash covers: everything that determines the federation's state after it
# (the adapter and the residual, by hash). The state fingerprint is derived from those and is
# not hashed: a data dir converted from 0.1 computes its first one from its own state.
CHAINED_FIELDS = ("round", "trained_from", "strategy", "adapter_sha", "adapter_config_sha",
                  "residual_sha")


def chain_hash(previous: str | None, row: dict[str, Any]) -> str:
    """``sha256(previous log hash || the round's result)``: one value names a whole history, so
    two nodes agree on every committed round iff they agree on the latest one's hash."""
    fields = json.dumps({k: row.get(k) for k in CHAINED_FIELDS}, sort_keys=True)
    return hashlib.sha256(f"{previous or LOG_GENESIS}\n{fields}".encode()).hexdigest()


class Ledger:
    """Thin, typed access to the ledger. Used from the event-loop thread only; every call is a
    short indexed query or a single small transaction."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self.db = sqlite_utils.Database(conn)
        self.db.enable_wal()
        # FULL: a committed round survives power loss, not only a process crash.
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA busy_timeout=5000")
        self._migrate()

    def _migrate(self) -> None:
        self.db["meta"].create({"key": str, "value": str}, pk="key", if_not_exists=True)
        version = int(self.get_meta("schema_version", "0"))
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"{self.path}: ledger schema {version} is newer than this "
                               f"chorus-p2p ({SCHEMA_VERSION}); upgrade chorus-p2p")
        for target in range(version + 1, SCHEMA_VERSION + 1):
            with self.db.atomic():
                MIGRATIONS[target](self.db)
                self.set_meta("schema_version", str(target))

    def close(self) -> None:
        self.db.close()

    # -- meta -----------------------------------------------------------------------------
    def get_meta(self, key: str, default: str | None = None) -> str | None:
        rows = list(self.db.query("select value from meta where key = ?", [key]))
        return rows[0]["value"] if rows else default

    def set_meta(self, key: str, value: str) -> None:
        self.db["meta"].upsert({"key": key, "value": value}, pk="key")

    def delete_meta(self, key: str) -> None:
        self.db.execute("delete from meta where key = ?", [key])

    # -- rounds ---------------------------------------------------------------------------
    def round(self, number: int) -> dict[str, Any] | None:
        rows = list(self.db.query("select * from rounds where round = ?", [number]))
        return _decode_round(rows[0]) if rows else None

    def latest_round(self) -> dict[str, Any] | None:
        rows = list(self.db.query("select * from rounds order by round desc limit 1"))
        return _decode_round(rows[0]) if rows else None

    def latest_committed(self) -> dict[str, Any] | None:
        rows = list(self.db.query(
            "select * from rounds where state = ? order by round desc limit 1", [COMMITTED]))
        return _decode_round(rows[0]) if rows else None

    def committed_round(self) -> int:
        """The number of the newest committed round (0 before any)."""
        row = self.db.execute("select max(round) from rounds where state = ?",
                              [COMMITTED]).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def list_rounds(self, limit: int = 50, before: int | None = None) -> list[dict[str, Any]]:
        if before is None:
            rows = self.db.query("select * from rounds order by round desc limit ?", [limit])
        else:
            rows = self.db.query("select * from rounds where round < ? order by round desc "
                                 "limit ?", [before, limit])
        return [_decode_round(r) for r in rows]

    def count_rounds(self) -> int:
        return self.db["rounds"].count

    def committed_after(self, after: int, limit: int = 100) -> list[dict[str, Any]]:
        """Committed rounds past ``after``, oldest first (a page of history for catch-up)."""
        return [_decode_round(r) for r in self.db.query(
            "select * from rounds where round > ? and state = ? order by round limit ?",
            [after, COMMITTED, limit])]

    def count_members(self) -> int:
        return self.db["members"].count

    def insert_round(self, row: dict[str, Any]) -> None:
        self.db["rounds"].insert(_encode_round(row))

    def set_round_state(self, number: int, state: str, **fields: Any) -> None:
        """Move a round (``round_states.MOVES``: any other move raises, nothing is written)."""
        with self.db.atomic():
            self._move(number, state)
            self.db["rounds"].update(number, _encode_round({"state": state, **fields}))

    def _move(self, number: int, state: str) -> None:
        row = self.db.execute("select state from rounds where round = ?", [number]).fetchone()
        if row is None:
            raise InvalidMove(f"round {number} does not exist")
        check_move(number, row[0], state)

    def commit_round(self, number: int, fields: dict[str, Any], next_round: dict[str, Any] | None,
                     event: tuple[str, dict[str, Any]]) -> int:
        """Mark a round committed, open the next and log it: one transaction, all or nothing."""
        with self.db.atomic():
            self._move(number, COMMITTED)
            self.db["rounds"].update(number, _encode_round({"state": COMMITTED, **fields}))
            if next_round is not None:
                self.db["rounds"].insert(_encode_round(next_round))
            return self._insert_event(event[0], number, event[1])

    def settle_committed(self, rounds: list[dict[str, Any]], updates: list[dict[str, Any]]) -> None:
        """Record committed rounds from the coordinator. Their update lists are final: a row of
        ours that a committed round does not list is moved to ``dropped_updates`` (with the
        reason and an event), never deleted without a trace. One transaction."""
        with self.db.atomic():
            for row in rounds:
                listed = {(u["node_id"], u["blob_sha"]) for u in updates
                          if u["round"] == row["round"]}
                extra = [u for u in self.updates(row["round"])
                         if (u["node_id"], u["blob_sha"]) not in listed]
                self._drop(extra, f"round {row['round']} committed without it")
                self.db["rounds"].upsert(_encode_round(row), pk="round")
            for update in updates:
                self.db["updates"].upsert(update, pk=("round", "node_id"))

    def mirror_round(self, record: dict[str, Any], updates: list[dict[str, Any]], committed: int
                     ) -> list[dict[str, Any]]:
        """Mirror the coordinator's live round (or proposal) after our committed round
        ``committed``. Our other uncommitted rounds are superseded (their updates kept in
        ``dropped_updates``); a different update of ours for the same client is dropped the same
        way; our updates the coordinator lacks stay, and are returned so the caller can hand them
        to the coordinator.

        A committed round is never replaced: the caller's ``committed`` was read before it
        awaited the blobs, and meanwhile this node may have led and committed that very round
        (the 60 s chaos run's loss: a term-8 proposal overwrote the term-9 commit of round 57).
        So the newest committed round is read again inside the transaction, and a record at or
        below it changes nothing."""
        number = record["round"]
        with self.db.atomic():
            newest = list(self.db.query("select max(round) as n from rounds where state = ?",
                                        [COMMITTED]))[0]["n"]
            committed = max(committed, newest if newest is not None else -1)
            if number <= committed:
                return []
            ours = self.round(number)
            if ours is not None and ours["state"] in CLOSED_STATES and \
                    record.get("state") in LIVE_STATES and \
                    not replaces_closed(ours.get("term"), record.get("term")):
                return []  # a late copy of the live round we already hold closed
            for other in self.db.query("select round, trained_from from rounds where round > ? "
                                       "and state != ?", [committed, COMMITTED]):
                if other["round"] != number or other["trained_from"] != record["trained_from"]:
                    self._drop(self.updates(other["round"]),
                               f"round {other['round']} was superseded by the coordinator's")
                    self.db.execute("delete from rounds where round = ?", [other["round"]])
            theirs = {u["node_id"]: u for u in updates}
            mine = self.updates(number)
            # A different update from the same client: the one accepted in the later term wins.
            # Ours from a later term may have been acknowledged (a coordinator that recovered the
            # round from a majority accepted it), theirs from an earlier one cannot have been:
            # keep ours and hand it to the coordinator instead of dropping it.
            later = {u["node_id"] for u in mine if u["node_id"] in theirs
                     and takes_over(theirs[u["node_id"]], u)}
            self._drop([u for u in mine if u["node_id"] in theirs and u["node_id"] not in later
                        and theirs[u["node_id"]]["blob_sha"] != u["blob_sha"]],
                       "the coordinator holds a different update from this client")
            self.db["rounds"].upsert(_encode_round(record), pk="round")
            for update in updates:
                if update["node_id"] not in later:
                    self.db["updates"].upsert(update, pk=("round", "node_id"))
        return [u for u in mine if u["node_id"] not in theirs or u["node_id"] in later]

    def archive_rounds_after(self, number: int) -> int:
        """Move every round after ``number`` (and its updates) to ``rounds_archive``: how an admin
        resolves a diverged history without deleting it. Returns how many rounds moved."""
        moved = 0
        with self.db.atomic():
            for row in list(self.db.query("select * from rounds where round > ? order by round",
                                          [number])):
                record = {**_decode_round(row), "updates": self.updates(row["round"])}
                self.db["rounds_archive"].insert({"archived_at": time.time(),
                                                  "round": row["round"],
                                                  "record": json.dumps(record, sort_keys=True)})
                moved += 1
            self.db.execute("delete from updates where round > ?", [number])
            self.db.execute("delete from rounds where round > ?", [number])
        return moved

    def drop_updates(self, rows: list[dict[str, Any]], reason: str) -> None:
        """Move updates to ``dropped_updates`` with the reason (one transaction)."""
        with self.db.atomic():
            self._drop(rows, reason)

    def _drop(self, rows: list[dict[str, Any]], reason: str) -> None:
        for row in rows:
            self.db["dropped_updates"].insert({
                "round": row["round"], "node_id": row["node_id"], "blob_sha": row["blob_sha"],
                "examples": row.get("examples"), "trained_from": row.get("trained_from"),
                "dropped_at": time.time(), "reason": reason})
            self.db.execute("delete from updates where round = ? and node_id = ?",
                            [row["round"], row["node_id"]])
            self._insert_event("update_dropped", row["round"], {
                "node_id": row["node_id"], "sha256": row["blob_sha"], "reason": reason})
            log.warning("round %d: update from %s dropped (kept in dropped_updates): %s",
                        row["round"], row["node_id"], reason)

    # -- retention --------------------------------------------------------------------------
    def mark_pruned(self, upto: int) -> list[int]:
        """Mark committed rounds ``<= upto`` as pruned (their blobs may go); returns the newly
        marked ones. Done before any file is deleted, so a crash mid-GC only leaves files that
        the next GC deletes."""
        with self.db.atomic():
            rows = [r["round"] for r in self.db.query(
                "select round from rounds where round <= ? and state = ? and pruned_at is null",
                [upto, COMMITTED])]
            if rows:
                self.db.execute("update rounds set pruned_at = ? where round <= ? and state = ? "
                                "and pruned_at is null", [time.time(), upto, COMMITTED])
        return rows

    def set_pruned(self, numbers: list[int]) -> None:
        """Record rounds whose blobs this node does not hold (caught up past them)."""
        if numbers:
            marks = ",".join("?" * len(numbers))
            self.db.execute(f"update rounds set pruned_at = ? where round in ({marks}) "
                            "and pruned_at is null", [time.time(), *numbers])

    def first_retained_round(self) -> int:
        """The oldest committed round whose blobs this node still holds."""
        rows = list(self.db.query("select min(round) as n from rounds where state = ? and "
                                  "pruned_at is null", [COMMITTED]))
        return rows[0]["n"] if rows and rows[0]["n"] is not None else 0

    def blob_references(self) -> tuple[set[str], set[str]]:
        """(blobs named by rounds still kept or in flight, blobs named only by pruned rounds)."""
        def shas(where: str) -> set[str]:
            found: set[str] = set()
            for row in self.db.query(
                    "select adapter_sha, adapter_config_sha, residual_sha, cumulative_sha from "
                    f"rounds where {where}"):
                found.update(v for v in row.values() if v)
            found.update(r["blob_sha"] for r in self.db.query(
                f"select blob_sha from updates where round in (select round from rounds where "
                f"{where})"))
            return found

        kept = shas("pruned_at is null")
        return kept, shas("pruned_at is not null") - kept

    def named_blobs(self) -> set[str]:
        """Every blob any row names: rounds (pruned or not), their updates, dropped updates and
        archived rounds. A repair may delete a blob only if it is not in here."""
        kept, pruned = self.blob_references()
        return kept | pruned | self.kept_aside_blobs()

    def kept_aside_blobs(self) -> set[str]:
        """Blobs of dropped updates (until their round is pruned) and of archived (diverged)
        rounds: kept as evidence, so neither GC nor a repair deletes them."""
        named = {r["blob_sha"] for r in self.db.query(
            "select blob_sha from dropped_updates where round >= ?",
            [self.first_retained_round()])}
        for row in self.db.query("select record from rounds_archive"):
            record = json.loads(row["record"])
            named.update(record.get(k) for k in ("adapter_sha", "adapter_config_sha",
                                                 "residual_sha", "cumulative_sha"))
            named.update(u.get("blob_sha") for u in record.get("updates") or [])
        named.discard(None)
        return named

    def mark_lost(self, shas: dict[str, str]) -> None:
        """Record blobs this node no longer holds intact (sha -> why); see migration 7."""
        now = time.time()
        with self.db.atomic():
            for sha, reason in shas.items():
                self.db["lost_blobs"].upsert({"sha": sha, "lost_at": now, "reason": reason},
                                             pk="sha")

    def lost_blobs(self) -> list[str]:
        return [r["sha"] for r in self.db.query("select sha from lost_blobs order by lost_at")]

    def found_blob(self, sha: str) -> None:
        self.db.execute("delete from lost_blobs where sha = ?", [sha])


    # -- election state ----------------------------------------------------------------------
    def current_term(self) -> int:
        return int(self.get_meta("current_term", "0"))

    def set_term(self, term: int) -> None:
        self.set_meta("current_term", str(term))

    def vote(self, term: int) -> str | None:
        rows = list(self.db.query("select voted_for from votes where term = ?", [term]))
        return rows[0]["voted_for"] if rows else None

    def record_vote(self, term: int, candidate: str) -> None:
        """Persisted (FULL sync) before the vote is sent: a restart can never vote twice."""
        with self.db.atomic():
            self.db["votes"].insert({"term": term, "voted_for": candidate, "voted_at": time.time()},
                                    pk="term", replace=True)
            if term > self.current_term():
                self.set_term(term)

    def record_term(self, term: int, coordinator: str) -> None:
        self.db["terms"].upsert({"term": term, "coordinator": coordinator,
                                 "started_at": time.time()}, pk="term")

    # -- updates --------------------------------------------------------------------------
    def update(self, number: int, node_id: str) -> dict[str, Any] | None:
        rows = list(self.db.query("select * from updates where round = ? and node_id = ?",
                                  [number, node_id]))
        return rows[0] if rows else None

    def updates(self, number: int) -> list[dict[str, Any]]:
        return list(self.db.query("select * from updates where round = ? order by node_id",
                                  [number]))

    def count_updates(self, number: int | None = None) -> int:
        if number is None:
            return self.db["updates"].count
        return list(self.db.query("select count(*) as n from updates where round = ?",
                                  [number]))[0]["n"]

    def eligible_updates(self, number: int) -> list[dict[str, Any]]:
        """Updates the robust filters have not excluded."""
        return [u for u in self.updates(number) if u.get("status") != "excluded"]

    def counted_elsewhere(self, node_id: str, blob_sha: str, round_no: int) -> int | None:
        """The round (other than ``round_no``) in which this client's same bytes already are."""
        rows = list(self.db.query("select round from updates where node_id = ? and blob_sha = ? "
                                  "and round != ? order by round limit 1",
                                  [node_id, blob_sha, round_no]))
        return rows[0]["round"] if rows else None

    def recent_norm_median(self, before: int, rounds: int = 5) -> float | None:
        """The federation's scale: the median, over the last ``rounds`` committed rounds before
        ``before``, of each round's median accepted norm (None before any history). One vote
        per round, so client ids made up in one round cannot set the scale of the others."""
        per_round: dict[int, list[float]] = {}
        for r in self.db.query(
                "select u.round, u.norm from updates u join rounds r using (round) where "
                "r.state = ? and r.round < ? and r.round >= ? - ? and u.norm > 0 and "
                "(u.status is null or u.status = 'accepted')", [COMMITTED, before, before, rounds]):
            per_round.setdefault(r["round"], []).append(r["norm"])
        medians = [statistics.median(norms) for norms in per_round.values()]
        return statistics.median(medians) if medians else None

    def recent_own_norms(self, before: int, node_ids: list[str], rounds: int = 5
                         ) -> dict[str, float]:
        """Each client's own smallest accepted norm over the last ``rounds`` committed rounds:
        a scale others cannot steer (see robust.bound_exclusions). The smallest, not the median,
        so a client cannot raise its own bound by 100x a round: at most 100x per ``rounds``."""
        if not node_ids:
            return {}
        marks = ",".join("?" * len(node_ids))
        own: dict[str, list[float]] = {}
        for r in self.db.query(
                "select u.node_id, u.norm from updates u join rounds r using (round) where "
                f"r.state = ? and r.round < ? and r.round >= ? - ? and u.node_id in ({marks}) "
                "and u.norm > 0 and (u.status is null or u.status = 'accepted')",
                [COMMITTED, before, before, rounds, *node_ids]):
            own.setdefault(r["node_id"], []).append(r["norm"])
        return {node_id: min(norms) for node_id, norms in own.items()}

    def exclude_update(self, number: int, node_id: str, reason: str) -> bool:
        with self.db.atomic():
            changed = self.db.execute("update updates set status = 'excluded', reason = ? where "
                                      "round = ? and node_id = ?", [reason, number, node_id])
            if not changed.rowcount:
                return False
            self._insert_event("update_excluded", number, {"node_id": node_id, "reason": reason})
        return True

    def add_update(self, row: dict[str, Any], event: dict[str, Any]) -> int:
        with self.db.atomic():
            self.db["updates"].insert(row)
            return self._insert_event("update_accepted", row["round"], event)

    def record_evaluation(self, number: int, node_id: str, metrics: dict[str, float]) -> None:
        self.db["evaluations"].upsert({"round": number, "node_id": node_id,
                                       "metrics": json.dumps(metrics, sort_keys=True),
                                       "evaluated_at": time.time()}, pk=("round", "node_id"))

    def evaluations(self, rounds: list[int] | None = None) -> dict[int, dict[str, dict]]:
        """round -> node id -> metrics (every round, or those listed)."""
        if rounds is not None and not rounds:
            return {}
        where, args = ("", []) if rounds is None else (
            f"where round in ({','.join('?' * len(rounds))})", list(rounds))
        out: dict[int, dict[str, dict]] = {}
        for row in self.db.query(f"select * from evaluations {where} order by round", args):
            out.setdefault(row["round"], {})[row["node_id"]] = json.loads(row["metrics"])
        return out

    def rounds_contributed(self, node_id: str) -> int:
        """Committed rounds that count an update of ``node_id``."""
        return list(self.db.query(
            "select count(*) as n from updates u join rounds r using (round) where "
            "u.node_id = ? and r.state = ? and (u.status is null or u.status = 'accepted')",
            [node_id, COMMITTED]))[0]["n"]

    # -- members --------------------------------------------------------------------------
    def members(self) -> list[dict[str, Any]]:
        contributed = {r["node_id"]: r["n"] for r in self.db.query(
            "select node_id, count(*) as n from updates u join rounds r using (round) "
            "where r.state = ? group by node_id", [COMMITTED])}
        return [{**m, "addresses": json.loads(m["addresses"] or "[]"),
                 "rounds_contributed": contributed.get(m["node_id"], 0)}
                for m in self.db.query("select * from members order by node_id")]

    def upsert_member(self, row: dict[str, Any]) -> None:
        row = dict(row)
        if "addresses" in row and not isinstance(row["addresses"], str):
            row["addresses"] = json.dumps(row["addresses"])
        self.db["members"].upsert(row, pk="node_id")

    def mark_excluded(self, number: int, excluded: dict[str, str], *,
                      others_accepted: bool = True) -> None:
        """Record the robust filters' verdicts; with ``others_accepted`` (at aggregation),
        every other update of the round is accepted."""
        with self.db.atomic():
            if others_accepted:
                self.db.execute("update updates set status = 'accepted', reason = null where "
                                "round = ? and (status is null or status != 'excluded')",
                                [number])
            for node_id, reason in excluded.items():
                self.db.execute("update updates set status = 'excluded', reason = ? where round = ? "
                                "and node_id = ?", [reason, number, node_id])

    # -- nonces: 0.1 kept them here (see node/nonces.py for today's journal) -----------------
    def recent_nonces(self, since: float) -> list[tuple[str, float]]:
        return [(r["nonce"], r["ts"]) for r in self.db.query(
            "select nonce, ts from nonces where ts >= ?", [since])]

    # -- events ---------------------------------------------------------------------------
    def _insert_event(self, kind: str, number: int | None, data: dict[str, Any]) -> int:
        table = self.db["events"]
        table.insert({"ts": time.time(), "kind": kind, "round": number,
                      "data": json.dumps(data, sort_keys=True)})
        return int(table.last_pk)

    def add_event(self, kind: str, number: int | None, data: dict[str, Any]) -> int:
        with self.db.atomic():
            return self._insert_event(kind, number, data)

    def events_since(self, since: int, limit: int = 1000) -> Iterator[dict[str, Any]]:
        for row in self.db.query("select * from events where id > ? order by id limit ?",
                                 [since, limit]):
            yield {**row, "data": json.loads(row["data"])}

    def events_tail(self, count: int) -> list[dict[str, Any]]:
        """The last ``count`` recorded events, oldest first (what a dashboard shows on attach)."""
        rows = list(self.db.query("select * from events order by id desc limit ?", [count]))
        return [{**row, "data": json.loads(row["data"])} for row in reversed(rows)]

    def snapshot(self) -> dict[str, list[dict[str, Any]]]:
        """Every state table's rows, for tests that assert a refused request changed nothing."""
        return {t: list(self.db.query(f"select * from [{t}] order by rowid"))
                for t in ("members", "terms", "votes", "rounds", "updates", "events")}



def _encode_round(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    for key in ("config", "metrics"):
        if key in out and out[key] is not None and not isinstance(out[key], str):
            out[key] = json.dumps(out[key], sort_keys=True)
    return out


def _decode_round(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    for key in ("config", "metrics"):
        if out.get(key):
            out[key] = json.loads(out[key])
    return out
