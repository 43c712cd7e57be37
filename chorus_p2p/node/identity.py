"""A node's identity and its federation's credentials, kept in the data dir.

Layout (all secrets mode 0600):

- ``identity.key``: the node's Ed25519 private key (PEM); the node id is the first 16 bytes of
  sha256(public key), hex, so it cannot be chosen and cannot collide by accident.
- ``federation.json``: federation name and secret (the secret authenticates every peer request).
- ``admin.token``: the local admin token, for the CLI and TUI on this machine.

The join token that ``init`` prints is ``chorus1.<base64url(json)>`` carrying the federation name and
secret: another machine passes it to ``init --join`` / ``up --join`` to become part of it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from chorus_p2p.errors import ChorusError, UsageError

IDENTITY_FILE = "identity.key"
FEDERATION_FILE = "federation.json"
ADMIN_TOKEN_FILE = "admin.token"
JOIN_PREFIX = "chorus1."


class IdentityError(ChorusError):
    exit_code = 2
    code = "identity"


def node_id_for(public_key_bytes: bytes) -> str:
    return hashlib.sha256(public_key_bytes).hexdigest()[:32]


@dataclass(frozen=True)
class NodeIdentity:
    data_dir: Path
    federation: str
    secret: bytes
    admin_token: str
    private_key: Ed25519PrivateKey
    founder: bool = False  # ran `init --federation`: may create the federation's first history

    @property
    def public_key_bytes(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def node_id(self) -> str:
        return node_id_for(self.public_key_bytes)

    def join_token(self) -> str:
        return encode_join_token(self.federation, self.secret)


def encode_join_token(federation: str, secret: bytes) -> str:
    payload = json.dumps({"f": federation, "s": base64.urlsafe_b64encode(secret).decode()},
                         separators=(",", ":")).encode()
    return JOIN_PREFIX + base64.urlsafe_b64encode(payload).decode().rstrip("=")


def decode_join_token(token: str) -> tuple[str, bytes]:
    """Return (federation, secret); a malformed token is a usage error, not a crash."""
    token = token.strip()
    if not token.startswith(JOIN_PREFIX):
        raise UsageError("join token must start with 'chorus1.' (copy it from `chorus-node init`)")
    body = token[len(JOIN_PREFIX):]
    try:
        data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        secret = base64.urlsafe_b64decode(data["s"])
        federation = str(data["f"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"join token is damaged ({exc.__class__.__name__})") from exc
    if len(secret) < 16 or not federation:
        raise UsageError("join token is damaged (secret too short or no federation name)")
    return federation, secret


def _write_private(path: Path, data: bytes) -> None:
    """Create with mode 0600 from the start, so the secret is never world-readable, even briefly."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def init_data_dir(data_dir: str | os.PathLike, federation: str | None = None, *,
                  join_token: str | None = None, force: bool = False) -> NodeIdentity:
    """Create identity and credentials. Refuses to overwrite an identity unless ``force``."""
    data_dir = Path(data_dir)
    if (data_dir / IDENTITY_FILE).exists() and not force:
        raise IdentityError(f"{data_dir}: already holds a node identity (use --force to replace "
                            "it; the old node id is then gone for good)")
    if join_token:
        joined_name, secret = decode_join_token(join_token)
        if federation and federation != joined_name:
            raise UsageError(f"--federation {federation!r} differs from the join token's "
                             f"federation {joined_name!r}")
        federation = joined_name
    else:
        if not federation:
            raise UsageError("give --federation NAME (or --join TOKEN to join an existing one)")
        secret = secrets.token_bytes(32)
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    key = Ed25519PrivateKey.generate()
    _write_private(data_dir / IDENTITY_FILE, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    _write_private(data_dir / FEDERATION_FILE, json.dumps(
        {"federation": federation, "secret": base64.b64encode(secret).decode(),
         "founder": not join_token}).encode())
    _write_private(data_dir / ADMIN_TOKEN_FILE, secrets.token_urlsafe(32).encode())
    return load_identity(data_dir)


def load_identity(data_dir: str | os.PathLike) -> NodeIdentity:
    data_dir = Path(data_dir)
    try:
        key = serialization.load_pem_private_key((data_dir / IDENTITY_FILE).read_bytes(), None)
        fed = json.loads((data_dir / FEDERATION_FILE).read_text())
        admin = (data_dir / ADMIN_TOKEN_FILE).read_text().strip()
    except FileNotFoundError as exc:
        raise IdentityError(f"{data_dir}: no node identity here; run `chorus-node init "
                            f"--federation NAME --data-dir {data_dir}` first") from exc
    except (ValueError, KeyError) as exc:
        raise IdentityError(f"{data_dir}: identity files are damaged ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"{data_dir}/{IDENTITY_FILE}: not an Ed25519 key")
    return NodeIdentity(data_dir=data_dir, federation=fed["federation"],
                        secret=base64.b64decode(fed["secret"]), admin_token=admin, private_key=key,
                        founder=bool(fed.get("founder", False)))
