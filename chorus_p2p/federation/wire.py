"""The peer protocol's messages and records, versioned: what one node may send another.

Every peer request carries ``X-Chorus-Wire: N``. Within one version a message may gain fields
(an older node drops what it does not know and reads the rest); a change an older node cannot
ignore bumps ``WIRE_VERSION``, and then the two refuse each other with ``wire_version``, naming
both versions, instead of misreading each other. A request without the header is version 1 (the
format before the header existed).

Nothing a peer sends reaches the ledger as it came: rounds and updates are read through
:func:`read_round` and :func:`read_update`, which keep the known fields, check their types and
drop the rest. ``tests/test_wire_format.py`` holds these declarations against the golden file of
their version, and what running nodes send against these declarations.
"""

from __future__ import annotations

from typing import Any

WIRE_VERSION = 1
WIRE_HEADER = "X-Chorus-Wire"
FIRST_VERSION = 1  # what a request without the header speaks

OPTIONAL = object()  # the field may be absent
_NUMBER = (int, float)


class WireError(ValueError):
    """A peer message that is not of the shape this version defines."""


# -- records: a round and an update, as served and replicated ----------------------------------
ROUND_FIELDS: dict[str, Any] = {
    "round": int, "term": (int, None), "coordinator": (str, None), "state": str,
    "strategy": (str, None), "config": (dict, None), "trained_from": (int, None),
    "opened_at": (*_NUMBER, None), "deadline_at": (*_NUMBER, None),
    "aggregating_at": (*_NUMBER, None), "committed_at": (*_NUMBER, None),
    "adapter_sha": (str, None), "adapter_config_sha": (str, None), "residual_sha": (str, None),
    "state_sketch": (str, None), "log_hash": (str, None), "metrics": (dict, None),
}
UPDATE_FIELDS: dict[str, Any] = {
    "round": int, "node_id": str, "blob_sha": str, "examples": int, "trained_from": (int, None),
    "size": (int, None), "norm": (*_NUMBER, None), "received_at": (*_NUMBER, None),
    "eval_loss": (*_NUMBER, None, OPTIONAL), "train_loss": (*_NUMBER, None, OPTIONAL),
    "status": (str, None, OPTIONAL), "reason": (str, None, OPTIONAL),
    "term": (int, None, OPTIONAL),
}
MEMBER_FIELDS: dict[str, Any] = {
    "node_id": str, "url": (str, OPTIONAL), "status": (str, OPTIONAL),
    "name": (str, None, OPTIONAL), "public_key": (str, None, OPTIONAL),
}

# -- messages: the body of each POST /v1/peer/<kind> ------------------------------------------------
MESSAGES: dict[str, dict[str, Any]] = {
    "hello": {"node_id": str, "url": str, "federation": str, "fingerprint": str,
              "members": (list, OPTIONAL), "name": (str, OPTIONAL),
              "public_key": (str, OPTIONAL), "dp_policy": (dict, None, OPTIONAL),
              "term": (int, OPTIONAL), "role": (str, OPTIONAL),
              "coordinator": (str, None, OPTIONAL), "joined": (bool, OPTIONAL)},
    "vote": {"term": int, "candidate": str, "url": str, "last_term": int, "last_round": int,
             "last_closed": (bool, OPTIONAL), "pre": (bool, OPTIONAL),
             "transfer": (bool, OPTIONAL)},
    "hold": {"term": int, "coordinator": str, "url": str, "current": dict},
    "handoff": {"update": dict},
    "append": {"term": int, "coordinator": str, "url": str, "commit": int,
               "commit_id": (str, None, OPTIONAL),
               "members": (list, OPTIONAL), "proposal": (dict, None), "current": (dict, None),
               "state": (dict, None, OPTIONAL), "paused": (bool, OPTIONAL),
               "pause": (list, OPTIONAL)},
    "leave": {"node_id": str},
    "timeout-now": {"term": int},
    "evaluation": {"node_id": str, "evaluations": list},
}
# -- answers: what the callee returns and the caller reads back -----------------------------------
ANSWERS: dict[str, dict[str, Any]] = {
    "hello": MESSAGES["hello"],
    "vote": {"term": int, "granted": bool, "pause": (list, OPTIONAL)},
    "append": {"term": int, "ok": bool, "diverged": (bool, OPTIONAL), "node_id": (str, OPTIONAL),
               "ack": (dict, None, OPTIONAL), "abstaining": (bool, OPTIONAL),
               "pause": (list, OPTIONAL)},
    "hold": {"term": int, "held": list},
    "handoff": {"adopted": bool},
    "leave": {"ok": bool},
    "timeout-now": {"ok": bool},
    "evaluation": {"recorded": int},
    "history": {"rounds": list, "updates": list},
    "round-updates": {"round": int, "trained_from": (int, None, OPTIONAL), "updates": list},
}

# Which field names the sender: it must be the node that signed the request.
SENDER_FIELD = {"hello": "node_id", "vote": "candidate", "append": "coordinator",
                "leave": "node_id", "hold": "coordinator", "evaluation": "node_id"}


def type_ok(value: Any, kinds: tuple) -> bool:
    """``value`` is one of ``kinds`` (types, None for null); a bool is not an int here."""
    allowed = tuple(k for k in kinds if isinstance(k, type))
    return (value is None and None in kinds) or (
        isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed))


def check(body: Any, fields: dict[str, Any], what: str) -> dict[str, Any]:
    """``body`` if it has every required field with an allowed type (extra fields pass: a newer
    node of the same version may add some), else :class:`WireError` naming the field."""
    if not isinstance(body, dict):
        raise WireError(f"{what}: expected a JSON object")
    for key, spec in fields.items():
        kinds = spec if isinstance(spec, tuple) else (spec,)
        if key not in body:
            if OPTIONAL in kinds or None in kinds:
                continue
            raise WireError(f"{what}: missing field {key!r}")
        if not type_ok(body[key], kinds):
            raise WireError(f"{what}: field {key!r} has the wrong type")
    for member in body.get("members") or []:
        check(member, MEMBER_FIELDS, f"{what} member")
    return body


def check_message(kind: str, body: Any) -> dict[str, Any]:
    """A peer message, checked, with the records it carries read (known fields only)."""
    body = check(body, MESSAGES[kind], f"peer {kind}")
    for field, reader in _CARRIED.get(kind, {}).items():
        if body.get(field) is not None:
            body[field] = reader(body[field], f"peer {kind} {field}")
    return body


def _known(row: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    return {k: row.get(k) for k in fields}


def round_record(row: dict[str, Any]) -> dict[str, Any]:
    """A ledger round row as it is served and replicated: the same fields on every node."""
    return _known(row, ROUND_FIELDS)


def update_record(row: dict[str, Any]) -> dict[str, Any]:
    """A ledger update row as it is served and replicated."""
    return _known(row, UPDATE_FIELDS)


def read_round(data: Any, what: str = "round") -> dict[str, Any]:
    """A peer's round record, checked, with only the fields this version knows."""
    return round_record(check(data, ROUND_FIELDS, what))


def read_update(data: Any, what: str = "update") -> dict[str, Any]:
    """A peer's update record, checked, with only the fields this version knows."""
    return update_record(check(data, UPDATE_FIELDS, what))


def live_round(row: dict[str, Any], updates: list[dict[str, Any]]) -> dict[str, Any]:
    """A round that is not committed yet travels with its updates: a follower that becomes
    coordinator before the commit must be able to re-propose it whole."""
    return {**round_record(row), "updates": [update_record(u) for u in updates]}


def read_live_round(data: Any, what: str = "round") -> dict[str, Any]:
    record = read_round(data, what)
    updates = data.get("updates") or []
    if not isinstance(updates, list):
        raise WireError(f"{what}: field 'updates' has the wrong type")
    record["updates"] = [read_update(u, f"{what} update") for u in updates]
    return record


def read_history(data: Any) -> dict[str, Any]:
    """The answer to GET /v1/peer/history: committed rounds and their updates."""
    check(data, {"rounds": list, "updates": list}, "history")
    return {"rounds": [read_round(r, "history round") for r in data["rounds"]],
            "updates": [read_update(u, "history update") for u in data["updates"]]}


_CARRIED = {"hold": {"current": read_live_round},
            "append": {"proposal": read_live_round, "current": read_live_round},
            "handoff": {"update": read_update}}


def version_of(header: str | None) -> int | None:
    """The wire version a request's header names (none: the first); None if unreadable."""
    if header is None:
        return FIRST_VERSION
    try:
        return int(header)
    except ValueError:
        return None


def incompatible(theirs: int | None, ours: int = WIRE_VERSION) -> str | None:
    """Why a peer speaking ``theirs`` cannot talk to us, or None if it can."""
    if theirs == ours:
        return None
    from chorus_p2p import __version__

    said = "an unreadable wire version" if theirs is None else f"wire version {theirs}"
    return (f"this node (chorus-p2p {__version__}) speaks wire version {ours} and the caller "
            f"{said}: run the same chorus-p2p release on every member (upgrade the older one)")
