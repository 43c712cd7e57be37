"""A node's identity and its federation's credentials, kept in the data dir.

Layout (all secrets mode 0600):

- ``identity.key``: the node's Ed25519 private key (PEM); the node id is the first 16 bytes of
  sha256(public key), hex, so it cannot be chosen and cannot collide by accident.
- ``federation.json``: federation name and secret (the secret authenticates every peer request).
- ``admin.token``: the local admin token, for the CLI and TUI on this machine.
- ``federation-admin.key`` (the founder's, and any data dir the founder copies it to): the
  federation's admin key (Ed25519). Federation-wide admin actions (close a round, pause, approve,
  exclude, remove) run only for a node that holds it; the join token carries only its public
  half, so holding the token (membership) never makes anyone an admin.

The join token that ``init`` prints is ``chorus1.<base64url(json)>`` carrying the federation name,
secret and admin public key: another machine passes it to ``init --join`` / ``up --join`` to
become part of it.
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
FEDERATION_ADMIN_KEY_FILE = "federation-admin.key"
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
    # The federation's admin key: public half from the join token (None: a federation made
    # before admin keys, where any member's admin may act), private half where granted.
    admin_public_key: bytes | None = None
    admin_key: Ed25519PrivateKey | None = None
    # The federation's admission policy and its founder, as the join token carries them:
    # "approval" makes every node hold a node it hears of as pending until an admin approves
    # it (unless the founder or the coordinator's member list vouches for it).
    admission: str = "open"
    founder_id: str | None = None
    # The federation's DP policy (dp_policy.DPPolicy as JSON), as the join token carries it:
    # None, or every update must declare local DP at least this strong.
    dp_policy: dict[str, float] | None = None

    @property
    def public_key_bytes(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def node_id(self) -> str:
        return node_id_for(self.public_key_bytes)

    def join_token(self, admission: str | None = None) -> str:
        return encode_join_token(self.federation, self.secret, self.admin_public_key,
                                 admission or self.admission,
                                 self.node_id if self.founder else self.founder_id,
                                 self.dp_policy)

    @property
    def is_admin(self) -> bool:
        """May originate federation-wide admin actions (see FEDERATION_ADMIN_KEY_FILE)."""
        return self.admin_public_key is None or self.admin_key is not None


ADMISSIONS = ("open", "approval")


def encode_join_token(federation: str, secret: bytes, admin_public_key: bytes | None = None,
                      admission: str = "open", founder_id: str | None = None,
                      dp_policy: dict[str, float] | None = None) -> str:
    fields = {"f": federation, "s": base64.urlsafe_b64encode(secret).decode()}
    if admin_public_key is not None:
        fields["k"] = admin_public_key.hex()
    if admission != "open":
        fields["p"] = admission
    if founder_id:
        fields["r"] = founder_id
    if dp_policy:
        fields["d"] = dp_policy
    payload = json.dumps(fields, separators=(",", ":")).encode()
    return JOIN_PREFIX + base64.urlsafe_b64encode(payload).decode().rstrip("=")


def join_token_extras(token: str
                      ) -> tuple[bytes | None, str, str | None, dict[str, float] | None]:
    """(admin public key, admission policy, founder node id, DP policy) from a join token; a
    token made before these existed gives (None, "open", None, None)."""
    body = token.strip()[len(JOIN_PREFIX):]
    try:
        data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        admission = str(data.get("p") or "open")
        if admission not in ADMISSIONS:
            raise ValueError(admission)
        from chorus_p2p.federation.dp_policy import DPPolicy, policy_json

        return (bytes.fromhex(data["k"]) if data.get("k") else None, admission,
                str(data["r"]) if data.get("r") else None,
                policy_json(DPPolicy.from_json(data.get("d"))))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UsageError(f"join token is damaged ({exc.__class__.__name__})") from exc


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
                  join_token: str | None = None, force: bool = False,
                  admission: str = "open", dp_policy: dict[str, float] | None = None
                  ) -> NodeIdentity:
    """Create identity and credentials. Refuses to overwrite an identity unless ``force``."""
    data_dir = Path(data_dir)
    if (data_dir / IDENTITY_FILE).exists() and not force:
        raise IdentityError(f"{data_dir}: already holds a node identity (use --force to replace "
                            "it; the old node id is then gone for good)")
    admin_key = None
    founder_id = None
    if admission not in ADMISSIONS:
        raise UsageError(f"admission must be one of {', '.join(ADMISSIONS)}")
    if join_token:
        joined_name, secret = decode_join_token(join_token)
        if dp_policy is not None:
            raise UsageError("the DP policy is the founder's: a joining node takes the join "
                             "token's (drop --require-dp)")
        admin_public, admission, founder_id, dp_policy = join_token_extras(join_token)
        if federation and federation != joined_name:
            raise UsageError(f"--federation {federation!r} differs from the join token's "
                             f"federation {joined_name!r}")
        federation = joined_name
    else:
        if not federation:
            raise UsageError("give --federation NAME (or --join TOKEN to join an existing one)")
        secret = secrets.token_bytes(32)
        admin_key = Ed25519PrivateKey.generate()
        admin_public = _raw_public(admin_key)
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    key = Ed25519PrivateKey.generate()
    _write_private(data_dir / IDENTITY_FILE, _pem(key))
    if admin_key is not None:
        _write_private(data_dir / FEDERATION_ADMIN_KEY_FILE, _pem(admin_key))
    else:  # a re-init (--force) that joins: an old federation's admin key is not this one's
        (data_dir / FEDERATION_ADMIN_KEY_FILE).unlink(missing_ok=True)
    _write_private(data_dir / FEDERATION_FILE, json.dumps(
        {"federation": federation, "secret": base64.b64encode(secret).decode(),
         "founder": not join_token,
         "admin_public_key": admin_public.hex() if admin_public else None,
         "admission": admission, "founder_id": founder_id, "dp_policy": dp_policy}).encode())
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
    admin_public = bytes.fromhex(fed["admin_public_key"]) if fed.get("admin_public_key") \
        else None
    return NodeIdentity(data_dir=data_dir, federation=fed["federation"],
                        secret=base64.b64decode(fed["secret"]), admin_token=admin, private_key=key,
                        founder=bool(fed.get("founder", False)), admin_public_key=admin_public,
                        admin_key=_load_admin_key(data_dir, admin_public),
                        admission=fed.get("admission") or "open",
                        founder_id=fed.get("founder_id"), dp_policy=fed.get("dp_policy"))


def copy_admin_key(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Give ``target``'s node the federation admin key from ``source`` (the founder's data
    dir), as the founder does for an operator it trusts; checked against ``target``'s
    federation before it is written (0600)."""
    key = load_identity(source).admin_key
    if key is None:
        raise IdentityError(f"{source}: holds no federation admin key")
    if load_identity(target).admin_public_key != _raw_public(key):
        raise IdentityError(f"{target}: belongs to another federation")
    _write_private(Path(target) / FEDERATION_ADMIN_KEY_FILE, _pem(key))


def _load_admin_key(data_dir: Path, admin_public: bytes | None) -> Ed25519PrivateKey | None:
    path = data_dir / FEDERATION_ADMIN_KEY_FILE
    if not path.exists():
        return None
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), None)
    except ValueError as exc:
        raise IdentityError(f"{path}: damaged ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey) or admin_public is None \
            or _raw_public(key) != admin_public:
        raise IdentityError(f"{path}: this is not the admin key of this data dir's federation "
                            "(copy the founder's federation-admin.key, mode 0600)")
    return key


def _raw_public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


def _pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
