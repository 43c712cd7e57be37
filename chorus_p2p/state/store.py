"""A node's folded-base state ``R``: a dense float32 working file plus one immutable checkpoint.

The replicated log (the ledger's rounds, each with its factored residual ``D``) is the truth; the
state is a materialised view of it, like a database's data files beside its write-ahead log:

- ``working.safetensors`` holds ``R`` after round ``marker.round``. Applying a round is
  ``R += L @ Rt`` per module, read and written back in place one module at a time (one
  GEMM-sized update, never a re-factorisation, never a copy of the state).
- ``working.json`` is the marker, replaced atomically: ``{"round": t}`` when clean,
  ``{"round": t, "applying": t + 1}`` while an update is under way. A ``kill -9`` mid-update
  leaves the marker saying so, and the working file is rebuilt from the checkpoint.
- ``checkpoints/R-<round>.safetensors`` (+ ``.json`` with its sha256) is a byte copy of the
  working file at a round that is a multiple of ``checkpoint_every``. It is what a crashed
  update restarts from and what a late joiner fetches; the residuals after it are kept in the
  blob store until the next checkpoint. Before a new checkpoint is written the old one is
  deleted: the working file is clean and fsynced at that moment, so it is itself the recovery
  point, and the disk never holds more than two dense states.

With no checkpoint yet, round 0 (``R = 0``) is the implicit one. The store does no ledger work:
callers resolve which residual file each round needs and pass it in (``Plan``), so the store can
run in a worker thread while the ledger stays on the event loop.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import torch

from chorus_p2p.atomic import fsync_dir
from chorus_p2p.errors import AdapterError
from chorus_p2p.lora.residual import ResidualFile
from chorus_p2p.state.dense_file import DenseFile, DenseLayout, StateFileError, check_file, \
    create_zero_file
from chorus_p2p.state.sketch import Probes, Sketch

log = logging.getLogger("chorus_p2p.state")

WORKING = "working.safetensors"
MARKER = "working.json"
CHECKPOINTS = "checkpoints"
COPY_CHUNK = 8 << 20
# Test-only fault injection: seconds to sleep between modules of an update and between chunks of
# a checkpoint copy, so a test can kill -9 in the middle of either.
FAULT_APPLY_DELAY_ENV = "CHORUS_FAULT_STATE_APPLY_DELAY"
FAULT_CHECKPOINT_DELAY_ENV = "CHORUS_FAULT_CHECKPOINT_DELAY"

# (round, residual file or None for a round without one, e.g. fedavg): what to apply, in order.
Plan = Sequence[tuple[int, "Path | None"]]


_UNKNOWN = object()


class StateError(Exception):
    """The state cannot be brought to the round asked for (a residual or checkpoint is gone)."""


@dataclass(frozen=True)
class Checkpoint:
    round: int
    path: Path
    sha256: str
    size: int

    def to_json(self) -> dict[str, object]:
        return {"round": self.round, "sha256": self.sha256, "bytes": self.size}


@dataclass(frozen=True)
class PinnedCheckpoint:
    """A checkpoint, and optionally the residuals a plan needs, held open: reads still work
    after the node deleted them (a new checkpoint every ``checkpoint_every`` rounds replaces
    the old one, and garbage collection drops residuals outside the retention window) while an
    export or a pull of ``R`` reads."""
    checkpoint: Checkpoint | None
    file: DenseFile | None
    residuals: dict[Path, ResidualFile] = field(default_factory=dict)

    @property
    def round(self) -> int:
        return self.checkpoint.round if self.checkpoint is not None else 0

    def hold(self, plan: Plan) -> bool:
        """Open every residual of ``plan`` now; False if one is already gone."""
        for _, path in plan:
            if path is not None and path not in self.residuals:
                try:
                    self.residuals[path] = ResidualFile(path)
                except AdapterError:
                    if Path(path).exists():
                        raise
                    return False
        return True


@dataclass
class ApplyReport:
    round: int
    seconds: float
    sketch: Sketch | None


class _ReadWriteLock:
    """Readers (training, export, checkpoint copies) share; an update waits for them."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer and self._readers == 0)
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def _write_json_atomic(path: Path, data: Mapping[str, object]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _delay(env: str) -> float:
    return float(os.environ.get(env, "0") or 0)


def _residual_factors(path: Path) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    with ResidualFile(path) as residual:
        for prefix in residual.modules:
            yield (prefix, *residual.factors(prefix))


class StateStore:
    """One node's ``R``. Thread-safe: updates serialise, reads share a lock with them."""

    def __init__(self, root: str | os.PathLike, modules: Mapping[str, tuple[int, int]],
                 probes: Probes | None = None, *, checkpoint_every: int = 10,
                 read_only: bool = False, transposed: Iterable[str] = ()):
        if checkpoint_every < 1:
            raise ValueError("checkpoint_every must be at least 1")
        self.root = Path(root)
        self.layout = DenseLayout.of(modules, transposed)
        self.probes = probes
        self.checkpoint_every = checkpoint_every
        self.read_only = read_only
        self.working = self.root / WORKING
        self.marker = self.root / MARKER
        self.checkpoint_dir = self.root / CHECKPOINTS
        self._lock = _ReadWriteLock()
        self._scratch: torch.Tensor | None = None  # one module's buffer, for updates
        self._latest: object = _UNKNOWN
        if not read_only:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            for stray in self.checkpoint_dir.glob(".*"):  # a copy cut short by a crash
                stray.unlink(missing_ok=True)
            if not self.marker.exists():
                create_zero_file(self.working, self.layout)
                _write_json_atomic(self.marker, {"round": 0})
        state = self._read_marker()
        self.round: int = int(state["round"])
        self.dirty: bool = state.get("applying") is not None or not self._working_ok()

    # -- what is on disk ---------------------------------------------------------------------
    def _read_marker(self) -> dict[str, object]:
        try:
            return json.loads(self.marker.read_text())
        except FileNotFoundError:
            return {"round": 0, "applying": None, "missing": True}
        except (OSError, ValueError) as exc:
            raise StateError(f"{self.marker}: unreadable ({exc})") from exc

    def _working_ok(self) -> bool:
        try:
            check_file(self.working, self.layout)
            return True
        except StateFileError as exc:
            log.warning("state: %s", exc)
            return False

    def latest_checkpoint(self) -> Checkpoint | None:
        """The newest complete checkpoint (cached: this store is the only writer of its dir)."""
        if self._latest is _UNKNOWN:
            self._latest = self._find_checkpoint()
        return self._latest  # type: ignore[return-value]

    def _find_checkpoint(self) -> Checkpoint | None:
        found = sorted(self.checkpoint_dir.glob("R-*.safetensors")) if \
            self.checkpoint_dir.is_dir() else []
        for path in reversed(found):
            meta = path.with_suffix(".json")
            try:
                info = json.loads(meta.read_text())
                return Checkpoint(int(info["round"]), path, str(info["sha256"]), int(info["bytes"]))
            except (OSError, ValueError, KeyError):
                continue  # its sidecar never got written: the copy did not finish
        return None

    @property
    def recovery_round(self) -> int:
        """The round an interrupted update would restart from: residuals after it must be kept."""
        checkpoint = self.latest_checkpoint()
        if checkpoint is not None:
            return checkpoint.round
        return self.round if not self.dirty else 0

    def disk_bytes(self) -> int:
        total = 0
        for path in self.root.rglob("*"):
            if path.is_file():
                total += path.stat().st_blocks * 512
        return total

    # -- updating ----------------------------------------------------------------------------
    def apply(self, round_no: int, residual: Path | None) -> ApplyReport:
        """``R += D`` for one round, module by module, in place; durable when it returns."""
        if self.read_only:
            raise StateError("this state was opened read-only")
        if self.dirty:
            raise StateError("the working state was interrupted mid-update; restore it first")
        if round_no != self.round + 1:
            raise StateError(f"state is at round {self.round}; cannot apply round {round_no}")
        if self.latest_checkpoint() is None and self.round > 0:
            self.checkpoint()  # never update in place without a recovery point (see module doc)
        started = time.perf_counter()
        sketch: Sketch | None = None
        with self._lock.write():
            if residual is not None:
                _write_json_atomic(self.marker, {"round": self.round, "applying": round_no})
                self.dirty = True
                sketch = self._add_in_place(residual, round_no)
            _write_json_atomic(self.marker, {"round": round_no})
            self.dirty = False
            self._set_round(round_no)
        return ApplyReport(round_no, time.perf_counter() - started, sketch)

    def _add_in_place(self, residual: Path, round_no: int) -> Sketch | None:
        """Read, add, write back one module at a time (one module's memory, reused). The file is
        not fsynced: the working state is a cache of the log. ``kill -9`` loses no page-cache
        write, and after a power cut the start-up check of its fingerprint against the log
        finds a stale file, which is then rebuilt from the (fsynced) checkpoint."""
        delay = _delay(FAULT_APPLY_DELAY_ENV)
        state = DenseFile(self.working, self.layout, writable=True)
        shapes = self.layout.shapes
        if self._scratch is None:
            self._scratch = torch.empty(max(o * i for o, i in shapes.values()))
        # Fingerprint one module per round, in rotation (a full check is a pass over all of R,
        # a third of the update's cost; the keeper checks everything before each checkpoint).
        order = [p for p, _, _ in self.layout.modules]
        check = {order[round_no % len(order)]}
        sketch: Sketch = {}
        for prefix, left, right in _residual_factors(residual):
            if prefix not in shapes:
                raise StateError(f"residual module {prefix} is not part of this state")
            if shapes[prefix] != (left.shape[0], right.shape[1]):
                raise StateError(f"residual for {prefix} is {left.shape[0]}x{right.shape[1]}, "
                                 f"the state is {shapes[prefix][0]}x{shapes[prefix][1]}")
            dense = state.read_module(prefix, self._scratch)
            dense.addmm_(left, right)
            state.write_module(prefix, dense)
            if self.probes is not None and prefix in check:
                sketch[prefix] = self.probes.of_dense(prefix, dense)
            if delay:
                time.sleep(delay)
        return sketch if self.probes is not None else None

    def _set_round(self, round_no: int) -> None:
        self.round = round_no

    def reset_to_checkpoint(self) -> int:
        """Make the working file a copy of the newest checkpoint (or zeros); returns its round.
        The caller replays the rounds after it."""
        checkpoint = self.latest_checkpoint()
        start = checkpoint.round if checkpoint is not None else 0
        with self._lock.write():
            self._replace_working("restore", start, checkpoint.path if checkpoint else None)
        log.info("state reset to %s", f"checkpoint {start}" if checkpoint else "zeros")
        return start

    def _replace_working(self, why: str, round_no: int, source: Path | None) -> None:
        """The one way the working file is replaced wholesale (restore, discard, install): the
        marker says an update is under way, a copy of ``source`` (or zeros) is made durable
        beside it and renamed over it, then the marker says clean at ``round_no``. A kill -9
        at any point leaves a marker that makes the next start rebuild. Holds the write lock
        (the caller's)."""
        _write_json_atomic(self.marker, {"round": self.round if why == "install" else round_no,
                                         "applying": why})
        self.dirty = True
        tmp = self.root / f".{WORKING}.{why}"
        if source is not None:
            shutil.copyfile(source, tmp)
        else:
            create_zero_file(tmp, self.layout)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.working)
        fsync_dir(self.root)
        _write_json_atomic(self.marker, {"round": round_no})
        self.dirty = False
        self._set_round(round_no)

    # -- checkpoints ---------------------------------------------------------------------------
    def _drop_checkpoints(self) -> None:
        for old in list(self.checkpoint_dir.glob("R-*")):
            old.unlink(missing_ok=True)
        self._latest = None

    def discard(self) -> None:
        """Forget this state (its history was replaced): zeros at round 0, no checkpoint. The
        keeper then rebuilds it from the log or from the coordinator's checkpoint."""
        with self._lock.write():
            self._drop_checkpoints()
            self._replace_working("discard", 0, None)

    def checkpoint_due(self) -> bool:
        latest = self.latest_checkpoint()
        return (not self.dirty and self.round > 0 and self.round % self.checkpoint_every == 0
                and (latest is None or latest.round < self.round))

    def checkpoint(self) -> Checkpoint:
        """Copy the clean working file to ``checkpoints/R-<round>`` (hashing it on the way)."""
        if self.dirty:
            raise StateError("cannot checkpoint an interrupted state")
        delay = _delay(FAULT_CHECKPOINT_DELAY_ENV)
        with self._lock.read():
            number = self.round
            # The working file is not fsynced per round; make it durable before it becomes the
            # only recovery point (the old checkpoint goes first, so the disk never holds three).
            DenseFile(self.working, self.layout).sync()
            self._drop_checkpoints()
            name = f"R-{number:08d}.safetensors"
            tmp = self.checkpoint_dir / f".{name}.partial"
            digest = hashlib.sha256()
            size = 0
            with open(self.working, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(COPY_CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                    size += len(chunk)
                    if delay:
                        time.sleep(delay)
                dst.flush()
                os.fsync(dst.fileno())
            final = self.checkpoint_dir / name
            os.replace(tmp, final)
            checkpoint = Checkpoint(number, final, digest.hexdigest(), size)
            _write_json_atomic(final.with_suffix(".json"), checkpoint.to_json())
            self._latest = checkpoint
        return checkpoint

    def install_checkpoint(self, source: Path, round_no: int, sha256: str) -> Checkpoint:
        """Adopt a checkpoint fetched from a peer (already hash-checked by the caller) as both
        the recovery point and the working state."""
        check_file(source, self.layout)
        with self._lock.write():
            self._drop_checkpoints()
            _write_json_atomic(self.marker, {"round": self.round, "applying": "install"})
            self.dirty = True
            final = self.checkpoint_dir / f"R-{round_no:08d}.safetensors"
            os.replace(source, final)
            fsync_dir(self.checkpoint_dir)
            checkpoint = Checkpoint(round_no, final, sha256, final.stat().st_size)
            _write_json_atomic(final.with_suffix(".json"), checkpoint.to_json())
            self._latest = checkpoint
            self._replace_working("install", round_no, final)
        return checkpoint

    def adopt_dense(self, round_no: int, modules: Iterable[tuple[str, torch.Tensor]]
                    ) -> Checkpoint:
        """Make ``R`` after ``round_no`` the given dense modules (a converted 0.1 state): written
        to a new file, hashed, and installed as checkpoint and working state."""
        tmp = self.root / ".adopt.safetensors"
        create_zero_file(tmp, self.layout)
        target = DenseFile(tmp, self.layout, writable=True)
        for prefix, dense in modules:
            target.write_module(prefix, dense.to(torch.float32).contiguous())
        target.sync()
        digest = hashlib.sha256()
        with open(tmp, "rb") as fh:
            while chunk := fh.read(COPY_CHUNK):
                digest.update(chunk)
        return self.install_checkpoint(tmp, round_no, digest.hexdigest())

    # -- reading ---------------------------------------------------------------------------------
    def sketch(self, only: set[str] | None = None) -> Sketch:
        """The fingerprint of the working state (see :mod:`chorus_p2p.state.sketch`)."""
        assert self.probes is not None
        state = DenseFile(self.working, self.layout)
        buffer = torch.empty(max(o * i for _, o, i in self.layout.modules))
        return {p: self.probes.of_dense(p, state.read_module(p, buffer)) for p in state.prefixes()
                if only is None or p in only}

    def pin_checkpoint(self, attempts: int = 3) -> PinnedCheckpoint:
        """The newest checkpoint, opened now (see :class:`PinnedCheckpoint`). A checkpoint
        replaced between listing and opening is looked up again: another process (the running
        node, for an export) may write a new one at any time."""
        for _ in range(attempts):
            checkpoint = self.latest_checkpoint()
            if checkpoint is None:
                return PinnedCheckpoint(None, None)
            try:
                return PinnedCheckpoint(checkpoint, DenseFile(checkpoint.path, self.layout))
            except StateFileError:
                if checkpoint.path.exists():
                    raise
                self._latest = _UNKNOWN  # replaced since it was listed
        raise StateError("the checkpoint was replaced every time it was opened; retry")

    def read(self, round_no: int, plan: Plan = (), pinned: PinnedCheckpoint | None = None
             ) -> Iterator[tuple[str, torch.Tensor]]:
        """``(prefix, R)`` one module at a time (float32 copies) for ``R`` after ``round_no``.

        From the working file when it holds that round (the read lock keeps it there until the
        iteration ends); otherwise from the checkpoint (``pinned``, else the newest) and the
        residuals in ``plan``: forward from a checkpoint at or before ``round_no`` (the rounds
        after it), or, for a round the checkpoint has passed, backward from it (the rounds
        after ``round_no`` up to the checkpoint's, subtracted in float64: an export of the
        best round, often older than the newest checkpoint, works while its residuals are
        kept). Checkpoint and residuals are immutable files, so this is safe while a node
        updates the state.
        """
        with self._lock.read():
            if round_no == self.round and not self.dirty and not self.read_only:
                state = DenseFile(self.working, self.layout)
                for prefix in state.prefixes():
                    yield prefix, state.read_module(prefix)
                return
        yield from self._replayed(round_no, plan, pinned or self.pin_checkpoint())

    def _replayed(self, round_no: int, plan: Plan, pinned: PinnedCheckpoint
                  ) -> Iterator[tuple[str, torch.Tensor]]:
        start = pinned.round
        low, high = sorted((start, round_no))
        steps = [(n, p) for n, p in plan if low < n <= high]
        if [n for n, _ in steps] != list(range(low + 1, high + 1)):
            raise StateError(f"R after round {round_no} needs the residuals of rounds "
                             f"{low + 1}..{high} (this node's checkpoint is of round {start})")
        residuals = [pinned.residuals.get(p) or ResidualFile(p) for _, p in steps
                     if p is not None]
        backward = start > round_no
        try:
            for prefix, d_out, d_in in self.layout.modules:
                if pinned.file is None:
                    dense = torch.zeros(d_out, d_in, dtype=torch.float32)
                else:
                    dense = pinned.file.read_module(prefix)
                if backward:
                    dense = dense.double()
                for residual in residuals:
                    if prefix in residual.modules:
                        left, right = residual.factors(prefix)
                        if backward:
                            dense.sub_(left.double() @ right.double())
                        else:
                            dense.addmm_(left, right)
                yield prefix, dense.float() if backward else dense
        finally:
            for residual in residuals:
                if residual not in pinned.residuals.values():
                    residual.close()

    def write_copy(self, round_no: int, out: Path, plan: Plan = (),
                   pinned: PinnedCheckpoint | None = None) -> int:
        """Write ``R`` after ``round_no`` to ``out`` as a state file; returns its size."""
        tmp = out.with_name(f".{out.name}.partial")
        create_zero_file(tmp, self.layout)
        target = DenseFile(tmp, self.layout, writable=True)
        try:
            for prefix, dense in self.read(round_no, plan, pinned):
                target.write_module(prefix, dense)
            target.sync()
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return out.stat().st_size
