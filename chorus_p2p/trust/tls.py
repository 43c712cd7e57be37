"""Optional TLS between peers (``--tls``), pinned by node id instead of a CA.

Each node presents a self-signed certificate whose key *is* its Ed25519 identity key, so the
certificate proves the node id (sha256 of that public key) directly: a peer checks that the key
in the TLS handshake hashes to the node id it expects, and no CA or hostname is involved. The
certificate is made on first ``--tls`` start and kept in ``DATA_DIR/tls.crt``.

Without ``--tls`` the node serves plain HTTP (fine on a trusted lab LAN: requests are still
authenticated and replay-protected, but adapters and metadata are readable on the wire) and says
so in its log.
"""

from __future__ import annotations

import datetime
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID

from chorus_p2p.trust.identity import IDENTITY_FILE, NodeIdentity, node_id_for

CERT_FILE = "tls.crt"


class PinMismatch(Exception):
    pass


def ensure_certificate(identity: NodeIdentity) -> Path:
    path = identity.data_dir / CERT_FILE
    if path.exists():
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        if node_id_from_cert_der(cert.public_bytes(serialization.Encoding.DER)) == identity.node_id:
            return path
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"chorus-{identity.node_id}")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(identity.private_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .sign(identity.private_key, None))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def server_context(identity: NodeIdentity) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3  # Ed25519 certificates need TLS 1.3
    context.load_cert_chain(ensure_certificate(identity), identity.data_dir / IDENTITY_FILE)
    return context


def client_context() -> ssl.SSLContext:
    """No CA and no hostname: trust comes from pinning the node id (see :func:`check_pin`)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def node_id_from_cert_der(der: bytes) -> str:
    key = x509.load_der_x509_certificate(der).public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise PinMismatch("peer certificate is not an Ed25519 node identity")
    return node_id_for(key.public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw))


def _make_pinning_connector():
    import aiohttp

    class PinError(aiohttp.ClientConnectionError):
        """The TLS key of the server is not the node id expected at that address."""

    class PinningConnector(aiohttp.TCPConnector):
        """Checks every new TLS connection's key against ``pins`` (origin -> node id).

        An origin with no pin yet is trusted on first use and pinned; the caller then checks
        that the node id it learns (in a signed hello) is the one the handshake proved.
        Checking at connection creation covers every request sent over that connection.
        (``_create_connection`` is aiohttp's hook for exactly this; it is not public API.)"""

        def __init__(self, pins: dict[str, str], **kwargs):
            super().__init__(ssl=client_context(), **kwargs)
            self.pins = pins

        async def _create_connection(self, req, traces, timeout):
            protocol = await super()._create_connection(req, traces, timeout)
            origin = f"{req.url.scheme}://{req.url.host}:{req.url.port}"
            ssl_object = protocol.transport.get_extra_info("ssl_object") \
                if protocol.transport else None
            der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
            proven = node_id_from_cert_der(der) if der else None
            wanted = self.pins.get(origin)
            if proven is None or (wanted is not None and wanted != proven):
                protocol.close()
                raise PinError(f"{origin}: TLS key belongs to {str(proven)[:12]}, expected "
                               f"{str(wanted)[:12]}")
            self.pins[origin] = proven
            return protocol

    return PinningConnector, PinError


def pinning_connector(pins: dict[str, str]):
    connector_class, _ = _make_pinning_connector()
    return connector_class(pins)
