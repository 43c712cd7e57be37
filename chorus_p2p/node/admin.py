"""Federation-wide admin actions, carried out on the coordinator wherever the admin is attached.

An admin holds the admin token of *their* node. Closing a round, pausing, admitting a member or
excluding an update are decisions of the coordinator, which moves between nodes at every
election. So a follower that receives such an action from its own admin forwards it to the
coordinator over the signed peer channel (``/v1/peer/admin``). The forward is logged and
published as an event on both sides, so the federation sees who did what.

Membership is not authority: a token holder can run a node and holds that node's admin token.
So a federation-wide action runs only where the originating node holds the federation's admin
key (``federation-admin.key``, the founder's, copied by the founder to whom it trusts): a
forward carries a signature by that key over the action, the coordinator it is for, the
forwarding node and the time, and the coordinator checks it against the admin public key every
member has from its join token. A federation made before admin keys keeps the old rule (any
verified voting member), and ``--no-remote-admin`` still refuses every forward.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from chorus_p2p.federation.refusals import UpdateRejected
from chorus_p2p.node.events import EventBus
from chorus_p2p.node.peers import PeerError
from chorus_p2p.trust.identity import NodeIdentity

if TYPE_CHECKING:
    from chorus_p2p.node.cluster import Cluster
    from chorus_p2p.node.rounds import RoundManager

log = logging.getLogger("chorus_p2p.admin")  # under the node's logger: --headless and -v see it

ACTIONS = ("close_round", "pause", "resume", "approve", "reject", "exclude")
FORWARD_TIMEOUT_S = 30.0
# Refusals of the signed peer channel itself (a clock off, a key not yet known, a replay): the
# admin's own request was fine, so they are reported as the coordinator's failure, not passed on
# as if the admin had sent a bad or unauthenticated request.
PEER_CHANNEL_CODES = frozenset({"unauthenticated", "bad_signature", "stale_request", "replayed",
                                "wrong_destination", "bad_identity", "not_member", "rate_limited",
                                "bad_request", "body_mismatch", "too_large",
                                "unsupported_media_type", "bad_peer"})


PROOF_MAX_AGE_S = 120.0


def _proof_message(action: str, args: dict[str, Any], coordinator: str, by: str,
                   ts: float) -> bytes:
    return json.dumps({"action": action, "args": args, "to": coordinator, "by": by, "ts": ts},
                      sort_keys=True, separators=(",", ":")).encode()


class AdminService:
    """The admin actions of one node. Its parts come in through the constructor (the round
    manager and the cluster decide, the identity signs and checks, the bus tells), never the
    node object: what an admin action may touch is written here, in one place."""

    def __init__(self, rounds: "RoundManager", cluster: "Cluster", identity: NodeIdentity,
                 bus: EventBus, *, remote_admin: bool):
        self.rounds = rounds
        self.cluster = cluster
        self.identity = identity
        self.bus = bus
        self.remote_admin = remote_admin

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    async def run_here(self, action: str, args: dict[str, Any]) -> dict[str, Any]:
        """Run an admin action on this node (raises ``not_coordinator`` on a follower)."""
        rounds, cluster = self.rounds, self.cluster
        if action == "close_round":
            expected = args.get("round")
            if expected is not None and (not isinstance(expected, int)
                                         or isinstance(expected, bool)):
                raise UpdateRejected("bad_request", "close_round: 'round' must be an integer")
            return {"round": await rounds.close_now(expected), "state": "aggregating"}
        if action in ("pause", "resume"):
            # answered once a majority holds it, so a successor keeps it (consensus.pause)
            stamp = rounds.decide_pause(action == "pause")
            await cluster.confirm_pause(stamp)
            return {"paused": stamp.paused}
        if action in ("approve", "reject"):
            return cluster.decide(_text(args, "node_id"), action == "approve")
        if action == "exclude":
            number = args.get("round")
            if not isinstance(number, int) or isinstance(number, bool):
                raise UpdateRejected("bad_request", "exclude: 'round' must be an integer")
            return await rounds.exclude(number, _text(args, "node_id"),
                                        _text(args, "reason")[:500] or "excluded by an admin")
        raise UpdateRejected("bad_request", f"unknown admin action {action!r}; one of "
                             f"{', '.join(ACTIONS)}")

    def require_admin_key(self) -> None:
        """Federation-wide actions originate only on a node that holds the admin key."""
        if not self.identity.is_admin:
            raise UpdateRejected("forbidden", "this node holds no federation admin key "
                                 "(federation-admin.key): membership does not make an admin. "
                                 "Run the action on the founder's node, or have the founder copy "
                                 "its federation-admin.key into this data dir (mode 0600)")

    def sign_proof(self, action: str, args: dict[str, Any], coordinator: str
                   ) -> dict[str, Any] | None:
        key = self.identity.admin_key
        if key is None:
            return None
        ts = time.time()
        return {"ts": ts, "sig": key.sign(_proof_message(action, args, coordinator,
                                                         self.node_id, ts)).hex()}

    def check_proof(self, caller: str, action: str, args: dict[str, Any], proof: Any) -> None:
        """A forwarded action is the admin's if the admin key signed it, for us, from
        ``caller``."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        public = self.identity.admin_public_key
        if public is None:
            return  # a federation made before admin keys: membership is the rule there
        try:
            ts = float(proof["ts"])
            Ed25519PublicKey.from_public_bytes(public).verify(
                bytes.fromhex(proof["sig"]),
                _proof_message(action, args, self.node_id, caller, ts))
        except (InvalidSignature, KeyError, TypeError, ValueError):
            raise UpdateRejected("forbidden", "a forwarded admin action needs the federation "
                                 "admin key's signature; the forwarding node holds no admin key")
        if abs(time.time() - ts) > PROOF_MAX_AGE_S:
            raise UpdateRejected("forbidden", "the admin signature is too old (check the "
                                 "clocks)")

    async def run_on_coordinator(self, action: str, args: dict[str, Any]) -> dict[str, Any]:
        """Run it here if this node coordinates, else forward it to the coordinator.

        The role can move while the forward is in flight (an election on a loaded LAN). When the
        node we forwarded to answers that it no longer coordinates, we wait, for at most two
        election timeouts, for the federation to name another one and forward once more, so an
        admin's "pause" does not fail just because it raced an election."""
        self.require_admin_key()
        tried: set[str] = set()
        for _attempt in range(2):
            try:
                return await self.run_here(action, args)
            except UpdateRejected as exc:
                if exc.code != "not_coordinator":
                    raise
                coordinator, url = await self._known_coordinator(tried)
                if not coordinator or not url or coordinator == self.node_id:
                    raise
            tried.add(coordinator)
            try:
                return await self._forward(coordinator, url, action, args)
            except UpdateRejected as exc:
                if exc.code != "not_coordinator" or len(tried) > 1:
                    raise
        raise AssertionError("unreachable")  # the loop returns or raises

    async def _known_coordinator(self, tried: set[str]) -> tuple[str | None, str | None]:
        """The coordinator this node follows, other than ones that already said they are not."""
        deadline = time.monotonic() + (2 * self.cluster.timing.election_max_s if tried else 0)
        while True:
            coordinator, url = self.cluster.coordinator, self.cluster.coordinator_url
            if (coordinator and coordinator not in tried) or time.monotonic() >= deadline:
                return (coordinator, url) if coordinator not in tried else (None, None)
            await asyncio.sleep(0.05)

    async def _forward(self, coordinator: str, url: str, action: str,
                       args: dict[str, Any]) -> dict[str, Any]:
        log.info("admin %s forwarded to the coordinator %s", action, coordinator[:12])
        try:
            result = await self.cluster.client.call(
                url, "POST", "/v1/peer/admin",
                {"action": action, "args": args,
                 "proof": self.sign_proof(action, args, coordinator)},
                timeout=FORWARD_TIMEOUT_S, expect_node=coordinator)
        except PeerError as exc:
            reason = str(exc).split(": ", 1)[-1]
            if exc.status and exc.status < 500 and exc.code not in PEER_CHANNEL_CODES:
                # the coordinator decided: its refusal (not pending, paused, ...) is the answer
                raise UpdateRejected(exc.code, f"the coordinator {coordinator[:12]} refused: "
                                     f"{reason}") from exc
            if exc.status:  # it answered, but the forward itself failed: not the admin's fault
                raise UpdateRejected("coordinator_error", f"the coordinator {coordinator[:12]} "
                                     f"could not run the forwarded {action} ({exc.code}: "
                                     f"{reason}); retry, or run it on the coordinator's "
                                     "machine") from exc
            raise UpdateRejected("coordinator_unreachable", f"this node is not the coordinator "
                                 f"and could not reach the one it knows ({coordinator[:12]} at "
                                 f"{url}); retry once an election settles") from exc
        self.bus.publish("admin_forwarded", None, {"action": action, "coordinator": coordinator})
        return {**(result or {}), "via_coordinator": coordinator}

    async def on_peer_admin(self, caller: str, body: Any) -> dict[str, Any]:
        """The coordinator's side of a forward: a verified voting member's admin acts through
        it."""
        if not isinstance(body, dict) or not isinstance(body.get("action"), str) \
                or not isinstance(body.get("args", {}), dict):
            raise UpdateRejected("bad_request", "peer admin: expected {action, args}")
        if not self.remote_admin:
            raise UpdateRejected("forbidden", "this coordinator takes admin actions only from "
                                 "its own admin (--no-remote-admin); run the action on its "
                                 "machine")
        if caller not in {p.node_id for p in self.cluster.voters()}:
            raise UpdateRejected("forbidden", "only a verified voting member may forward admin "
                                 "actions")
        action, args = body["action"], body.get("args", {})
        self.check_proof(caller, action, args, body.get("proof"))
        result = await self.run_here(action, args)
        log.warning("admin %s run for member %s (forwarded by its node)", action, caller[:12])
        self.bus.publish("remote_admin", None, {"action": action, "by": caller},
                         level="warning")
        return result


def _text(args: dict[str, Any], key: str) -> str:
    value = args.get(key, "")
    if not isinstance(value, str) or (key == "node_id" and not value):
        raise UpdateRejected("bad_request", f"admin action: {key!r} must be a string")
    return value
