"""The node's HTTP API under ``/v1/`` (aiohttp), and its WebSocket event stream.

Every route except ``GET /v1/health`` is authenticated (see :mod:`chorus_p2p.trust.auth`) before
its handler runs; admin routes also need the local admin token. Errors are always JSON
``{"error": code, "message": text}`` with a matching status, and every refusal is logged and sent
to the event stream.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import io
import json
import logging
import sqlite3
import tarfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from aiohttp import WSCloseCode, WSMsgType, web

from chorus_p2p import __version__
from chorus_p2p.federation import wire
from chorus_p2p.federation.dp_policy import check_update as check_dp
from chorus_p2p.federation.refusals import UpdateRejected
from chorus_p2p.federation.wire import round_record
from chorus_p2p.node.blobs import BlobError, is_sha256
from chorus_p2p.node.events import CLOSING, recorded_level
from chorus_p2p.node.guard import guard_middleware
from chorus_p2p.node.peers import H_RESPONSE_SIG, response_signature
from chorus_p2p.node.ratelimit import RateLimited
from chorus_p2p.trust.auth import AuthFailure, check_admin, verify_headers, verify_identity

if TYPE_CHECKING:
    from chorus_p2p.node.service import Node

log = logging.getLogger("chorus_p2p.api")

API_VERSION = "1"
JSON_BODY_LIMIT = 4 * 1024 * 1024  # heartbeats list the live round's updates
UPLOAD_CHUNK = 1 << 16
UPLOAD_TIMEOUT_S = 300.0  # a stalled upload is dropped; rounds never wait for uploads anyway
JSON_BODY_TIMEOUT_S = 30.0

STATUS_FOR_CODE = {
    "unauthenticated": 401, "bad_signature": 401, "stale_request": 401, "replayed": 401,
    "wrong_destination": 401,
    "forbidden": 403, "not_member": 403, "bad_identity": 401, "rate_limited": 429,
    "upload_timeout": 408, "not_found": 404, "unknown_round": 404, "no_residual": 404,
    "no_checkpoint": 404, "pruned": 410, "state_unavailable": 503,
    "round_closed": 409, "update_conflict": 409, "stale_base": 409, "no_updates": 409,
    "not_coordinator": 409, "spec_mismatch": 409, "not_pending": 409, "already_counted": 409,
    "not_durable": 503, "no_quorum": 503, "history_diverged": 409, "not_diverged": 409,
    "update_too_large": 422, "ill_conditioned": 422, "overloaded": 503, "removed": 403,
    "busy": 409, "coordinator_unreachable": 503, "coordinator_error": 502,
    "too_large": 413, "unsupported_media_type": 415, "bad_request": 400, "body_mismatch": 400,
    "bad_adapter": 422, "wrong_shape": 422, "non_finite": 422, "insufficient_storage": 507,
    "dp_required": 403, "dp_insufficient": 403, "dp_noise_missing": 422, "wire_version": 409,
    "internal": 500,
}


class ApiError(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def error_response(code: str, message: str, extra: dict[str, Any] | None = None) -> web.Response:
    return web.json_response({**(extra or {}), "error": code, "message": message},
                             status=STATUS_FOR_CODE.get(code, 400))


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

NODE_KEY = web.AppKey("node", object)
# Typed request-storage keys where this aiohttp has them (3.12+), plain strings before.
_RequestKey = getattr(web, "RequestKey", None)
CALLER = _RequestKey("caller", str) if _RequestKey else "caller"
BODY_SHA = _RequestKey("body_sha", str) if _RequestKey else "body_sha"


def _node(request: web.Request) -> "Node":
    return request.app[NODE_KEY]  # type: ignore[return-value]


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except (ApiError, UpdateRejected, AuthFailure, RateLimited) as exc:
        update = request.path.endswith("/updates")
        # A follower's not_coordinator is routine (clients follow the redirect to the
        # coordinator): an info-level redirect, not a rejection a user would worry about.
        if exc.code == "not_coordinator":
            kind, level = ("update_redirected" if update else "request_redirected"), "info"
        else:
            kind, level = ("update_rejected" if update else "request_refused"), "warning"
        _node(request).bus.publish(kind, None, {
            "method": request.method, "path": request.path, "error": exc.code,
            "message": exc.message, "peer": request.remote,
            "node": request.get(CALLER)}, level=level)
        return error_response(exc.code, exc.message, getattr(exc, "extra", None))
    except web.HTTPException as exc:
        if exc.status == 404:
            return error_response("not_found", f"no such endpoint: {request.method} {request.path}")
        if exc.status == 405:
            return web.json_response({"error": "method_not_allowed", "message":
                                      f"{request.method} is not allowed on {request.path}"},
                                     status=405)
        raise
    except sqlite3.OperationalError as exc:
        if "full" in str(exc):  # SQLITE_FULL: the disk, not the request
            log.error("disk full while handling %s %s", request.method, request.path)
            return error_response("insufficient_storage", "the node's disk is full; nothing was "
                                  "recorded, retry after space is freed")
        log.exception("database error handling %s %s", request.method, request.path)
        return error_response("internal", f"database error ({exc})")
    except ConnectionResetError:
        # The caller hung up mid-request (a peer's call timed out, a client was killed): routine
        # under faults, and nothing was recorded. Not an I/O error of ours.
        log.info("caller went away during %s %s", request.method, request.path)
        return error_response("bad_request", "connection lost before the request was read")
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            log.warning("out of file descriptors handling %s %s", request.method, request.path)
            return error_response("overloaded", "the node has too many open files right now; "
                                  "nothing was recorded, retry shortly")
        if exc.errno == errno.ENOSPC:
            log.error("disk full while handling %s %s", request.method, request.path)
            return error_response("insufficient_storage", "the node's disk is full; nothing was "
                                  "recorded, retry after space is freed")
        log.exception("I/O error handling %s %s", request.method, request.path)
        return error_response("internal", f"I/O error: {exc.strerror or exc}")
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a bug: say so in JSON, keep the details in the log
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response("internal", f"internal error ({exc.__class__.__name__}); see the "
                              "node's log")


def _check_wire_version(node: "Node", request: web.Request) -> None:
    """Refused in words, and signed (the caller believes it): two releases whose peer messages
    differ must say so rather than misread each other."""
    theirs = wire.version_of(request.headers.get(wire.WIRE_HEADER))
    reason = wire.incompatible(theirs, node.wire_version)
    if reason is not None:
        node.bus.publish("peer_refused", None, {"node_id": request.get(CALLER),
                                                "url": request.remote, "code": "wire_version",
                                                "reason": reason}, level="warning")
        raise UpdateRejected("wire_version", reason,
                             extra={"wire_version": node.wire_version, "theirs": theirs})


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        # The server never decompresses (auto_decompress is off): a 16 MB gzip bomb would
        # otherwise unpack to gigabytes on the event loop, before anyone is authenticated.
        raise ApiError("unsupported_media_type", f"Content-Encoding {encoding!r} is not "
                       "accepted; send the body uncompressed")
    if request.path == "/v1/health" or not request.path.startswith("/v1/"):
        return await handler(request)
    node = _node(request)
    address = f"address {request.remote}"
    try:
        verified = verify_headers(node.request_key, request.method, request.path_qs,
                                  request.headers, node.nonces)
    except AuthFailure:
        node.refusal_limiter.check(address)  # strangers spend their own budget, not ours
        raise
    node.rate_limiter.check(verified.node)
    node.address_limiter.check(address)
    recorded = node.nonce_journal.add(verified.nonce, time.time())
    if request.method not in ("GET", "HEAD"):
        # A write runs only once its nonce is durable (shared fsyncs: group commit), so it can
        # never be replayed after a restart; reads do not wait for the disk.
        try:
            await asyncio.wrap_future(recorded)
        except sqlite3.OperationalError as exc:
            raise ApiError("insufficient_storage" if "full" in str(exc) else "internal",
                           f"cannot record the request ({exc}); nothing was changed")
    request[CALLER] = verified.node
    request[BODY_SHA] = verified.body_sha
    if verified.to and verified.to != node.node_id:
        raise AuthFailure("wrong_destination", "this request was signed for another node "
                          f"({verified.to[:12]}); it is refused here")
    if request.path.startswith("/v1/peer/") and request.path != "/v1/peer/hello" \
            and not verified.to:
        raise AuthFailure("wrong_destination", "peer calls must name the node they are for "
                          "(X-Chorus-To)")
    if request.method not in ("GET", "HEAD") and request.path != "/v1/peer/hello" \
            and not verified.to:
        # A write captured on its way to one node must not replay on another (each node has
        # its own nonce journal): it names its destination, which the signature covers.
        raise AuthFailure("wrong_destination", "writes must name the node they are for "
                          "(X-Chorus-To, from GET /v1/health's node_id); upgrade the client")
    if request.path.startswith("/v1/peer/"):
        verify_identity(request.headers, request.method, request.path_qs)
        open_to_all = request.path in ("/v1/peer/hello", "/v1/peer/append", "/v1/peer/vote",
                                       "/v1/peer/hold")
        if not open_to_all and not node.cluster.is_known(verified.node):
            raise ApiError("not_member", f"{verified.node[:12]} is not a member of this "
                           "federation")
    if request.path.startswith("/v1/admin/") and not check_admin(node.identity.admin_token,
                                                                   request.headers):
        raise ApiError("forbidden", "this action needs the node's admin token "
                       "(DATA_DIR/admin.token)")
    try:
        if request.path.startswith("/v1/peer/"):
            _check_wire_version(node, request)
        response = await handler(request)
    except (ApiError, UpdateRejected) as exc:
        if not request.path.startswith("/v1/peer/"):
            raise
        # A peer's refusal is signed too, so the caller learns the real reason
        # (e.g. spec_mismatch) instead of "unsigned answer".
        response = error_response(exc.code, exc.message, getattr(exc, "extra", None))
    if request.path.startswith("/v1/peer/") and isinstance(response, web.Response):
        # Peers believe only answers signed with the federation key (see peers.py).
        body = response.body if isinstance(response.body, bytes) else b""
        response.headers[H_RESPONSE_SIG] = response_signature(node.request_key, verified.nonce,
                                                              body)
    return response


async def read_json_body(request: web.Request) -> Any:
    """Read a small JSON body, checking it against the signed hash.

    ``StreamReader.read(n)`` returns whatever is buffered, which on a real link is often only
    the first TCP segment: the body is read until EOF (or past the limit), all within one
    deadline, so a split or slow body is neither refused nor allowed to hang past the timeout.
    """
    if request.content_length and request.content_length > JSON_BODY_LIMIT:
        raise ApiError("too_large", f"JSON bodies are limited to {JSON_BODY_LIMIT} bytes")
    try:
        body = await asyncio.wait_for(_read_until_eof(request.content, JSON_BODY_LIMIT + 1),
                                      JSON_BODY_TIMEOUT_S)
    except asyncio.TimeoutError:
        raise ApiError("upload_timeout", f"the JSON body did not arrive within "
                       f"{JSON_BODY_TIMEOUT_S:.0f}s")
    if len(body) > JSON_BODY_LIMIT:
        raise ApiError("too_large", f"JSON bodies are limited to {JSON_BODY_LIMIT} bytes")
    if hashlib.sha256(body).hexdigest() != request[BODY_SHA]:
        raise ApiError("body_mismatch", "body does not match its signed sha256")
    if not body:
        return {}
    return parse_json(body)


def parse_json(body: bytes | str) -> Any:
    """``json.loads`` whose every failure is the caller's: a body nested thousands deep makes
    the parser recurse past Python's limit, which is a malformed request, not a node bug."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ApiError("bad_request", f"malformed JSON: {reason}") from None


async def _read_until_eof(stream: Any, limit: int) -> bytes:
    """Up to ``limit`` bytes of ``stream``, however many segments they arrive in."""
    parts: list[bytes] = []
    size = 0
    while size < limit:
        chunk = await stream.read(limit - size)
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)


MAX_INT_PARAM = 2**62  # SQLite integers are 64-bit; anything larger is a bad request, not a 500
MAX_EXAMPLES = 10**12


def _int_param(request: web.Request, name: str, *, default: int | None = None,
               minimum: int = 0, maximum: int = MAX_INT_PARAM) -> int:
    raw = request.query.get(name)
    if raw is None:
        if default is None:
            raise ApiError("bad_request", f"query parameter {name!r} is required")
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError("bad_request", f"query parameter {name}={raw!r} is not an integer")
    if value < minimum:
        raise ApiError("bad_request", f"query parameter {name}={value} must be >= {minimum}")
    if value > maximum:
        raise ApiError("bad_request", f"query parameter {name}={value} must be <= {maximum}")
    return value


def _float_param(request: web.Request, name: str) -> float:
    raw = request.query[name]
    try:
        value = float(raw)
    except ValueError:
        raise ApiError("bad_request", f"query parameter {name}={raw!r} is not a number")
    if value != value or value in (float("inf"), float("-inf")):
        raise ApiError("bad_request", f"query parameter {name} must be finite")
    return value


def _round_number(request: web.Request) -> int:
    raw = request.match_info["round"]
    node = _node(request)
    if raw == "latest":
        return node.ledger.committed_round()
    try:
        number = int(raw)
    except ValueError:
        raise ApiError("bad_request", f"round {raw!r} is not a number or 'latest'")
    if not 0 <= number <= MAX_INT_PARAM:
        raise ApiError("bad_request", f"round {raw} is out of range")
    if node.ledger.round(number) is None:
        raise ApiError("unknown_round", f"round {raw} does not exist")
    return number


# -- handlers ---------------------------------------------------------------------------------
async def health(request: web.Request) -> web.Response:
    """Unauthenticated. The node id is public (mDNS carries it too): clients sign writes for it."""
    return web.json_response({"ok": True, "version": __version__, "api": API_VERSION,
                              "node_id": _node(request).node_id})


async def status(request: web.Request) -> web.Response:
    return web.json_response(_node(request).status())


async def federation(request: web.Request) -> web.Response:
    node = _node(request)
    return web.json_response({"federation": node.identity.federation,
                              "spec": node.spec.to_json(), "fingerprint": node.spec.fingerprint(),
                              "policy": node.policy_json(),
                              "dp_policy": node.policy_json()["dp_policy"],
                              "adapter_config": node.spec.adapter_config(),
                              "max_update_bytes": node.spec.max_update_bytes()})


async def members(request: web.Request) -> web.Response:
    node = _node(request)
    live = {p.node_id: p for p in node.cluster.peers.values()}
    rows = []
    for member in node.ledger.members():
        peer = live.get(member["node_id"])
        role = ("coordinator" if member["node_id"] == node.cluster.coordinator else "follower")
        if member["node_id"] == node.node_id:
            role, member["status"] = node.cluster.role, "live"
        elif peer is not None:
            member["status"] = peer.status
            member["last_seen_age_s"] = (round(time.monotonic() - peer.last_seen, 3)
                                         if peer.last_seen else None)
        rows.append({**member, "role": role if member["status"] != "left" else None})
    return web.json_response({"members": rows, "term": node.cluster.term,
                              "quorum": node.cluster.has_quorum()})


async def rounds_list(request: web.Request) -> web.Response:
    node = _node(request)
    limit = min(_int_param(request, "limit", default=20, minimum=1), 500)
    before = request.query.get("before")
    before_n = _int_param(request, "before") if before is not None else None
    rows = node.ledger.list_rounds(limit=limit, before=before_n)
    next_before = rows[-1]["round"] if len(rows) == limit and rows[-1]["round"] > 0 else None
    # The state fingerprint is for nodes (it grows with the model); GET /v1/rounds/N has it.
    evaluations = node.ledger.evaluations([r["round"] for r in rows])
    listed = [{**{k: v for k, v in round_record(r).items() if k != "state_sketch"},
               "pruned": r.get("pruned_at") is not None,
               "evaluations": evaluations.get(r["round"], {})} for r in rows]
    return web.json_response({"rounds": listed, "next_before": next_before,
                              "total": node.ledger.count_rounds()})


async def round_detail(request: web.Request) -> web.Response:
    node = _node(request)
    number = _round_number(request)
    stored = node.ledger.round(number)
    row = {**round_record(stored), "pruned": stored.get("pruned_at") is not None,
           "evaluations": node.ledger.evaluations([number]).get(number, {})}
    row["updates"] = [{k: v for k, v in wire.update_record(u).items() if k not in ("round", "term")}
                      for u in node.ledger.updates(number)]
    return web.json_response(row)


async def submit_update(request: web.Request) -> web.Response:
    node = _node(request)
    node.rounds.require_coordinator()
    number = _round_number(request) if request.match_info["round"] != "current" else \
        node.ledger.latest_round()["round"]
    examples = _int_param(request, "examples", minimum=1, maximum=MAX_EXAMPLES)
    trained_from = _int_param(request, "trained_from")
    losses = {k: _float_param(request, k) for k in ("eval_loss", "train_loss")
              if k in request.query}
    caller = request[CALLER]
    ctype = request.headers.get("Content-Type", "application/octet-stream")
    if ctype.split(";")[0].strip() not in ("application/octet-stream",
                                            "application/x-safetensors"):
        raise ApiError("unsupported_media_type", f"send the adapter as application/octet-stream "
                       f"(safetensors bytes), not {ctype}")
    node.rounds.check_open(number, trained_from, caller)
    limit = node.spec.max_update_bytes()
    if request.content_length is not None and request.content_length > limit:
        raise ApiError("too_large", f"update is {request.content_length} bytes; this federation's "
                       f"adapters are at most {limit} bytes")
    fh, temp = node.blobs.new_temp(".upload")
    digest = hashlib.sha256()
    size = 0
    async def receive() -> None:
        nonlocal size
        async for chunk in request.content.iter_chunked(UPLOAD_CHUNK):
            size += len(chunk)
            if size > limit:
                raise ApiError("too_large", f"update exceeds this federation's limit of "
                               f"{limit} bytes")
            digest.update(chunk)
            await asyncio.to_thread(fh.write, chunk)

    try:
        with fh:
            try:
                await asyncio.wait_for(receive(), timeout=UPLOAD_TIMEOUT_S)
            except asyncio.TimeoutError:
                raise ApiError("upload_timeout", f"the upload took longer than "
                               f"{UPLOAD_TIMEOUT_S:.0f}s; nothing was recorded, send it again")
        if size == 0:
            raise ApiError("bad_adapter", "empty body: send the adapter_model.safetensors bytes")
        if digest.hexdigest() != request[BODY_SHA]:
            raise ApiError("body_mismatch", "body does not match its signed sha256 (truncated or "
                           "altered in transit)")
        norm = await asyncio.to_thread(node.spec.validate_update, temp)
        if node.dp_policy is not None:
            await asyncio.to_thread(check_dp, node.dp_policy, temp,
                                    _adapter_path(node, trained_from))
        accepted = await node.rounds.accept(number, caller, temp, digest.hexdigest(), size,
                                            examples, trained_from, norm, losses)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    body = {"round": accepted.round, "node_id": accepted.node_id, "sha256": accepted.blob_sha,
            "duplicate": accepted.duplicate, "durable": True, "replicas": accepted.replicas,
            "members": accepted.members, "status": "accepted"}
    recorded = node.ledger.update(accepted.round, accepted.node_id)
    if recorded is not None and recorded.get("status") == "excluded":
        # A re-send of an update that was left out: durable, but it will not count.
        body.update(status="excluded", reason=recorded.get("reason"))
    return web.json_response(body, status=200 if accepted.duplicate else 201)


def _adapter_path(node: "Node", number: int) -> Path | None:
    """The committed global adapter of round ``number`` on this node, if it still holds it (an
    update's DP noise is measured from it)."""
    row = node.ledger.round(number)
    if row is None or row["state"] != "committed" or not row.get("adapter_sha") \
            or not node.blobs.has(row["adapter_sha"]):
        return None
    return node.blobs.path(row["adapter_sha"])


def _committed_round(request: web.Request, *, files: bool = True) -> dict[str, Any]:
    node = _node(request)
    row = node.ledger.round(_round_number(request))
    if row["state"] != "committed":
        raise ApiError("round_closed" if row["state"] == "aggregating" else "unknown_round",
                       f"round {row['round']} is {row['state']}; it has no result yet")
    if files and row.get("pruned_at") is not None:
        raise ApiError("pruned", _pruned_message(node, f"round {row['round']}'s files"))
    return row


def _pruned_message(node: "Node", what: str) -> str:
    keep = node.settings.keep_rounds
    return (f"{what} are no longer kept on this node (pruned, or from before it joined; it keeps "
            f"the last {keep} committed rounds, see --keep-rounds); the round's record and "
            "hashes remain in GET /v1/rounds")


async def adapter_archive(request: web.Request) -> web.Response:
    """The round's global adapter as a tar of a PEFT folder (safetensors barely compress)."""
    node = _node(request)
    row = _committed_round(request)

    def build() -> bytes:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for name, sha in (("adapter_config.json", row["adapter_config_sha"]),
                              ("adapter_model.safetensors", row["adapter_sha"])):
                path = node.blobs.verified_path(sha)
                info = tar.gettarinfo(str(path), arcname=name)
                info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                with open(path, "rb") as fh:
                    tar.addfile(info, fh)
        return buffer.getvalue()

    try:
        data = await asyncio.to_thread(build)
    except BlobError as exc:
        raise ApiError("internal", str(exc))
    return web.Response(body=data, content_type="application/x-tar", headers={
        "X-Chorus-Round": str(row["round"]), "X-Chorus-Adapter-SHA256": row["adapter_sha"],
        "Content-Disposition": f'attachment; filename="round-{row["round"]}-adapter.tar"'})


async def _blob_response(request: web.Request, sha: str | None, missing: str,
                         what: str) -> web.StreamResponse:
    node = _node(request)
    if not sha:
        raise ApiError(missing, what)
    try:
        path = await asyncio.to_thread(node.blobs.verified_path, sha)
    except BlobError as exc:
        if "not in this store" not in str(exc):
            raise ApiError("internal", str(exc))
        if node.retention.is_pruned_blob(sha):
            raise ApiError("pruned", _pruned_message(node, f"blob {sha[:12]}..."))
        raise ApiError("not_found", str(exc))
    return web.FileResponse(path, headers={"Content-Type": "application/octet-stream",
                                           "X-Chorus-SHA256": sha})


async def residual_blob(request: web.Request) -> web.StreamResponse:
    row = _committed_round(request)
    return await _blob_response(request, row["residual_sha"], "no_residual",
                                f"round {row['round']} has no residual "
                                f"({row['strategy']} is exact without one or not exact at all)")


async def cumulative_state(request: web.Request) -> web.StreamResponse:
    """``R`` after a round, as a dense state file made for this request (the working state
    changes in place, so it is never served directly)."""
    from chorus_p2p.state.store import StateError

    node = _node(request)
    row = _committed_round(request, files=False)

    async def build(path) -> int:
        reader = await node.state.reader(row["round"], timeout=60.0)
        return await asyncio.to_thread(reader.write, path)

    try:
        path = await node.cumulative.get(row["round"], row.get("log_hash") or "", build)
    except StateError as exc:
        code = "pruned" if "needs the residuals" in str(exc) else \
            "state_unavailable"
        raise ApiError(code, f"R after round {row['round']}: {exc}")
    # Served from disk with sendfile: a slow reader holds a file handle, not a copy of R.
    return web.FileResponse(path, headers={"Content-Type": "application/octet-stream",
                                           "X-Chorus-Round": str(row["round"])})


async def state_info(request: web.Request) -> web.Response:
    node = _node(request)
    return web.json_response({**node.state.info(), "retained_from":
                              node.ledger.first_retained_round(),
                              "keep_rounds": node.settings.keep_rounds,
                              "gc": node.retention.last.to_json() if node.retention.last else None})


async def state_checkpoint(request: web.Request) -> web.StreamResponse:
    """The latest checkpoint of ``R``: what a late joiner starts from (immutable file)."""
    node = _node(request)
    checkpoint = node.state_store.latest_checkpoint()
    if checkpoint is None:
        raise ApiError("no_checkpoint", "this node has no checkpoint yet (before the first one, "
                       "R is replayed from round 0 with every residual, which are all kept)")
    return web.FileResponse(checkpoint.path, headers={
        "Content-Type": "application/octet-stream", "X-Chorus-State-Round": str(checkpoint.round),
        "X-Chorus-SHA256": checkpoint.sha256})


async def admin_gc(request: web.Request) -> web.Response:
    await read_json_body(request)
    node = _node(request)
    report = await node.retention.collect(node.state_store.recovery_round)
    return web.json_response(report.to_json())


async def blob(request: web.Request) -> web.StreamResponse:
    sha = request.match_info["sha"].lower()
    if not is_sha256(sha):
        raise ApiError("bad_request", f"{sha!r} is not a sha256 hex digest")
    return await _blob_response(request, sha, "not_found", "")


async def events(request: web.Request) -> web.StreamResponse:
    node = _node(request)
    since = _int_param(request, "since", default=-1, minimum=-1)
    tail = _int_param(request, "tail", default=0, minimum=0)
    ws = web.WebSocketResponse(heartbeat=20)
    await ws.prepare(request)
    queue = node.bus.subscribe()
    try:
        # Replay first (a dashboard that attaches shows recent history, one that reconnects
        # misses nothing); an event may then arrive twice, once replayed: ids tell them apart.
        # Both reads are one indexed query of at most 1000 rows on the ledger's connection,
        # which belongs to the event loop's thread.
        replay: list[dict] = []
        if since >= 0:
            replay = list(node.ledger.events_since(since))
        elif tail > 0:
            replay = node.ledger.events_tail(min(tail, 1000))
        for event in replay:
            await ws.send_json({**event, "level": recorded_level(event["kind"]),
                                "replayed": True})
        await ws.send_json({"id": None, "ts": time.time(), "kind": "hello", "round": None,
                            "level": "info", "data": node.status()})
        reader = asyncio.ensure_future(ws.receive())
        while not ws.closed:
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter, reader}, return_when=asyncio.FIRST_COMPLETED)
            if reader in done:
                getter.cancel()
                message = reader.result()
                if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED,
                                    WSMsgType.ERROR):
                    break
                reader = asyncio.ensure_future(ws.receive())
                continue
            event = getter.result()
            if event is CLOSING:
                await ws.close(code=WSCloseCode.GOING_AWAY, message=b"node shutting down")
                break
            await ws.send_json(event)
            if not node.bus.is_subscribed(queue) and not node.bus.closed:
                await ws.close(message=b"event queue overflowed; reconnect with ?since=")
                break
        reader.cancel()
    finally:
        node.bus.unsubscribe(queue)
    return ws


# -- peer protocol (see cluster.py) -----------------------------------------------------------------
async def _peer_body(request: web.Request, kind: str) -> dict[str, Any]:
    """A shape-checked peer message whose named sender is the node that signed the request:
    one member can never speak for another (or for an id it made up)."""
    try:
        body = wire.check_message(kind, await read_json_body(request))
    except wire.WireError as exc:
        raise ApiError("bad_request", str(exc)) from None
    field = wire.SENDER_FIELD.get(kind)
    if field is not None and body[field] != request[CALLER]:
        raise ApiError("forbidden", f"peer {kind}: {field} must be the signing node")
    return body


async def peer_hello(request: web.Request) -> web.Response:
    body = await _peer_body(request, "hello")
    return web.json_response(_node(request).cluster.on_hello(body))


async def peer_vote(request: web.Request) -> web.Response:
    body = await _peer_body(request, "vote")
    return web.json_response(_node(request).cluster.on_vote(body))


async def peer_append(request: web.Request) -> web.Response:
    body = await _peer_body(request, "append")
    return web.json_response(_node(request).cluster.on_append(body))


async def peer_leave(request: web.Request) -> web.Response:
    _node(request).cluster.on_leave(await _peer_body(request, "leave"))
    return web.json_response({"ok": True})


async def peer_evaluation(request: web.Request) -> web.Response:
    """A member's own evaluations of committed models (see evaluations.py)."""
    from chorus_p2p.node.evaluations import record_shared

    body = await _peer_body(request, "evaluation")
    return web.json_response({"recorded": record_shared(_node(request), request[CALLER],
                                                        body["evaluations"])})


async def peer_timeout_now(request: web.Request) -> web.Response:
    _node(request).cluster.on_timeout_now(await _peer_body(request, "timeout-now"))
    return web.json_response({"ok": True})


async def peer_hold(request: web.Request) -> web.Response:
    body = await _peer_body(request, "hold")
    return web.json_response(await _node(request).cluster.on_hold(body))


async def peer_round_updates(request: web.Request) -> web.Response:
    round_no = _int_param(request, "round")
    return web.json_response(_node(request).cluster.on_round_updates(round_no))


async def peer_handoff(request: web.Request) -> web.Response:
    body = await _peer_body(request, "handoff")
    return web.json_response(await _node(request).cluster.on_handoff(request[CALLER], body))


async def peer_history(request: web.Request) -> web.Response:
    """Committed rounds after ``after`` with their updates, for followers and late joiners."""
    node = _node(request)
    after = _int_param(request, "after", default=0)
    rows = node.ledger.committed_after(after, limit=100)
    updates = [wire.update_record(u) for r in rows for u in node.ledger.updates(r["round"])]
    return web.json_response({"rounds": [wire.round_record(r) for r in rows],
                              "updates": updates})


async def admin_close_round(request: web.Request) -> web.Response:
    """Aggregate the collecting round now; ``{"round": N}`` closes it only if N is that round."""
    body = await read_json_body(request)
    args = {"round": body["round"]} if isinstance(body, dict) and "round" in body else {}
    result = await _node(request).admin.run_on_coordinator("close_round", args)
    return web.json_response(result, status=202)


async def admin_decide_member(request: web.Request) -> web.Response:
    body = await read_json_body(request)
    decision = request.match_info["decision"]
    node = _node(request)
    if decision == "remove":
        node.admin.require_admin_key()
        force = isinstance(body, dict) and body.get("force") is True
        return web.json_response(await node.cluster.remove(request.match_info["node_id"], force))
    if decision not in ("approve", "reject"):
        raise ApiError("not_found", f"no such action {decision!r}: approve, reject or remove")
    return web.json_response(await node.admin.run_on_coordinator(
        decision, {"node_id": request.match_info["node_id"]}))


async def admin_exclude(request: web.Request) -> web.Response:
    """Leave one update of the collecting round out, with a reason (recorded)."""
    body = await read_json_body(request)
    reason = body.get("reason") if isinstance(body, dict) else None
    args = {"round": _round_number(request), "node_id": request.match_info["node_id"],
            "reason": str(reason)[:500] if reason else "excluded by an admin"}
    return web.json_response(await _node(request).admin.run_on_coordinator("exclude", args))


async def peer_admin(request: web.Request) -> web.Response:
    """An admin action forwarded by a member's node for its admin (see admin.py)."""
    body = await read_json_body(request)
    return web.json_response(await _node(request).admin.on_peer_admin(request[CALLER], body))


async def admin_resolve(request: web.Request) -> web.Response:
    """Resolve a diverged history by adopting the coordinator's (ours is archived, not lost)."""
    await read_json_body(request)
    return web.json_response(_node(request).rounds.resolve_divergence())


def _is_loopback(address: str | None) -> bool:
    import ipaddress

    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


async def admin_join_token(request: web.Request) -> web.Response:
    """The join token (the federation secret) for a caller on this machine only: it never
    crosses the network, whatever credentials the request carries."""
    node = _node(request)
    if not _is_loopback(request.remote):
        raise ApiError("forbidden", "the join token is handed out only to callers on the node's "
                       "own machine (it contains the federation secret)")
    admission = "approval" if node.cluster.approve_joins else None  # the policy travels too
    return web.json_response({"join_token": node.identity.join_token(admission),
                              "federation": node.identity.federation})


async def admin_pause(request: web.Request) -> web.Response:
    await read_json_body(request)
    return web.json_response(await _node(request).admin.run_on_coordinator("pause", {}))


async def admin_resume(request: web.Request) -> web.Response:
    await read_json_body(request)
    return web.json_response(await _node(request).admin.run_on_coordinator("resume", {}))


def build_app(node: "Node") -> web.Application:
    app = web.Application(middlewares=[guard_middleware(node.guard), errors_middleware,
                                       auth_middleware], client_max_size=JSON_BODY_LIMIT)
    app[NODE_KEY] = node
    app.add_routes([
        web.get("/v1/health", health),
        web.get("/v1/status", status),
        web.get("/v1/federation", federation),
        web.get("/v1/members", members),
        web.get("/v1/rounds", rounds_list),
        web.get("/v1/rounds/{round}", round_detail),
        web.post("/v1/rounds/{round}/updates", submit_update),
        web.get("/v1/rounds/{round}/adapter", adapter_archive),
        web.get("/v1/rounds/{round}/residual", residual_blob),
        web.get("/v1/rounds/{round}/cumulative", cumulative_state),
        web.get("/v1/state", state_info),
        web.get("/v1/state/checkpoint", state_checkpoint),
        web.get("/v1/blobs/{sha}", blob),
        web.get("/v1/events", events),
        web.post("/v1/peer/hello", peer_hello),
        web.post("/v1/peer/vote", peer_vote),
        web.post("/v1/peer/append", peer_append),
        web.post("/v1/peer/leave", peer_leave),
        web.post("/v1/peer/evaluation", peer_evaluation),
        web.post("/v1/peer/timeout-now", peer_timeout_now),
        web.get("/v1/peer/history", peer_history),
        web.post("/v1/peer/hold", peer_hold),
        web.get("/v1/peer/round-updates", peer_round_updates),
        web.post("/v1/peer/handoff", peer_handoff),
        web.post("/v1/peer/admin", peer_admin),
        web.post("/v1/admin/rounds/close", admin_close_round),
        web.post("/v1/admin/pause", admin_pause),
        web.get("/v1/admin/join-token", admin_join_token),
        web.post("/v1/admin/members/{node_id}/{decision}", admin_decide_member),
        web.post("/v1/admin/resume", admin_resume),
        web.post("/v1/admin/gc", admin_gc),
        web.post("/v1/admin/resolve", admin_resolve),
        web.post("/v1/admin/rounds/{round}/updates/{node_id}/exclude", admin_exclude),
    ])
    return app
