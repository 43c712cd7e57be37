"""``chorus-node doctor``: check a data dir, and repair what can be repaired without losing data.

Checks, in order: the identity files; whether a node is running on the data dir; the ledger
(present, not empty, opens, SQLite ``quick_check``, schema version); every blob a kept round
names (present, hash verifies) and blobs no round names; the state (marker, working file,
checkpoint hash).

With ``--repair`` (the node must be stopped), nothing that still holds information is deleted:

- a ledger that is missing, empty or corrupt is moved aside (``ledger.sqlite.damaged-<time>``)
  and replaced by a fresh one into which every row that can still be read is copied (rounds,
  updates, members, terms and votes, the privacy budget...). It is marked *rebuild*: at the next
  ``up`` the node catches the federation's history up from its members rather than founding one
  of its own, unless it is started with ``--bootstrap`` (a one-node federation has no one to
  ask), re-using the blobs it still has;
- a blob whose bytes no longer match its name is moved to ``blobs/quarantine/``, and it and any
  missing blob are recorded as *lost*: the rows that name them stay as they are (a damaged
  client update of a committed round costs that file, not the round), and the running node
  fetches each lost blob back from a peer that holds it;
- a checkpoint whose hash does not match is removed (the node rebuilds one from the log);
- blobs that no row names at all (no round, update, dropped update or archived round), and
  that are older than the GC's grace period, are deleted.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

from chorus_p2p.node.blobs import BlobStore, sha256_file
from chorus_p2p.node.ledger import SCHEMA_VERSION, Ledger
from chorus_p2p.node.lock import DataDirBusy, DataDirLock
from chorus_p2p.node.retention import ORPHAN_GRACE_S, orphan_blobs

LEDGER_FILE = "ledger.sqlite"
REBUILD_META = "rebuild"


@dataclass
class Finding:
    check: str
    ok: bool
    detail: str
    repaired: str | None = None

    def line(self) -> str:
        mark = "ok" if self.ok else ("REPAIRED" if self.repaired else "PROBLEM")
        text = f"{mark:<9} {self.check}: {self.detail}"
        return text + (f" -> {self.repaired}" if self.repaired else "")


@dataclass
class Report:
    findings: list[Finding] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return all(f.ok or f.repaired for f in self.findings)

    def add(self, check: str, ok: bool, detail: str) -> Finding:
        finding = Finding(check, ok, detail)
        self.findings.append(finding)
        return finding

    def to_json(self) -> dict[str, object]:
        return {"healthy": self.healthy, "findings": [f.__dict__ for f in self.findings]}


def ledger_problem(data_dir: Path) -> str | None:
    """Why the ledger cannot be used, when the data dir shows it once held a history (one line
    for ``up`` to refuse with); None when it is fine or the data dir is new."""
    path = data_dir / LEDGER_FILE
    blobs = sum(1 for _ in (data_dir / "blobs").glob("??/*")) if (data_dir / "blobs").is_dir() \
        else 0
    had_history = blobs > 0 or (data_dir / "state" / "working.json").exists()
    if not path.exists():
        return f"the ledger is missing but the data dir holds {blobs} blob(s)" if had_history \
            else None
    if path.stat().st_size == 0:
        return (f"the ledger is empty (0 bytes) but the data dir holds {blobs} blob(s)"
                if had_history else None)
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            result = conn.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        return f"the ledger is not a readable database ({exc})"
    return None if result == "ok" else f"the ledger is corrupt ({result})"


def diagnose(data_dir: str | Path, *, repair: bool = False) -> Report:
    data_dir = Path(data_dir)
    report = Report()
    from chorus_p2p.trust.identity import IdentityError, load_identity

    try:
        identity = load_identity(data_dir)
        report.add("identity", True, f"node {identity.node_id} of {identity.federation!r}")
    except (IdentityError, Exception) as exc:  # a damaged identity cannot be repaired here
        report.add("identity", False, f"{exc} (re-join with a new data dir and a join token)")
        return report
    lock = DataDirLock(data_dir)
    try:
        lock.acquire()
    except DataDirBusy as exc:
        report.add("running node", True, f"PID {exc.holder.get('pid')} holds the data dir; "
                   "checks are read-only" + ("; stop it to repair" if repair else ""))
        repair = False
        lock = None  # type: ignore[assignment]
    try:
        _check_ledger(data_dir, report, repair)
        if (data_dir / LEDGER_FILE).exists() and ledger_problem(data_dir) is None:
            _check_blobs(data_dir, report, repair)
            _check_state(data_dir, report, repair)
    finally:
        if lock is not None:
            lock.release()
    return report


def _check_ledger(data_dir: Path, report: Report, repair: bool) -> None:
    problem = ledger_problem(data_dir)
    path = data_dir / LEDGER_FILE
    if problem is None:
        if not path.exists():
            report.add("ledger", True, "none yet (a new data dir)")
            return
        ledger = Ledger(path)
        try:
            version = int(ledger.get_meta("schema_version", "0") or 0)
            latest = ledger.latest_committed()
            rebuild = ledger.get_meta(REBUILD_META) == "1"
        finally:
            ledger.close()
        report.add("ledger", True, f"schema {version} (current {SCHEMA_VERSION}), latest "
                   f"committed round {latest['round'] if latest else '-'}"
                   + ("; rebuilding from the federation at the next start" if rebuild else ""))
        return
    finding = report.add("ledger", False, problem)
    if not repair:
        finding.detail += "; run with --repair to move it aside and rebuild from the federation"
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for suffix in ("", "-wal", "-shm"):
        old = data_dir / (LEDGER_FILE + suffix)
        if old.exists():  # kept as SQLite names them, so the salvage reads the WAL's rows too
            old.rename(data_dir / f"{LEDGER_FILE}.damaged-{stamp}{suffix}")
    ledger = Ledger(path)
    try:
        salvaged = salvage_rows(data_dir / f"{LEDGER_FILE}.damaged-{stamp}", ledger)
        ledger.set_meta(REBUILD_META, "1")
    finally:
        ledger.close()
    kept = ", ".join(f"{n} {table}" for table, n in salvaged.items() if n) or "no rows"
    finding.repaired = (f"moved to {LEDGER_FILE}.damaged-{stamp}; {kept} salvaged into a fresh "
                        "ledger, which catches the history up from the federation at the next "
                        "`up` (give it --peer or mDNS; a one-node federation: --bootstrap); the "
                        "blobs here are re-used")


# Tables copied from a damaged ledger, in dependency order; meta last, so the fresh ledger's
# own schema_version stays.
SALVAGED_TABLES = ("members", "terms", "votes", "rounds", "updates", "dropped_updates",
                   "rounds_archive", "lost_blobs", "events", "nonces", "meta")


def salvage_rows(damaged: Path, ledger: Ledger) -> dict[str, int]:
    """Copy every row of ``damaged`` that SQLite can still read into ``ledger``.

    Rows are read by rowid ranges, so one bad page costs the rows on it, not the table; a
    table that cannot be read at all is skipped. Columns the fresh schema lacks are dropped.
    Returns rows copied per table."""
    copied: dict[str, int] = {}
    if not damaged.is_file() or damaged.stat().st_size == 0:
        return copied
    try:
        source = sqlite3.connect(f"file:{damaged}?mode=ro", uri=True)
    except sqlite3.DatabaseError:
        return copied
    source.row_factory = sqlite3.Row
    try:
        try:
            present = {r[0] for r in source.execute(
                "select name from sqlite_master where type = 'table'")}
        except sqlite3.DatabaseError:
            return copied  # not a database at all: nothing to read
        for table in SALVAGED_TABLES:
            if table not in present or not ledger.db[table].exists():
                continue
            columns = set(ledger.db[table].columns_dict)
            rows = _readable_rows(source, table)
            rows = [{k: v for k, v in row.items() if k in columns} for row in rows]
            if table == "meta":
                rows = [r for r in rows if r.get("key") != "schema_version"]
            pk = ledger.db[table].pks
            if rows and pk == ["rowid"]:
                ledger.db[table].insert_all(rows)
            elif rows:
                ledger.db[table].upsert_all(rows, pk=pk)
            copied[table] = len(rows)
    finally:
        source.close()
    return copied


def _readable_rows(source: sqlite3.Connection, table: str, step: int = 256) -> list[dict]:
    try:
        top = source.execute(f"select max(rowid) from [{table}]").fetchone()[0] or 0
    except sqlite3.DatabaseError:
        top = 1 << 20  # the index page is gone: walk a generous range
    rows: list[dict] = []
    for start in range(0, top + 1, step):
        try:
            batch = source.execute(f"select rowid as _rowid, * from [{table}] where rowid "
                                   "between ? and ?", [start, start + step - 1]).fetchall()
        except sqlite3.DatabaseError:
            batch = []
            for rowid in range(start, start + step):  # the bad page: row by row
                try:
                    batch += source.execute(f"select rowid as _rowid, * from [{table}] where "
                                            "rowid = ?", [rowid]).fetchall()
                except sqlite3.DatabaseError:
                    continue
        rows.extend({k: r[k] for k in r.keys() if k != "_rowid"} for r in batch)
    return rows


def _check_blobs(data_dir: Path, report: Report, repair: bool) -> None:
    ledger = Ledger(data_dir / LEDGER_FILE)
    blobs = BlobStore(data_dir / "blobs")
    try:
        kept, _ = ledger.blob_references()
        already_lost = set(ledger.lost_blobs())
        missing, corrupt = [], []
        for sha in sorted(kept - already_lost):
            path = blobs.path(sha)
            if not path.is_file():
                missing.append(sha)
            elif sha256_file(path) != sha:
                corrupt.append(sha)
        rebuilding = ledger.get_meta(REBUILD_META) == "1"
        # While the ledger is rebuilt from the federation, unnamed blobs are kept: the history
        # on its way names them again. Otherwise only blobs no row names, past the GC's grace.
        orphans = set() if rebuilding else orphan_blobs(blobs, ledger.named_blobs(), ORPHAN_GRACE_S)
        ok = not corrupt and not missing
        lost_note = f"; {len(already_lost)} lost, awaiting a peer" if already_lost else ""
        finding = report.add("blobs", ok, f"{len(kept)} named by kept rounds: {len(missing)} "
                             f"missing, {len(corrupt)} corrupt; {len(orphans)} named by no row"
                             + lost_note)
        if repair and (corrupt or orphans or missing):
            quarantine = blobs.root / "quarantine"
            quarantine.mkdir(exist_ok=True)
            for sha in corrupt:
                shutil.move(str(blobs.path(sha)), quarantine / sha)
            ledger.mark_lost({**{sha: "missing" for sha in missing},
                              **{sha: "damaged (quarantined)" for sha in corrupt}})
            for sha in orphans:
                blobs.path(sha).unlink(missing_ok=True)
            finding.repaired = (f"{len(corrupt)} quarantined, {len(corrupt) + len(missing)} "
                                "recorded lost (the node fetches them from a peer; no round "
                                f"is touched), {len(orphans)} unnamed blob(s) deleted")
    finally:
        ledger.close()


def _check_state(data_dir: Path, report: Report, repair: bool) -> None:
    state = data_dir / "state"
    marker = state / "working.json"
    if not marker.exists():
        report.add("state", True, "none yet (built from the log at the next start)")
        return
    try:
        info = json.loads(marker.read_text())
    except ValueError as exc:
        report.add("state", False, f"marker unreadable ({exc}); the node rebuilds the state at "
                   "the next start")
        return
    torn = info.get("applying") is not None
    detail = f"working state at round {info.get('round')}" + (
        ", an update was cut short (rebuilt at the next start)" if torn else "")
    report.add("state", True, detail)
    for meta in sorted((state / "checkpoints").glob("R-*.json")):
        try:
            record = json.loads(meta.read_text())
            data = meta.with_suffix(".safetensors")
            good = data.is_file() and sha256_file(data) == record["sha256"]
        except (ValueError, KeyError, OSError):
            good = False
        finding = report.add("checkpoint", good, f"{meta.stem}: " + (
            "hash verifies" if good else "missing or does not match its hash"))
        if repair and not good:
            meta.with_suffix(".safetensors").unlink(missing_ok=True)
            meta.unlink(missing_ok=True)
            finding.repaired = "removed; the node writes a new one from the log"
