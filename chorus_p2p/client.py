"""Python SDK for a chorus-p2p node: :class:`AsyncNodeClient` and its blocking twin :class:`NodeClient`.

    from chorus_p2p.client import NodeClient
    with NodeClient.from_join_token("http://10.0.0.5:8470", token, client_id="alice") as node:
        print(node.status()["current_round"])
        node.submit("my-adapter/", examples=1200)
        node.pull("global/")               # a PEFT adapter folder

Every request is signed with the federation secret (see README, "Authentication"). A refusal
raises a subclass of :class:`NodeError` carrying the server's ``code``; a node that cannot be
reached raises :class:`NodeUnreachable`.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import socket
import tarfile
import threading
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Iterator, TypeVar
from urllib.parse import urlencode

import aiohttp

from chorus_p2p.atomic import atomic_output_dir, atomic_output_file
from chorus_p2p.errors import ChorusError
from chorus_p2p.lora.files import resolve_adapter_files
from chorus_p2p.trust.auth import EMPTY_SHA256, H_ADMIN, request_key, sign_headers

DEFAULT_URL = "http://127.0.0.1:8470"
T = TypeVar("T")


PROVENANCE_FILE = "chorus_round.json"  # written by pull next to the PEFT files


class NodeError(ChorusError):
    """The node refused the request. ``code`` is the API's error code (e.g. ``stale_base``)."""

    exit_code = 3

    def __init__(self, code: str, message: str, status: int,
                 details: dict[str, Any] | None = None):
        super().__init__(f"{message} [{code}]")
        self.code = code
        self.message = message
        self.status = status
        self.details = details or {}


class AuthenticationError(NodeError):
    """401/403: wrong secret, replay, clock skew, or a missing admin token."""


class NotFoundError(NodeError):
    """404: unknown round, blob or endpoint."""


class PrunedError(NotFoundError):
    """410: the round's files are no longer kept on that node (see ``--keep-rounds``)."""


class ConflictError(NodeError):
    """409: the round is closed, the update conflicts, or it was trained from a stale round."""


class RejectedError(NodeError):
    """400/413/415/422: the request or the adapter itself is unacceptable."""


class ServerError(NodeError):
    """5xx: the node failed (disk full, a bug); nothing was recorded."""


class MissingAdminToken(ChorusError):
    """An admin action without the admin token: refused before anything is sent (exit 3)."""

    exit_code = 3
    code = "forbidden"


class NodeUnreachable(ChorusError):
    exit_code = 4


def _error_for(status: int, code: str, message: str,
               details: dict[str, Any] | None = None) -> NodeError:
    if status in (401, 403):
        cls: type[NodeError] = AuthenticationError
    elif status == 404:
        cls = NotFoundError
    elif status == 410:
        cls = PrunedError
    elif status == 409:
        cls = ConflictError
    elif status >= 500:
        cls = ServerError
    else:
        cls = RejectedError
    return cls(code, message, status, details)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _safe_extract(data: bytes, out_dir: Path) -> None:
    """Extract only plain files at the top level: a hostile archive cannot write elsewhere."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar.getmembers():
            name = member.name
            if not member.isfile() or "/" in name or name.startswith(".") or "\\" in name:
                raise NodeError("bad_archive", f"unexpected entry {name!r} in adapter archive", 0)
            source = tar.extractfile(member)
            assert source is not None
            (out_dir / name).write_bytes(source.read())


def _data_dir_credentials(data_dir: str | os.PathLike, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments for talking to the node that owns ``data_dir`` as itself."""
    from chorus_p2p.trust.identity import load_identity

    identity = load_identity(data_dir)
    kwargs.setdefault("client_id", identity.node_id)
    return {"secret": identity.secret, "admin_token": identity.admin_token, **kwargs}


def _token_credentials(token: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    from chorus_p2p.trust.identity import decode_join_token

    _, secret = decode_join_token(token)
    return {"secret": secret, **kwargs}


class AsyncNodeClient:
    def __init__(self, url: str = DEFAULT_URL, *, secret: bytes, client_id: str | None = None,
                 admin_token: str | None = None, timeout: float = 120.0,
                 node_id: str | None = None):
        """``node_id``: with an ``https://`` URL, refuse a node whose TLS key is not that id's."""
        self.url = url.rstrip("/")
        self._secret = secret
        self._key = request_key(secret)
        self.client_id = client_id or socket.gethostname()
        self.admin_token = admin_token
        self.timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=10)
        self.node_id = node_id
        self._destination: str | None = node_id  # the node id writes are signed for
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_data_dir(cls, data_dir: str | os.PathLike, url: str | None = None,
                      **kwargs: Any) -> "AsyncNodeClient":
        """Talk to the node that owns ``data_dir`` with its own credentials (admin included)."""
        return cls(url or DEFAULT_URL, **_data_dir_credentials(data_dir, kwargs))

    @classmethod
    def from_join_token(cls, url: str, token: str, **kwargs: Any) -> "AsyncNodeClient":
        return cls(url, **_token_credentials(token, kwargs))

    async def __aenter__(self) -> "AsyncNodeClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = None
            if self.url.startswith("https://"):
                from chorus_p2p.trust.tls import pinning_connector

                pins = {self.url: self.node_id} if self.node_id else {}
                connector = pinning_connector(pins)
            self._session = aiohttp.ClientSession(timeout=self.timeout, connector=connector)
        return self._session

    async def _destination_id(self) -> str:
        """The node's id, which every write is signed for, so that a write captured on its
        way here is refused by any other node of the federation (learned once, unsigned)."""
        if self._destination is None:
            self._destination = str((await self.health()).get("node_id") or "")
        return self._destination

    def _headers(self, method: str, path_qs: str, body_sha: str, admin: bool,
                 to: str | None = None) -> dict[str, str]:
        headers = sign_headers(self._key, method, path_qs, self.client_id, body_sha, to=to)
        if admin:
            if not self.admin_token:
                raise MissingAdminToken("this action needs the node's admin token: run it on "
                                        "the node's machine with --data-dir (the SDK: "
                                        "NodeClient.from_data_dir or admin_token=)")
            headers[H_ADMIN] = self.admin_token
        return headers

    async def _request(self, method: str, path: str, *, params: dict[str, Any] | None = None,
                       json_body: Any = None, file_body: Path | None = None, admin: bool = False,
                       raw: bool = False, stream_to: Path | None = None) -> Any:
        path_qs = path + ("?" + urlencode(params) if params else "")
        data: Any = None
        headers: dict[str, str]
        to = None if method in ("GET", "HEAD") else await self._destination_id()
        if file_body is not None:
            body_sha = await asyncio.to_thread(_sha256_file, file_body)
            headers = self._headers(method, path_qs, body_sha, admin, to)
            headers["Content-Type"] = "application/octet-stream"
            data = open(file_body, "rb")  # streamed by aiohttp, closed below
        elif json_body is not None:
            data = json.dumps(json_body).encode()
            headers = self._headers(method, path_qs, hashlib.sha256(data).hexdigest(), admin, to)
            headers["Content-Type"] = "application/json"
        else:
            headers = self._headers(method, path_qs, EMPTY_SHA256, admin, to)
        try:
            async with self._http().request(method, self.url + path_qs, data=data,
                                            headers=headers) as response:
                if response.status >= 400:
                    await self._raise(response)
                if stream_to is not None:
                    digest = hashlib.sha256()
                    with open(stream_to, "wb") as out:
                        async for chunk in response.content.iter_chunked(1 << 20):
                            digest.update(chunk)
                            await asyncio.to_thread(out.write, chunk)
                    return digest.hexdigest(), dict(response.headers)
                if raw:
                    return await response.read(), dict(response.headers)
                return await response.json()
        except aiohttp.ClientConnectionError as exc:
            if "TLS key belongs to" in str(exc):
                raise NodeError("tls_pin", str(exc), 0) from exc
            raise NodeUnreachable(f"cannot reach the node at {self.url} ({exc})") from exc
        except asyncio.TimeoutError as exc:
            raise NodeUnreachable(f"the node at {self.url} did not answer in time") from exc
        finally:
            if file_body is not None and data is not None:
                data.close()

    @staticmethod
    async def _raise(response: aiohttp.ClientResponse) -> None:
        payload: dict[str, Any] = {}
        try:
            payload = await response.json(content_type=None)
            code, message = payload["error"], payload.get("message", "")
        except (ValueError, KeyError, TypeError, aiohttp.ContentTypeError):
            code, message = "http_error", f"HTTP {response.status} {response.reason}"
        raise _error_for(response.status, code, message, payload)

    # -- reads ----------------------------------------------------------------------------
    async def health(self) -> dict[str, Any]:
        return await self._request("GET", "/v1/health")

    async def status(self) -> dict[str, Any]:
        return await self._request("GET", "/v1/status")

    async def federation(self) -> dict[str, Any]:
        return await self._request("GET", "/v1/federation")

    async def members(self) -> list[dict[str, Any]]:
        return (await self._request("GET", "/v1/members"))["members"]

    async def rounds(self, limit: int = 20, before: int | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if before is not None:
            params["before"] = before
        return await self._request("GET", "/v1/rounds", params=params)

    async def all_rounds(self) -> list[dict[str, Any]]:
        """Every round, newest first, following the pages."""
        out: list[dict[str, Any]] = []
        before = None
        while True:
            page = await self.rounds(limit=200, before=before)
            out += page["rounds"]
            before = page["next_before"]
            if before is None:
                return out

    async def round(self, number: int | str) -> dict[str, Any]:
        return await self._request("GET", f"/v1/rounds/{number}")

    # -- writes ---------------------------------------------------------------------------
    async def submit(self, adapter_path: str | os.PathLike, round: int | None = None,
                     examples: int | None = None, trained_from: int | None = None,
                     eval_loss: float | None = None, train_loss: float | None = None
                     ) -> dict[str, Any]:
        """Upload an adapter (PEFT folder or ``.safetensors``) to a round (default: current).

        ``examples`` weights the update (default 1); ``trained_from`` is the round whose adapter
        training started from (default: the one the target round builds on). ``eval_loss`` and
        ``train_loss``, if given, are recorded with the update and shown per round.
        """
        losses = {k: float(v) for k, v in (("eval_loss", eval_loss), ("train_loss", train_loss))
                  if v is not None}
        weights_file, _ = resolve_adapter_files(adapter_path)
        try:
            return await self._submit_here(Path(weights_file), round, examples, trained_from,
                                           losses)
        except ConflictError as exc:
            leader = exc.details.get("coordinator_url")
            if exc.code != "not_coordinator" or not leader or leader.rstrip("/") == self.url:
                raise
        # This node is a follower: send the update to the coordinator it named, once.
        redirected = AsyncNodeClient(leader, secret=self._secret, client_id=self.client_id,
                                     admin_token=self.admin_token,
                                     timeout=self.timeout.total or 120.0)
        async with redirected:
            return await redirected._submit_here(Path(weights_file), round, examples, trained_from,
                                                 losses)

    async def _submit_here(self, weights_file: Path, round: int | None, examples: int | None,
                           trained_from: int | None, losses: dict[str, float]
                           ) -> dict[str, Any]:
        if round is None or trained_from is None:
            current = (await self.status())["current_round"]
            if current is None:
                raise ConflictError("round_closed", "no round is collecting updates now "
                                    "(paused, or aggregating: retry shortly)", 409)
            round = current["round"] if round is None else round
            if trained_from is None:
                trained_from = current["trained_from"] if current["round"] == round else round - 1
        params: dict[str, Any] = {"examples": int(examples or 1),
                                  "trained_from": int(trained_from), **losses}
        return await self._request("POST", f"/v1/rounds/{round}/updates", params=params,
                                   file_body=Path(weights_file))

    async def pull(self, out_dir: str | os.PathLike, round: int | str | None = None,
                   *, force: bool = False, residual: bool = False, cumulative: bool = False
                   ) -> Path:
        """Download a round's global adapter (default: latest) as a PEFT folder; with
        ``residual``/``cumulative`` also that round's ``residual.safetensors`` (its factored D)
        and ``cumulative.safetensors`` (the dense R after it).

        All or nothing: the folder appears complete or not at all (a failed download leaves no
        partial folder behind, and an existing one is untouched). "latest" is resolved once,
        so every file is of the same round even if another commits meanwhile.
        """
        wanted = "latest" if round is None else round  # round 0 is a round, not "latest"
        data, headers = await self._request("GET", f"/v1/rounds/{wanted}/adapter", raw=True)
        number = headers.get("X-Chorus-Round") or wanted
        with atomic_output_dir(out_dir, force=force) as scratch:
            _safe_extract(data, scratch)
            actual = _sha256_file(scratch / "adapter_model.safetensors")
            if actual != headers.get("X-Chorus-Adapter-SHA256"):
                raise NodeError("hash_mismatch", "downloaded adapter does not match its hash", 0)
            for wanted, what in ((residual, "residual"), (cumulative, "cumulative")):
                if wanted:
                    await self.download(what, number, scratch / f"{what}.safetensors")
            # Provenance: which round of which federation this folder is (PEFT ignores it).
            (scratch / PROVENANCE_FILE).write_text(json.dumps(
                {"round": int(number) if str(number).isdigit() else number,
                 "adapter_sha256": actual, "node": self.url}, indent=2) + "\n")
        return Path(out_dir)

    async def download(self, what: str, round: int | str, out_file: str | os.PathLike,
                       *, force: bool = False) -> Path:
        """``what`` is ``residual`` (that round's factored D) or ``cumulative`` (the dense R
        after that round). Streamed to disk; the file appears only when complete."""
        with atomic_output_file(out_file, force=force) as scratch:
            sha, headers = await self._request("GET", f"/v1/rounds/{round}/{what}",
                                               stream_to=scratch)
            expected = headers.get("X-Chorus-SHA256")
            if expected is not None and sha != expected:
                raise NodeError("hash_mismatch", f"downloaded {what} does not match its hash", 0)
        return Path(out_file)

    async def state(self) -> dict[str, Any]:
        """The node's state: its round, checkpoint, retention (``GET /v1/state``)."""
        return await self._request("GET", "/v1/state")

    async def download_checkpoint(self, out_file: str | os.PathLike, *, force: bool = False
                                  ) -> tuple[int, str]:
        """The node's latest state checkpoint; returns (round, sha256)."""
        with atomic_output_file(out_file, force=force) as scratch:
            sha, headers = await self._request("GET", "/v1/state/checkpoint", stream_to=scratch)
            if sha != headers.get("X-Chorus-SHA256"):
                raise NodeError("hash_mismatch", "downloaded checkpoint does not match its hash", 0)
        return int(headers["X-Chorus-State-Round"]), sha

    async def gc(self) -> dict[str, Any]:
        """Run the node's garbage collector now (admin)."""
        return await self._request("POST", "/v1/admin/gc", json_body={}, admin=True)

    async def blob(self, sha: str) -> bytes:
        data, _ = await self._request("GET", f"/v1/blobs/{sha}", raw=True)
        if hashlib.sha256(data).hexdigest() != sha:
            raise NodeError("hash_mismatch", f"blob {sha[:12]}... does not match its hash", 0)
        return data

    async def decide_member(self, node_id: str, approve: bool) -> dict[str, Any]:
        """Approve or reject a pending member (federations run with ``--approve-joins``)."""
        action = "approve" if approve else "reject"
        return await self._request("POST", f"/v1/admin/members/{node_id}/{action}", json_body={},
                                   admin=True)

    async def remove_member(self, node_id: str, force: bool = False) -> dict[str, Any]:
        """Take a member out of the federation for good (admin; see ``chorus-node remove``)."""
        return await self._request("POST", f"/v1/admin/members/{node_id}/remove",
                                   json_body={"force": force}, admin=True)

    async def exclude_update(self, node_id: str, round: int | None = None,
                             reason: str | None = None) -> dict[str, Any]:
        """Leave one update of the collecting round out (admin; default: the current round)."""
        if round is None:
            current = (await self.status())["current_round"]
            if current is None:
                raise ConflictError("round_closed", "no round is collecting updates now", 409)
            round = current["round"]
        return await self._request("POST", f"/v1/admin/rounds/{round}/updates/{node_id}/exclude",
                                   json_body={"reason": reason} if reason else {}, admin=True)

    async def resolve(self) -> dict[str, Any]:
        """Adopt the coordinator's history after a divergence; ours is archived (admin)."""
        return await self._request("POST", "/v1/admin/resolve", json_body={}, admin=True)

    async def join_token(self) -> str:
        return (await self._request("GET", "/v1/admin/join-token", admin=True))["join_token"]

    async def close_round(self, round: int | None = None) -> dict[str, Any]:
        """Aggregate the collecting round now; with ``round``, only if it is that round (a
        confirmation that named round N never closes round N + 1)."""
        body = {} if round is None else {"round": round}
        return await self._request("POST", "/v1/admin/rounds/close", json_body=body, admin=True)

    async def pause(self) -> dict[str, Any]:
        return await self._request("POST", "/v1/admin/pause", json_body={}, admin=True)

    async def resume(self) -> dict[str, Any]:
        return await self._request("POST", "/v1/admin/resume", json_body={}, admin=True)

    async def events(self, since: int | None = None, tail: int | None = None
                     ) -> AsyncIterator[dict[str, Any]]:
        """Live events; first, with ``since``, the recorded ones after that id, or with ``tail``,
        the last ``tail`` recorded ones (at most 1000). Replayed events carry ``replayed``."""
        query = {k: v for k, v in (("since", since), ("tail", tail)) if v is not None}
        path_qs = "/v1/events" + ("?" + urlencode(query) if query else "")
        headers = self._headers("GET", path_qs, EMPTY_SHA256, False)
        try:
            ws = await self._http().ws_connect(self.url + path_qs, headers=headers, heartbeat=20)
        except aiohttp.WSServerHandshakeError as exc:
            raise _error_for(exc.status, "unauthenticated" if exc.status == 401 else "http_error",
                             exc.message) from exc
        except aiohttp.ClientConnectionError as exc:
            raise NodeUnreachable(f"cannot reach the node at {self.url} ({exc})") from exc
        async with ws:
            async for message in ws:
                if message.type == aiohttp.WSMsgType.TEXT:
                    yield json.loads(message.data)
                elif message.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    break


class NodeClient:
    """Blocking client: the async client driven by a private event loop on a helper thread."""

    def __init__(self, url: str = DEFAULT_URL, **kwargs: Any):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="chorus-client")
        self._thread.start()
        self._async = self._call(self._make(url, kwargs))

    async def _make(self, url: str, kwargs: dict[str, Any]) -> AsyncNodeClient:
        return AsyncNodeClient(url, **kwargs)

    @classmethod
    def from_data_dir(cls, data_dir: str | os.PathLike, url: str | None = None,
                      **kwargs: Any) -> "NodeClient":
        return cls(url or DEFAULT_URL, **_data_dir_credentials(data_dir, kwargs))

    @classmethod
    def from_join_token(cls, url: str, token: str, **kwargs: Any) -> "NodeClient":
        return cls(url, **_token_credentials(token, kwargs))

    def _call(self, coro: Awaitable[T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()  # type: ignore[arg-type]

    def __enter__(self) -> "NodeClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._loop.is_running():
            self._call(self._async.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._loop.close()

    def __getattr__(self, name: str) -> Any:
        """Blocking versions of every ``AsyncNodeClient`` coroutine method."""
        attr = getattr(self._async, name)
        if name == "events":
            return self._events
        if asyncio.iscoroutinefunction(attr):
            return lambda *a, **k: self._call(attr(*a, **k))
        return attr

    def _events(self, since: int | None = None, tail: int | None = None
                ) -> Iterator[dict[str, Any]]:
        agen = self._async.events(since, tail)
        try:
            while True:
                try:
                    yield self._call(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._call(agen.aclose())
