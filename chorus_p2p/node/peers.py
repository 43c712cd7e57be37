"""Signed node-to-node calls.

Requests are signed like any client's (:mod:`chorus_p2p.trust.auth`); responses to peer calls are
signed too (``X-Chorus-Response-Signature`` over the request nonce and the response body), so a
node never believes an answer from something that does not hold the federation secret. That is
what keeps a node with the wrong secret out even though it is visible on mDNS.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any

import aiohttp

from chorus_p2p.federation.wire import WIRE_HEADER, WIRE_VERSION
from chorus_p2p.trust.auth import EMPTY_SHA256, H_NONCE, identity_headers, sign_headers

H_RESPONSE_SIG = "X-Chorus-Response-Signature"


def response_signature(key: bytes, nonce: str, body: bytes) -> str:
    message = b"response\n" + nonce.encode() + b"\n" + hashlib.sha256(body).hexdigest().encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


class PeerError(Exception):
    def __init__(self, message: str, status: int = 0, code: str = "peer_error",
                 details: dict[str, Any] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.details = details or {}  # a signed refusal's other fields


class PeerClient:
    """One shared session; every call has a timeout so a stuck peer cannot stall us."""

    def __init__(self, key: bytes, node_id: str, timeout: float = 2.0, private_key=None,
                 ssl_context=None):
        self.key = key
        self.node_id = node_id
        self.private_key = private_key
        self.ssl_context = ssl_context
        # origin -> node id its TLS key proved: trusted on first use, then held to it
        self.pins: dict[str, str] = {}
        self.wire_version = WIRE_VERSION  # sent with every call (see federation/wire.py)
        self.timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, 1.0))
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = None
            if self.ssl_context is not None:
                from chorus_p2p.trust.tls import pinning_connector

                connector = pinning_connector(self.pins)
            self._session = aiohttp.ClientSession(timeout=self.timeout, connector=connector)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def call(self, url: str, method: str, path: str, body: Any = None,
                   timeout: float | None = None, expect_node: str | None = None) -> Any:
        if expect_node is not None and url.startswith("https://"):
            pinned = self.pins.setdefault(url, expect_node)
            if pinned != expect_node:
                raise PeerError(f"{url}: pinned to {pinned[:12]}, not {expect_node[:12]}",
                                code="bad_peer")
        data = json.dumps(body).encode() if body is not None else b""
        body_sha = hashlib.sha256(data).hexdigest() if data else EMPTY_SHA256
        headers = sign_headers(self.key, method, path, self.node_id, body_sha, to=expect_node)
        if self.private_key is not None:
            headers = identity_headers(self.private_key, headers, method, path)
        headers[WIRE_HEADER] = str(self.wire_version)
        if data:
            headers["Content-Type"] = "application/json"
        kwargs: dict[str, Any] = {}
        if timeout is not None:
            kwargs["timeout"] = aiohttp.ClientTimeout(total=timeout)
        try:
            async with self._http().request(method, url + path, data=data or None,
                                            headers=headers, **kwargs) as response:
                raw = await response.read()
                expected = response_signature(self.key, headers[H_NONCE], raw)
                if not hmac.compare_digest(expected, response.headers.get(H_RESPONSE_SIG, "")):
                    raise _unsigned_refusal(url, response.status, raw)
                payload = json.loads(raw) if raw else None
                if response.status >= 400:
                    code = (payload or {}).get("error", "http_error")
                    raise PeerError(f"{url}: {(payload or {}).get('message', response.reason)}",
                                    response.status, code,
                                    payload if isinstance(payload, dict) else None)
                return payload
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise PeerError(f"{url}: {exc.__class__.__name__}: {exc}") from exc

    async def fetch_blob(self, url: str, sha: str, timeout: float = 60.0) -> bytes:
        """A blob's bytes, verified against its name (a peer cannot feed us anything else)."""
        path = f"/v1/blobs/{sha}"
        headers = sign_headers(self.key, "GET", path, self.node_id)
        try:
            async with self._http().get(url + path, headers=headers,
                                        timeout=aiohttp.ClientTimeout(total=timeout)) as response:
                if response.status != 200:
                    raise PeerError(f"{url}: blob {sha[:12]}: HTTP {response.status}",
                                    response.status)
                data = await response.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise PeerError(f"{url}: {exc.__class__.__name__}: {exc}") from exc
        if (await asyncio.to_thread(lambda: hashlib.sha256(data).hexdigest())) != sha:
            raise PeerError(f"{url}: blob {sha[:12]} does not match its hash", code="bad_blob")
        return data

    async def fetch_checkpoint(self, url: str, dest: Path) -> tuple[int, str]:
        """Stream the peer's latest state checkpoint to ``dest``; returns (round, sha256).

        The hash is checked against the one the peer announces; the caller still checks the
        state's fingerprint against the log, which no peer can forge."""
        path = "/v1/state/checkpoint"
        headers = sign_headers(self.key, "GET", path, self.node_id)
        digest = hashlib.sha256()
        try:
            # No total timeout (a state can be many GB); a stalled transfer still times out.
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=60.0)
            async with self._http().get(url + path, headers=headers, timeout=timeout) as response:
                if response.status != 200:
                    raise PeerError(f"{url}: checkpoint: HTTP {response.status}", response.status)
                number = int(response.headers["X-Chorus-State-Round"])
                announced = response.headers["X-Chorus-SHA256"]
                with open(dest, "wb") as out:
                    async for chunk in response.content.iter_chunked(1 << 20):
                        digest.update(chunk)
                        await asyncio.to_thread(out.write, chunk)
                    await asyncio.to_thread(os.fsync, out.fileno())
        except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, ValueError) as exc:
            raise PeerError(f"{url}: checkpoint: {exc.__class__.__name__}: {exc}") from exc
        if digest.hexdigest() != announced:
            raise PeerError(f"{url}: checkpoint does not match its announced hash", code="bad_blob")
        return number, announced


def _unsigned_refusal(url: str, status: int, raw: bytes) -> PeerError:
    """An answer without the federation's signature. A refusal of our request as too old or too
    new is unsigned (the peer could not check us), and worth saying plainly: it is a clock
    problem on one side, not an intruder. Anything else unsigned is not believed."""
    try:
        code = json.loads(raw).get("error") if raw else None
    except (ValueError, AttributeError):
        code = None
    if status == 401 and code == "stale_request":
        return PeerError(f"{url} refused our request as stale: this machine's clock and that "
                         "node's differ by more than 5 minutes; check NTP on both",
                         status, "stale_request")
    return PeerError(f"{url}: unsigned or wrongly signed answer (not a member of this "
                     "federation)", status, "bad_peer")
