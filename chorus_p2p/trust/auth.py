"""Request authentication: an HMAC over the request under a key derived from the federation secret.

Headers a caller sends (every request except ``GET /v1/health``):

- ``X-Chorus-Node``: the caller's id (a node id or an SDK client id)
- ``X-Chorus-Timestamp``: unix seconds; refused outside +-``MAX_SKEW`` of the node's clock
- ``X-Chorus-Nonce``: 16+ random hex chars; refused if seen within the window (replay)
- ``X-Chorus-Content-SHA256``: hex sha256 of the body (of ``b""`` when there is none)
- ``X-Chorus-Signature``: hex HMAC-SHA256 of the canonical string below

Canonical string: ``METHOD \\n PATH?QUERY \\n BODY_SHA256 \\n TIMESTAMP \\n NONCE \\n NODE \\n TO``
(``TO``: ``X-Chorus-To``, the destination node id; required on peer calls but the first hello,
empty for clients). The
signature covers the declared body hash, so a node checks it before reading any body; the body is
then hashed while it streams to disk and refused if it does not match.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAX_SKEW = 300.0
# Test-only: shift this process's clock for authentication, to test clock skew between nodes
# that share one host clock (the Jepsen-style checker). Never set it on a real node.
CLOCK_OFFSET_ENV = "CHORUS_CLOCK_OFFSET_S"
_CLOCK_OFFSET = float(os.environ.get(CLOCK_OFFSET_ENV, "0") or 0)


def clock() -> float:
    return time.time() + _CLOCK_OFFSET
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
H_NODE, H_TS, H_NONCE = "X-Chorus-Node", "X-Chorus-Timestamp", "X-Chorus-Nonce"
H_BODY, H_SIG, H_ADMIN = "X-Chorus-Content-SHA256", "X-Chorus-Signature", "X-Chorus-Admin"
H_PUBKEY, H_KEYSIG = "X-Chorus-Public-Key", "X-Chorus-Key-Signature"
H_TO = "X-Chorus-To"


def request_key(secret: bytes) -> bytes:
    """A key used only for request MACs, so the raw secret is never used directly."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=b"chorus-p2p",
                info=b"chorus-p2p/v1/request-auth").derive(secret)


def canonical(method: str, path_qs: str, body_sha: str, ts: str, nonce: str, node: str,
              to: str = "") -> bytes:
    return "\n".join([method.upper(), path_qs, body_sha, ts, nonce, node, to]).encode()


def sign_headers(key: bytes, method: str, path_qs: str, node: str, body_sha: str = EMPTY_SHA256,
                 *, now: float | None = None, to: str | None = None) -> dict[str, str]:
    """``to``: the node id the request is for (peer calls): signed, so a request captured on
    its way to one node is refused by every other."""
    ts = str(int(now if now is not None else clock()))
    nonce = secrets.token_hex(16)
    sig = hmac.new(key, canonical(method, path_qs, body_sha, ts, nonce, node, to or ""),
                   hashlib.sha256)
    headers = {H_NODE: node, H_TS: ts, H_NONCE: nonce, H_BODY: body_sha, H_SIG: sig.hexdigest()}
    if to:
        headers[H_TO] = to
    return headers


def identity_headers(private_key, headers: dict[str, str], method: str, path_qs: str
                     ) -> dict[str, str]:
    """Add an Ed25519 signature by the node's identity key over the same canonical string.

    The HMAC proves "a member of this federation"; this proves "this member": node ids are
    derived from public keys, so the signature is checkable against the id alone."""
    from cryptography.hazmat.primitives import serialization

    message = canonical(method, path_qs, headers[H_BODY], headers[H_TS], headers[H_NONCE],
                        headers[H_NODE], headers.get(H_TO, ""))
    public = private_key.public_key().public_bytes(serialization.Encoding.Raw,
                                                   serialization.PublicFormat.Raw)
    return {**headers, H_PUBKEY: public.hex(), H_KEYSIG: private_key.sign(message).hex()}


def verify_identity(headers, method: str, path_qs: str) -> str:
    """Check a peer request's Ed25519 signature and that its key is the claimed node id."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from chorus_p2p.trust.identity import node_id_for

    try:
        public = bytes.fromhex(headers.get(H_PUBKEY, ""))
        signature = bytes.fromhex(headers.get(H_KEYSIG, ""))
    except ValueError:
        raise AuthFailure("bad_identity", "malformed identity key or signature")
    if not public or not signature:
        raise AuthFailure("bad_identity", "peer calls must be signed with the node's identity key")
    if node_id_for(public) != headers.get(H_NODE):
        raise AuthFailure("bad_identity", "identity key does not belong to the claimed node id")
    message = canonical(method, path_qs, headers.get(H_BODY, ""), headers.get(H_TS, ""),
                        headers.get(H_NONCE, ""), headers.get(H_NODE, ""), headers.get(H_TO, ""))
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
    except (InvalidSignature, ValueError):
        raise AuthFailure("bad_identity", "identity signature does not verify")
    return public.hex()


class AuthFailure(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class VerifiedRequest:
    node: str
    body_sha: str
    nonce: str
    ts: int
    to: str = ""


class NonceCache:
    """Nonces seen within the timestamp window; anything older is refused by the clock anyway.

    In memory; the node records each one in its :class:`~chorus_p2p.node.nonces.NonceJournal`
    too, so a request captured before a restart cannot be replayed after it."""

    def __init__(self, window: float = 2 * MAX_SKEW, capacity: int = 200_000):
        self.window = window
        self.capacity = capacity
        self._seen: OrderedDict[str, float] = OrderedDict()

    def load(self, items: list[tuple[str, float]]) -> None:
        for nonce, ts in sorted(items, key=lambda x: x[1]):
            self._seen[nonce] = ts

    def check_and_add(self, nonce: str, now: float) -> bool:
        while self._seen and (next(iter(self._seen.values())) < now - self.window
                              or len(self._seen) >= self.capacity):
            self._seen.popitem(last=False)
        if nonce in self._seen:
            return False
        self._seen[nonce] = now
        return True


def verify_headers(key: bytes, method: str, path_qs: str, headers, nonces: NonceCache,
                   *, now: float | None = None) -> VerifiedRequest:
    now = clock() if now is None else now
    values = {h: headers.get(h) for h in (H_NODE, H_TS, H_NONCE, H_BODY, H_SIG)}
    missing = [h for h, v in values.items() if not v]
    if missing:
        raise AuthFailure("unauthenticated", f"missing authentication header(s): {', '.join(missing)}")
    try:
        ts = int(values[H_TS])
    except ValueError:
        raise AuthFailure("unauthenticated", f"{H_TS} is not an integer")
    if abs(now - ts) > MAX_SKEW:
        raise AuthFailure("stale_request", f"timestamp is {now - ts:+.0f}s off this node's clock "
                                           f"(allowed +-{MAX_SKEW:.0f}s); check NTP")
    nonce, body_sha = values[H_NONCE], values[H_BODY].lower()
    if not (16 <= len(nonce) <= 128) or len(body_sha) != 64:
        raise AuthFailure("unauthenticated", "malformed nonce or body hash")
    to = headers.get(H_TO) or ""
    expected = hmac.new(key, canonical(method, path_qs, body_sha, values[H_TS], nonce,
                                       values[H_NODE], to), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, values[H_SIG].lower()):
        raise AuthFailure("bad_signature", "signature does not match (wrong federation secret?)")
    if not nonces.check_and_add(nonce, now):
        raise AuthFailure("replayed", "this request was already received (replayed nonce)")
    return VerifiedRequest(node=values[H_NODE], body_sha=body_sha, nonce=nonce, ts=ts, to=to)


def check_admin(token: str, headers) -> bool:
    given = headers.get(H_ADMIN, "")
    return bool(given) and hmac.compare_digest(given.encode(), token.encode())
