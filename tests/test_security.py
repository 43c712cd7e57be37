"""Peer identity signatures, replay protection across restarts, membership and rate limits."""

from __future__ import annotations

import aiohttp
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from chorus_p2p.trust.auth import identity_headers, request_key, sign_headers
from chorus_p2p.trust.identity import load_identity

from nodeutil import start_node


async def _post(url: str, path: str, headers: dict, body: bytes = b"{}"):
    async with aiohttp.ClientSession() as session:
        async with session.post(url + path, data=body, headers={
                **headers, "Content-Type": "application/json"}) as resp:
            return resp.status, await resp.json()


def _signed(node, path: str, node_id: str, body: bytes = b"{}", key=None):
    import hashlib

    headers = sign_headers(request_key(node.identity.secret), "POST", path, node_id,
                           hashlib.sha256(body).hexdigest(), to=node.node_id)
    if key is not None:
        headers = identity_headers(key, headers, "POST", path)
    return headers


async def test_peer_calls_need_the_callers_identity_key(tmp_path, tiny_base):
    node = await start_node(tmp_path / "node", tiny_base)
    try:
        before = node.ledger.snapshot()
        stranger = Ed25519PrivateKey.generate()
        from chorus_p2p.trust.identity import node_id_for
        from cryptography.hazmat.primitives import serialization

        stranger_id = node_id_for(stranger.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw))
        # HMAC alone (knows the secret, no identity signature): refused.
        status, body = await _post(node.url, "/v1/peer/leave",
                                   _signed(node, "/v1/peer/leave", stranger_id))
        assert (status, body["error"]) == (401, "bad_identity")
        # A key that is not the claimed node id's: refused.
        status, body = await _post(node.url, "/v1/peer/leave",
                                   _signed(node, "/v1/peer/leave", "f" * 32, key=stranger))
        assert (status, body["error"]) == (401, "bad_identity")
        # Properly signed, but not a member: 403, and nothing changes.
        payload = b'{"node_id": "%s"}' % stranger_id.encode()
        status, body = await _post(node.url, "/v1/peer/leave",
                                   _signed(node, "/v1/peer/leave", stranger_id, payload, stranger),
                                   payload)
        assert (status, body["error"]) == (403, "not_member")
        assert node.ledger.snapshot() == before
    finally:
        await node.stop()


async def test_a_replay_is_refused_even_after_a_restart(tmp_path, tiny_base):
    node = await start_node(tmp_path / "node", tiny_base)
    headers = sign_headers(request_key(node.identity.secret), "GET", "/v1/status", "alice")
    port = node.address[1]
    async with aiohttp.ClientSession() as session:
        async with session.get(node.url + "/v1/status", headers=headers) as first:
            assert first.status == 200
    await node.stop()
    node = await start_node(tmp_path / "node", tiny_base, port=port)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(node.url + "/v1/status", headers=headers) as again:
                assert again.status == 401 and (await again.json())["error"] == "replayed"
    finally:
        await node.stop()


async def test_rate_limit_per_caller(tmp_path, tiny_base):
    node = await start_node(tmp_path / "node", tiny_base, rate_limit=5.0)
    key = request_key(node.identity.secret)
    try:
        codes = []
        async with aiohttp.ClientSession() as session:
            for _ in range(30):
                async with session.get(node.url + "/v1/status",
                                       headers=sign_headers(key, "GET", "/v1/status", "noisy")) as r:
                    codes.append(r.status)
            async with session.get(node.url + "/v1/status",
                                   headers=sign_headers(key, "GET", "/v1/status", "calm")) as r:
                calm = r.status
        assert codes[:10] == [200] * 10 and 429 in codes  # burst of 2x rate, then limited
        assert calm == 200  # others are not affected
    finally:
        await node.stop()


def test_identity_key_file_is_private(tmp_path):
    import os
    import stat

    from chorus_p2p.trust.identity import init_data_dir

    identity = init_data_dir(tmp_path / "d", "lab")
    mode = stat.S_IMODE(os.stat(tmp_path / "d" / "identity.key").st_mode)
    assert mode == 0o600 and load_identity(tmp_path / "d").node_id == identity.node_id


async def test_a_member_cannot_speak_for_another(tmp_path, tiny_base):
    """The sender a peer message names must be the node that signed it."""
    import json

    from cryptography.hazmat.primitives import serialization

    from chorus_p2p.trust.identity import node_id_for

    node = await start_node(tmp_path / "node", tiny_base)
    try:
        mallory = Ed25519PrivateKey.generate()
        mallory_id = node_id_for(mallory.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw))
        before = node.ledger.snapshot()
        forged = json.dumps({"term": 99, "coordinator": "f" * 32, "url": "http://127.0.0.1:9",
                             "commit": 999, "members": []}).encode()
        status, body = await _post(node.url, "/v1/peer/append",
                                   _signed(node, "/v1/peer/append", mallory_id, forged, mallory),
                                   forged)
        assert (status, body["error"]) == (403, "forbidden")
        assert node.cluster.role == "coordinator" and node.cluster.term < 99
        assert node.ledger.snapshot() == before
    finally:
        await node.stop()


async def test_a_peer_answer_is_believed_only_when_signed_with_the_federation_key():
    """README: peers sign their answers (X-Chorus-Response-Signature over our nonce and the
    body). A server on loopback answers a peer call three ways: unsigned, signed with another
    federation's key, and signed with ours; only the last is believed, and a refusal that is
    unsigned is not mistaken for the peer's word (audit, medium 10)."""
    import json as jsonlib

    import pytest
    from aiohttp import web

    from chorus_p2p.trust.auth import H_NONCE
    from chorus_p2p.node.peers import H_RESPONSE_SIG, PeerClient, PeerError, response_signature

    ours, theirs = request_key(b"o" * 32), request_key(b"t" * 32)
    mode = {"key": None, "status": 200}

    async def answer(request: web.Request) -> web.Response:
        body = jsonlib.dumps({"term": 99, "coordinator": "forged"}).encode()
        headers = {"Content-Type": "application/json"}
        if mode["key"] is not None:
            headers[H_RESPONSE_SIG] = response_signature(mode["key"], request.headers[H_NONCE],
                                                         body)
        return web.Response(body=body, status=mode["status"], headers=headers)

    app = web.Application()
    app.router.add_route("*", "/v1/peer/heartbeat", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    client = PeerClient(ours, "me")
    try:
        for key in (None, theirs):
            mode["key"] = key
            with pytest.raises(PeerError) as refused:
                await client.call(url, "POST", "/v1/peer/heartbeat", {"term": 1})
            assert refused.value.code == "bad_peer"
        mode.update(key=None, status=409)  # an unsigned "refusal" carries no peer's word
        with pytest.raises(PeerError) as refused:
            await client.call(url, "POST", "/v1/peer/heartbeat", {"term": 1})
        assert refused.value.code == "bad_peer" and not refused.value.details
        mode.update(key=ours, status=200)
        assert await client.call(url, "POST", "/v1/peer/heartbeat", {"term": 1}) == {
            "term": 99, "coordinator": "forged"}
    finally:
        await client.close()
        await runner.cleanup()


def test_a_state_changing_request_replayed_after_kill9_is_refused(tmp_path, tiny_base):
    """README: a write runs only once its nonce is durable, so a captured request stays refused
    after a crash. A real node process: a signed `pause` is captured and answered; `resume`
    follows; the process is killed with SIGKILL; restarted on the same port, the captured
    `pause` is replayed: 401 replayed, and the node stays unpaused (a replay that got through
    would pause it again). Audit, medium 10: before, only a GET was replayed, after a clean
    stop."""
    import hashlib
    import json as jsonlib
    import urllib.request

    from chorus_p2p.netlab import free_loopback_ports
    from chorus_p2p.trust.auth import H_ADMIN
    from chorus_p2p.trust.identity import init_data_dir

    from nodeutil import NodeProcess

    identity = init_data_dir(tmp_path / "node", "lab")
    (port,) = free_loopback_ports(1)
    key = request_key(identity.secret)

    def signed(path: str) -> dict:
        body = b"{}"
        headers = sign_headers(key, "POST", path, "operator", hashlib.sha256(body).hexdigest(),
                               to=identity.node_id)
        return {**headers, H_ADMIN: identity.admin_token, "Content-Type": "application/json"}

    def post(url: str, path: str, headers: dict) -> tuple[int, dict]:
        request = urllib.request.Request(url + path, data=b"{}", headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.status, jsonlib.loads(answer.read())
        except urllib.error.HTTPError as refused:
            return refused.code, jsonlib.loads(refused.read())

    node = NodeProcess(tmp_path / "node", tiny_base, port=port)
    url = node.start()
    captured = signed("/v1/admin/pause")
    assert post(url, "/v1/admin/pause", captured)[0] == 200
    status, body = post(url, "/v1/admin/resume", signed("/v1/admin/resume"))
    assert status == 200 and body["paused"] is False
    node.kill9()
    again = NodeProcess(tmp_path / "node", tiny_base, port=port)
    url = again.start()
    try:
        status, body = post(url, "/v1/admin/pause", captured)
        assert (status, body["error"]) == (401, "replayed")
        status, body = post(url, "/v1/admin/resume", signed("/v1/admin/resume"))
        assert status == 200 and body["paused"] is False  # the replay changed nothing
    finally:
        again.terminate()
