"""Fuzzing a live node with hostile inputs: every one gets a 4xx, the node stays up, and the
ledger and blob store do not change. Bounded: a fixed number of examples per property."""

from __future__ import annotations

import hashlib
import json
import struct
import urllib.error
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from chorus_p2p.trust.auth import identity_headers, request_key, sign_headers
from chorus_p2p.trust.identity import node_id_for

from nodeutil import blob_files, node_in_thread

EXAMPLES = 60


@pytest.fixture(scope="module")
def live_node(tmp_path_factory, tiny_base):
    with node_in_thread(tmp_path_factory.mktemp("fuzz") / "node", tiny_base, rate_limit=0) as node:
        yield node


STRANGER = Ed25519PrivateKey.generate()
STRANGER_ID = node_id_for(STRANGER.public_key().public_bytes(serialization.Encoding.Raw,
                                                            serialization.PublicFormat.Raw))


def send(node, method: str, path: str, body: bytes, content_type: str,
         sign: bool = True) -> tuple[int, dict]:
    """Signed by a stranger that holds the secret and a valid identity key: the strongest
    outsider, whose requests reach the handlers."""
    headers = {"Content-Type": content_type}
    if sign:
        signed = sign_headers(request_key(node.identity.secret), method, path, STRANGER_ID,
                              hashlib.sha256(body).hexdigest(), to=node.node_id)
        headers.update(identity_headers(STRANGER, signed, method, path))
    request = urllib.request.Request(node.url + path, data=body if method == "POST" else None,
                                     method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def assert_refused_and_unchanged(node, status: int, payload: dict, before, blobs) -> None:
    assert 400 <= status < 500, (status, payload)
    assert payload.get("error") and payload.get("message")
    health = urllib.request.urlopen(node.url + "/v1/health", timeout=10)
    assert health.status == 200
    assert node.ledger.snapshot() == before
    assert blob_files(node.data_dir) == blobs


DTYPES = st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "U8", "BOOL", "F8_E4M3", "XYZ", ""])
DIM = st.one_of(st.integers(0, 70), st.integers(2**31, 2**62), st.integers(-5, -1))


@st.composite
def hostile_safetensors(draw) -> bytes:
    header: dict = {}
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.one_of(
            st.sampled_from(["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                             "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
                             "__metadata__"]),
            st.text(min_size=0, max_size=30)))
        start = draw(st.integers(-10, 5000))
        header[name] = {"dtype": draw(DTYPES), "shape": draw(st.lists(DIM, max_size=3)),
                        "data_offsets": [start, start + draw(st.integers(-100, 2**40))]}
    raw = json.dumps(header).encode()
    declared = draw(st.one_of(st.just(len(raw)), st.integers(0, 2**63 - 1)))
    data = draw(st.binary(max_size=2048))
    blob = struct.pack("<Q", declared) + raw + data
    if draw(st.booleans()):
        blob = blob[: draw(st.integers(0, len(blob)))]  # truncated anywhere
    return blob


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=hostile_safetensors())
def test_hostile_safetensors_uploads(live_node, body):
    before, blobs = live_node.ledger.snapshot(), blob_files(live_node.data_dir)
    status, payload = send(live_node, "POST", "/v1/rounds/1/updates?examples=1&trained_from=0",
                           body, "application/octet-stream")
    assert_refused_and_unchanged(live_node, status, payload, before, blobs)


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=st.one_of(st.binary(max_size=512),
                      st.text(max_size=200).map(str.encode),
                      st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                                   lambda c: st.lists(c, max_size=4)
                                   | st.dictionaries(st.text(max_size=8), c, max_size=4),
                                   max_leaves=10).map(lambda v: json.dumps(v).encode())),
       path=st.sampled_from(["/v1/peer/hello", "/v1/peer/vote", "/v1/peer/append",
                             "/v1/admin/pause", "/v1/peer/leave"]),
       content_type=st.sampled_from(["application/json", "text/plain", "", "application/x-www"]))
def test_malformed_json_and_content_types(live_node, body, path, content_type):
    before, blobs = live_node.ledger.snapshot(), blob_files(live_node.data_dir)
    status, payload = send(live_node, "POST", path, body, content_type)
    assert_refused_and_unchanged(live_node, status, payload, before, blobs)


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(query=st.text(max_size=40), round_part=st.text(max_size=12),
       content_type=st.sampled_from(["application/octet-stream", "application/json",
                                     "multipart/form-data", "text/html"]))
def test_garbage_paths_queries_and_types(live_node, query, round_part, content_type):
    from urllib.parse import quote

    path = f"/v1/rounds/{quote(round_part, safe='') or 'x'}/updates?{quote(query, safe='=&')}"
    before, blobs = live_node.ledger.snapshot(), blob_files(live_node.data_dir)
    status, payload = send(live_node, "POST", path, b"\x00" * 64, content_type)
    assert_refused_and_unchanged(live_node, status, payload, before, blobs)
