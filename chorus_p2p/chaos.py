"""A Jepsen-style check of a federation on a virtual LAN (tests and ``benchmarks/chaos.py``).

Clients submit updates (unique bytes each) through the SDK while a seeded nemesis partitions
the network (random splits, the coordinator alone, bridges), kills nodes with ``-9`` and
restarts them (some with a skewed clock, inside the allowed window), and flaps links. Every
client records what it was told:

- ``ok``: acknowledged (201/200): must end up in exactly one committed round;
- ``fail``: refused before anything was recorded (e.g. ``not_coordinator``, ``stale_base``,
  ``no_quorum``): must end up in no committed round;
- ``info``: the outcome is unknown (timeout, connection cut, ``not_durable``): at most once.

A sampler reads every reachable node's committed history throughout. At the end the faults
stop, every node is restarted, and the checker verifies: no acknowledged update lost or
counted twice, no committed round ever seen with two different results on any node, every node
holds the same history and a byte-identical state, and the federation still commits new rounds.
"""

from __future__ import annotations

import asyncio
import json
import hashlib
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chorus_p2p.client import AsyncNodeClient, NodeError, NodeUnreachable
from chorus_p2p.netlab import NetLab, NodeProc

# Refusals that come before anything is recorded: the update can never be counted.
DEFINITE_FAILURES = {"not_coordinator", "stale_base", "round_closed", "unknown_round",
                     "no_quorum", "update_conflict", "wrong_shape", "bad_adapter", "non_finite",
                     "too_large", "rate_limited", "unauthenticated", "stale_request"}


@dataclass
class Op:
    client: str
    seq: int
    sha: str
    node: int
    outcome: str = "info"
    round: int | None = None
    code: str | None = None
    at: float = 0.0  # wall clock when the answer came (to find it in the nodes' logs)


@dataclass
class Report:
    operations: int = 0
    acknowledged: int = 0
    refused: int = 0
    unknown: int = 0
    faults: Counter = field(default_factory=Counter)
    lost: list[Op] = field(default_factory=list)
    duplicated: list[Op] = field(default_factory=list)
    refused_but_counted: list[Op] = field(default_factory=list)
    changed_rounds: dict[int, set[str]] = field(default_factory=dict)
    histories_agree: bool = False
    states_agree: bool = False
    committed_rounds: int = 0
    new_round_after_healing: bool = False
    liveness_detail: str = ""  # why no round committed after healing, when none did

    @property
    def ok(self) -> bool:
        return (not self.lost and not self.duplicated and not self.refused_but_counted
                and not self.changed_rounds and self.histories_agree and self.states_agree
                and self.new_round_after_healing)

    def summary(self) -> str:
        faults = ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items()))
        return (f"operations {self.operations}: acknowledged {self.acknowledged}, refused "
                f"{self.refused}, unknown {self.unknown}; faults {sum(self.faults.values())} "
                f"({faults}); committed rounds {self.committed_rounds}; lost "
                f"{len(self.lost)}, counted twice {len(self.duplicated)}, refused but counted "
                f"{len(self.refused_but_counted)}, committed rounds changed "
                f"{len(self.changed_rounds)}; histories agree {self.histories_agree}, states "
                f"agree {self.states_agree}, commits after healing "
                f"{self.new_round_after_healing}"
                + (f" ({self.liveness_detail})" if self.liveness_detail else ""))


def judge(rep: Report, ops: list[Op], counted: Counter, seen: dict[int, set[str]],
          histories: dict[int, list[dict[str, Any]]], nodes: int, state_digests: set[str]
          ) -> Report:
    """The verdict, from what was observed (pure, so it is tested on injected violations).

    ``ops``: every client operation and its outcome; ``counted``: (client, sha) -> how many
    committed rounds list it; ``seen``: round -> every result hash any node ever showed for it;
    ``histories``: node -> its committed rounds, newest first; ``state_digests``: the sha256 of
    each node's working state."""
    first = next(iter(histories.values()), [])
    rep.committed_rounds = max(len(first) - 1, 0)
    # Whole histories, not only heads: a node that lost a middle commit (a stale proposal
    # written over it) still shows the same head, and its loss must not pass as agreement.
    whole = {tuple((r["round"], r["log_hash"]) for r in rows) for rows in histories.values()}
    rep.histories_agree = len(whole) == 1 and len(histories) == nodes
    rep.states_agree = len(state_digests) == 1
    rep.changed_rounds = {n: h for n, h in seen.items() if len(h) > 1}
    for op in ops:
        n = counted[(op.client, op.sha)]
        rep.operations += 1
        if op.outcome == "ok":
            rep.acknowledged += 1
            if n == 0:
                rep.lost.append(op)
        elif op.outcome == "fail":
            rep.refused += 1
            if n:
                rep.refused_but_counted.append(op)
        else:
            rep.unknown += 1
        if n > 1:
            rep.duplicated.append(op)
    return rep


class Chaos:
    def __init__(self, lab: NetLab, data_dirs: list[Path], model: Path, node_args: list[str],
                 secret: bytes, write_update, *, seed: int, clients: int = 3):
        self.lab, self.dirs, self.model, self.node_args = lab, data_dirs, model, node_args
        self.secret, self.write_update = secret, write_update
        self.rng = random.Random(seed)
        self.n = len(data_dirs)
        self.clients = clients
        self.procs: dict[int, NodeProc] = {}
        self.ops: list[Op] = []
        self.report = Report()
        self.seen: dict[int, set[str]] = {}  # round -> log hashes observed anywhere
        self._stop = asyncio.Event()
        self._tmp = data_dirs[0].parent / "chaos-updates"
        self._tmp.mkdir(exist_ok=True)

    # -- nodes ---------------------------------------------------------------------------------
    def start(self, i: int, skew: float = 0.0) -> None:
        env = {"CHORUS_CLOCK_OFFSET_S": str(skew)} if skew else None
        self.procs[i] = self.lab.start(i, self.dirs[i], self.model, self.node_args, env)

    def alive(self) -> list[int]:
        return [i for i, p in self.procs.items() if p.proc.poll() is None]

    def client(self, i: int, cid: str, timeout: float = 10.0) -> AsyncNodeClient:
        return AsyncNodeClient(self.procs[i].url, secret=self.secret, client_id=cid,
                               timeout=timeout)

    async def status(self, i: int) -> dict[str, Any] | None:
        try:
            async with self.client(i, "probe", timeout=3.0) as c:
                return await c.status()
        except (NodeError, NodeUnreachable, OSError, asyncio.TimeoutError):
            return None

    async def coordinator(self) -> int | None:
        for i in self.alive():
            st = await self.status(i)
            if st and st["role"] == "coordinator" and st["quorum"]:
                return i
        return None

    # -- clients -------------------------------------------------------------------------------
    async def _client(self, cid: str) -> None:
        seq = 0
        while not self._stop.is_set():
            seq += 1
            target = await self.coordinator()
            if target is None:
                alive = self.alive()
                if not alive:
                    await asyncio.sleep(0.3)
                    continue
                target = self.rng.choice(alive)
            st = await self.status(target)
            current = st and st.get("current_round")
            if not current:
                await asyncio.sleep(0.3)
                continue
            seed = int.from_bytes(hashlib.sha256(f"{cid}/{seq}".encode()).digest()[:4], "big")
            path = self.write_update(self._tmp / f"{cid}-{seq}.safetensors", seed)
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
            op = Op(cid, seq, sha, target)
            self.ops.append(op)
            try:
                async with self.client(target, cid, timeout=20.0) as c:
                    answer = await c._submit_here(path, current["round"], 1,
                                                  current["trained_from"], {})
                op.outcome, op.round = "ok", answer["round"]
            except NodeError as exc:
                op.code = exc.code
                op.outcome = "fail" if exc.code in DEFINITE_FAILURES else "info"
            except (NodeUnreachable, OSError, asyncio.TimeoutError):
                op.outcome = "info"
            op.at = time.time()
            path.unlink(missing_ok=True)
            await asyncio.sleep(self.rng.uniform(0.05, 0.4))

    # -- the nemesis -----------------------------------------------------------------------------
    async def _nemesis(self, fault_gap: tuple[float, float]) -> None:
        kinds = ["partition", "isolate_coordinator", "bridge", "kill", "skew_restart", "flap",
                 "heal"]
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), self.rng.uniform(*fault_gap))
                return
            except asyncio.TimeoutError:
                pass
            kind = self.rng.choice(kinds)
            self.report.faults[kind] += 1
            if kind == "heal":
                await asyncio.to_thread(self.lab.heal)
            elif kind == "partition":
                await asyncio.to_thread(self.lab.heal)
                nodes = list(range(self.n))
                self.rng.shuffle(nodes)
                cut = self.rng.randint(1, self.n - 1)
                await asyncio.to_thread(self.lab.partition, set(nodes[:cut]), set(nodes[cut:]))
            elif kind == "isolate_coordinator":
                leader = await self.coordinator()
                if leader is not None:
                    await asyncio.to_thread(self.lab.heal)
                    await asyncio.to_thread(self.lab.partition, {leader},
                                            set(range(self.n)) - {leader})
            elif kind == "bridge":
                await asyncio.to_thread(self.lab.heal)
                a, b = self.rng.sample(range(self.n), 2)  # a and b cannot talk; others can
                await asyncio.to_thread(self.lab.block, a, b)
            elif kind == "flap":
                i = self.rng.randrange(self.n)
                await asyncio.to_thread(self.lab.link, i, False)
                await asyncio.sleep(self.rng.uniform(0.3, 2.0))
                await asyncio.to_thread(self.lab.link, i, True)
            elif kind in ("kill", "skew_restart"):
                alive = self.alive()
                if len(alive) <= self.n // 2 + 1:
                    continue  # keep a majority of processes: the point is faults, not an outage
                i = self.rng.choice(alive)
                await asyncio.to_thread(self.procs[i].kill9)
                await asyncio.sleep(self.rng.uniform(0.5, 3.0))
                skew = self.rng.choice([-120.0, 120.0]) if kind == "skew_restart" else 0.0
                self.start(i, skew)

    async def _sampler(self) -> None:
        while not self._stop.is_set():
            await self._observe()
            try:
                await asyncio.wait_for(self._stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass

    async def _observe(self) -> dict[int, list[dict[str, Any]]]:
        """Every reachable node's committed rounds; each observed (round, log hash) recorded."""
        out = {}
        for i in self.alive():
            try:
                async with self.client(i, "sampler", timeout=5.0) as c:
                    rounds = [r for r in await c.all_rounds() if r["state"] == "committed"]
            except (NodeError, NodeUnreachable, OSError, asyncio.TimeoutError):
                continue
            out[i] = rounds
            for r in rounds:
                self.seen.setdefault(r["round"], set()).add(r["log_hash"])
        return out

    # -- the run ---------------------------------------------------------------------------------
    async def run(self, duration_s: float, fault_gap: tuple[float, float] = (1.5, 4.0),
                  settle_s: float = 90.0) -> Report:
        for i in range(self.n):
            self.start(i)
        await self._wait(lambda: self.coordinator(), 60, "a first coordinator")
        tasks = [asyncio.ensure_future(self._client(f"c{k}")) for k in range(self.clients)]
        tasks += [asyncio.ensure_future(self._nemesis(fault_gap)),
                  asyncio.ensure_future(self._sampler())]
        await asyncio.sleep(duration_s)
        self._stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Heal everything and restart every node (on the right clock); finish the round in
        # flight with no new one opening, so every node can be compared at rest.
        await asyncio.to_thread(self.lab.heal)
        for i in list(self.procs):
            await asyncio.to_thread(self.procs[i].terminate)
            self.start(i)
        leader = await self._wait(self.coordinator, settle_s, "a coordinator after healing")
        async with self._admin(leader) as admin:
            await admin.pause()
            current = (await admin.status())["current_round"]
            if current and current["updates"]:
                try:
                    await admin.close_round()
                except NodeError:
                    pass  # already aggregating
        await self._converge(settle_s)
        await self._check()
        return self.report

    def _admin(self, i: int) -> AsyncNodeClient:
        return AsyncNodeClient.from_data_dir(self.dirs[i], self.procs[i].url, timeout=30.0)

    async def _wait(self, probe, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = await probe()
            if value is not None and value is not False:
                return value
            await asyncio.sleep(0.3)
        raise AssertionError(f"chaos: no {what} within {timeout:.0f}s")

    async def _converge(self, timeout: float) -> None:
        async def agreed():
            leader = await self.coordinator()
            st = leader is not None and await self.status(leader)
            if not st or (st["current_round"] and st["current_round"]["updates"]):
                return None  # a round is still on its way to commit
            histories = await self._observe()
            if len(histories) < self.n:
                return None
            heads = {(rows[0]["round"], rows[0]["log_hash"]) for rows in histories.values()}
            for i, rows in histories.items():
                state = await self._state(i)
                if not state or state["round"] != rows[0]["round"] or state["diverged"]:
                    return None
            return leader if len(heads) == 1 else None
        try:
            await self._wait(agreed, timeout, "convergence after healing")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{await self.diagnose()}") from None

    async def diagnose(self) -> str:
        """What each node says about itself, and its last warnings: why it did not converge."""
        lines = []
        for i in sorted(self.procs):
            st = await self.status(i) or {}
            state = await self._state(i) or {}
            current = st.get("current_round") or {}
            latest = st.get("latest_committed") or {}
            lines.append(
                f"node {i}: alive={self.procs[i].proc.poll() is None} role={st.get('role')} "
                f"term={st.get('term')} coordinator={str(st.get('coordinator'))[:12]} "
                f"quorum={st.get('quorum')} committed={latest.get('round')} "
                f"current={current.get('round')}/{current.get('state')}/"
                f"{current.get('updates')} state_round={state.get('round')} "
                f"diverged={state.get('diverged')}")
            noisy = [e for e in self.procs[i].events
                     if e.get("level") in ("warning", "error") or "raw" in e][-12:]
            lines += [f"    {json.dumps(e)[:300]}" for e in noisy]
        return "\n".join(lines)

    def save_logs(self) -> None:
        """Each node's JSON log next to its data dir (kept when a run fails)."""
        for i, proc in self.procs.items():
            with open(Path(self.dirs[i]).with_suffix(".log.jsonl"), "w") as out:
                for event in list(proc.events):
                    out.write(json.dumps(event) + "\n")

    async def _open_round(self, i: int) -> dict[str, Any] | None:
        st = await self.status(i)
        return st if st and st["current_round"] else None

    async def _state(self, i: int) -> dict[str, Any] | None:
        try:
            async with self.client(i, "probe", timeout=5.0) as c:
                return await c.state()
        except (NodeError, NodeUnreachable, OSError, asyncio.TimeoutError):
            return None

    async def _check(self) -> None:
        rep = self.report
        histories = await self._observe()
        first = next(iter(histories.values()))
        digests = {hashlib.sha256((d / "state" / "working.safetensors").read_bytes()).hexdigest()
                   for d in self.dirs}
        leader = await self.coordinator()
        counted: Counter = Counter()
        async with self.client(leader, "checker", timeout=20.0) as c:
            for row in first:
                if row["round"] == 0:
                    continue
                for update in (await self._round_detail(c, row["round"]))["updates"]:
                    counted[(update["node_id"], update["blob_sha"])] += 1
        judge(rep, self.ops, counted, self.seen, histories, self.n, digests)
        async with self._admin(leader) as admin:
            await admin.resume()
        rep.new_round_after_healing = await self._commits_again(leader)

    @staticmethod
    async def _round_detail(c: AsyncNodeClient, number: int) -> dict[str, Any]:
        """One round's record, within the node's per-caller rate limit: a 30-minute run
        commits thousands of rounds, and the checker reads every one (bounded retries)."""
        for _attempt in range(60):
            try:
                return await c.round(number)
            except NodeError as exc:
                if getattr(exc, "code", None) != "rate_limited":
                    raise
                await asyncio.sleep(1.0)
        raise RuntimeError(f"round {number}: still rate limited after 60 s")

    async def _commits_again(self, leader: int) -> bool:
        """The federation is not stuck: fresh updates make a new round commit.

        The round may close as soon as it holds `min_updates` (its deadline can pass while
        the checker reads history), so a later submit refused as `round_closed` is expected
        and ends the submitting, not the check. Any other refusal is a liveness failure,
        kept with its reason in the report."""
        st = await self._wait(lambda: self._open_round(leader), 30, "a round to open")
        number = st["current_round"]["round"]
        sent = 0
        for k in range(max(2, st["current_round"]["expected"])):
            path = self.write_update(self._tmp / f"final-{k}.safetensors", 10_000 + k)
            async with self.client(leader, f"final{k}", timeout=30.0) as c:
                try:
                    await c._submit_here(path, number, 1, st["current_round"]["trained_from"], {})
                    sent += 1
                except NodeError as exc:
                    if getattr(exc, "code", None) == "round_closed" and sent:
                        break
                    self.report.liveness_detail = f"submit {k} to round {number}: {exc}"
                    return False

        async def committed():
            async with self.client(leader, "checker", timeout=5.0) as c:
                return (await c.round(number))["state"] == "committed" or None
        try:
            await self._wait(committed, 60, f"round {number} to commit")
        except AssertionError as exc:
            self.report.liveness_detail = f"{exc} after {sent} update(s)"
            return False
        return True
