"""The peer protocol as a versioned format (federation/wire.py): the messages running nodes
send match the declared schema field for field, the schema matches the golden file of its
version, a node of another wire version is refused in words, and a follower ingests only the
fields it knows (a newer node's extra field never reaches its ledger)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chorus_p2p.federation import wire
from chorus_p2p.node.peers import PeerClient

from nodeutil import EventTap, run_round, wait_for, write_update

pytestmark = pytest.mark.timeout(180)

GOLDEN = Path(__file__).parent / "golden" / f"wire-v{wire.WIRE_VERSION}.json"
TYPE_NAMES = {int: "int", float: "float", str: "str", bool: "bool", dict: "object",
              list: "array", None: "null"}


def _render(fields: dict) -> dict:
    out = {}
    for key, spec in fields.items():
        kinds = spec if isinstance(spec, tuple) else (spec,)
        names = sorted(TYPE_NAMES[k] for k in kinds if k is not wire.OPTIONAL)
        out[key] = {"types": names, "required": wire.OPTIONAL not in kinds and None not in kinds}
    return out


def declared() -> dict:
    """The schema as the code declares it, in the golden file's form."""
    return {"wire_version": wire.WIRE_VERSION, "header": wire.WIRE_HEADER,
            "messages": {kind: _render(fields) for kind, fields in sorted(wire.MESSAGES.items())},
            "records": {"round": _render(wire.ROUND_FIELDS),
                        "update": _render(wire.UPDATE_FIELDS),
                        "member": _render(wire.MEMBER_FIELDS)},
            "answers": {kind: _render(fields) for kind, fields in sorted(wire.ANSWERS.items())}}


def test_the_schema_is_the_golden_file_of_its_version():
    """A change to what peers send shows up here. Adding an optional field keeps the version
    (older nodes drop it): regenerate the golden file. Removing or retyping a field, or making
    one required, breaks older nodes: raise WIRE_VERSION and add wire-v<N>.json."""
    assert json.loads(GOLDEN.read_text()) == declared(), (
        f"the peer schema changed; if that is intended, write the new one to {GOLDEN.name} "
        "(python -c 'import json,sys; sys.path[:0]=[\"tests\"]; import test_wire_format as t; "
        "print(json.dumps(t.declared(), indent=1, sort_keys=True))') and read the docstring")


def _shape_problems(value, fields: dict, what: str) -> list[str]:
    """Fields a real message carries that the schema does not declare, or of another type."""
    problems = []
    for key, item in value.items():
        if key not in fields:
            problems.append(f"{what}: undeclared field {key!r}")
            continue
        spec = fields[key]
        kinds = spec if isinstance(spec, tuple) else (spec,)
        if not wire.type_ok(item, kinds):
            problems.append(f"{what}: {key!r} is {type(item).__name__}")
    try:
        wire.check(value, fields, what)
    except wire.WireError as exc:
        problems.append(str(exc))
    return problems


def _record_problems(kind: str, body: dict, direction: str) -> list[str]:
    problems = []
    if direction == "body":
        problems += _shape_problems(body, wire.MESSAGES[kind], kind)
        for field in ("proposal", "current"):
            if isinstance(body.get(field), dict):
                record = dict(body[field])
                for update in record.pop("updates", []):
                    problems += _shape_problems(update, wire.UPDATE_FIELDS, f"{kind}.{field} update")
                problems += _shape_problems(record, wire.ROUND_FIELDS, f"{kind}.{field}")
        if isinstance(body.get("update"), dict):
            problems += _shape_problems(body["update"], wire.UPDATE_FIELDS, f"{kind}.update")
        for member in body.get("members") or []:
            problems += _shape_problems(member, wire.MEMBER_FIELDS, f"{kind} member")
    else:
        problems += _shape_problems(body, wire.ANSWERS[kind], f"{kind} answer")
        if kind == "hello":
            for member in body.get("members") or []:
                problems += _shape_problems(member, wire.MEMBER_FIELDS, "hello answer member")
        for row in body.get("rounds", []):
            problems += _shape_problems(row, wire.ROUND_FIELDS, f"{kind} round")
        for row in body.get("updates", []):
            problems += _shape_problems(row, wire.UPDATE_FIELDS, f"{kind} update")
    return problems


async def test_what_running_nodes_send_is_what_the_schema_declares(federation, monkeypatch):
    """Every peer message (and the two answers a node reads back) captured from three nodes on
    loopback through: rounds with acknowledged updates, a graceful hand-over with a round
    collecting, its recovery by the new coordinator, and a restarted node catching up."""
    captured: list[tuple[str, str, dict]] = []
    call = PeerClient.call

    async def recording(self, url, method, path, body=None, **kwargs):
        reply = await call(self, url, method, path, body, **kwargs)
        kind = path.split("?")[0].rsplit("/", 1)[-1]
        if isinstance(body, dict):
            captured.append((kind, "body", json.loads(json.dumps(body))))
        if isinstance(reply, dict):
            captured.append((kind, "reply", reply))
        return reply

    monkeypatch.setattr(PeerClient, "call", recording)
    fed = federation(3, min_updates=2)
    leader = await fed.start_all()
    await run_round(fed, leader, 1, clients=("a", "b"))
    async with fed.client(leader, "a") as c:  # round 2 collecting, one update in
        await c.submit(write_update(fed.tmp_path / "2a.safetensors", leader.spec, 21))
    old = next(i for i, n in fed.nodes.items() if n is leader)
    await fed.stop(old)  # hands over: timeout-now, leave; the new one recovers round 2
    leader = await fed.one_coordinator()
    async with fed.client(leader, "b") as c:
        await c.submit(write_update(fed.tmp_path / "2b.safetensors", leader.spec, 22))
    await wait_for(lambda: leader.ledger.round(2)["state"] == "committed", timeout=60)
    back = await fed.start(old)  # behind by a round: catches up from the history
    await wait_for(lambda: back.ledger.committed_round() >= 2, timeout=60)

    kinds = {(kind, direction) for kind, direction, _ in captured}
    # not here: evaluation (nodes with --eval-data) and handoff (a follower holding an update
    # the coordinator lacks); test_cluster_loopback and test_no_loss send those
    for kind in set(wire.MESSAGES) - {"evaluation", "handoff"}:
        assert (kind, "body") in kinds, (kind, sorted(kinds))
    for kind in set(wire.ANSWERS) - {"evaluation", "handoff"}:
        assert (kind, "reply") in kinds, (kind, sorted(kinds))
    problems = sorted({p for kind, direction, body in captured
                       for p in _record_problems(kind, body, direction)})
    assert problems == [], "\n".join(problems)


async def test_a_node_of_another_wire_version_is_refused_naming_both(federation):
    """A lab upgrading one machine at a time: the upgraded node (wire version 2 here) and the
    others refuse each other with ``wire_version``, each side saying both versions, instead of
    misreading each other's messages; the newcomer that never took part stops with the reason."""
    fed = federation(2)
    older = await fed.start(0)
    events = EventTap(older)
    newer = await fed.start(1, wire_version=wire.WIRE_VERSION + 1)
    await wait_for(lambda: newer.fatal_reason is not None, timeout=60)
    assert "wire version 2" in newer.fatal_reason and "wire version 1" in newer.fatal_reason
    assert "upgrade the older one" in newer.fatal_reason
    await wait_for(lambda: "peer_refused" in events.kinds(), timeout=30)
    (refused, *_) = [e for e in events.events if e["kind"] == "peer_refused"]
    assert refused["data"]["code"] == "wire_version"
    assert refused["data"]["node_id"] == newer.node_id
    assert "wire version 1" in refused["data"]["reason"]
    assert newer.node_id not in {p.node_id for p in older.cluster.voters()}


def test_a_newer_nodes_extra_fields_are_dropped_not_ingested(tmp_path):
    """Within a version a message may gain fields. A follower reads records through the wire
    module, which keeps the fields it knows: the raw row would not even fit its ledger."""
    from chorus_p2p.node.ledger import Ledger

    round_row = {"round": 1, "term": 1, "coordinator": "c" * 32, "state": "committed",
                 "strategy": "fedex", "config": {}, "trained_from": 0, "opened_at": 1.0,
                 "deadline_at": 2.0, "aggregating_at": 1.5, "committed_at": 1.6,
                 "adapter_sha": "a" * 64, "adapter_config_sha": "b" * 64,
                 "residual_sha": "d" * 64, "state_sketch": "", "log_hash": "e" * 64,
                 "metrics": {}, "added_in_a_later_release": [1, 2]}
    update_row = {"round": 1, "node_id": "n" * 32, "blob_sha": "f" * 64, "examples": 3,
                  "trained_from": 0, "size": 10, "norm": 0.5, "received_at": 1.2,
                  "status": "accepted", "reason": None, "term": 1, "signed_by": "x"}
    answer = {"rounds": [round_row], "updates": [update_row], "next": None}
    read = wire.read_history(answer)
    assert "added_in_a_later_release" not in read["rounds"][0]
    assert "signed_by" not in read["updates"][0]
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        with pytest.raises(Exception, match="signed_by|no column"):  # what raw rows did
            ledger.settle_committed([dict(round_row)], [dict(update_row)])
        ledger.settle_committed(read["rounds"], read["updates"])
        assert ledger.round(1)["log_hash"] == "e" * 64
        assert ledger.update(1, "n" * 32)["examples"] == 3
    finally:
        ledger.close()
    with pytest.raises(wire.WireError, match="'examples' has the wrong type"):
        wire.read_update({**update_row, "examples": "3"})
    with pytest.raises(wire.WireError, match="missing field 'blob_sha'"):
        wire.read_update({k: v for k, v in update_row.items() if k != "blob_sha"})
