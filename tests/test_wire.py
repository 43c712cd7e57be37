"""Requests as a real network delivers them: bodies split across TCP segments, paced, slow,
large, or hostile in shape. Raw sockets against a real node on loopback, so the bytes arrive
exactly as the test paces them (the netns test in test_p2p_netns.py does it over a shaped link).
"""

from __future__ import annotations

import hashlib
import json
import socket
import time

import pytest

from chorus_p2p.node import api
from chorus_p2p.trust.auth import H_ADMIN, sign_headers
from nodeutil import node_in_thread

EXCLUDE_PATH = "/v1/admin/rounds/1/updates/nobody/exclude"


def signed_request(node, body: bytes, path: str = EXCLUDE_PATH) -> tuple[bytes, bytes]:
    """The head and body of an admin POST, signed as the CLI signs it."""
    headers = sign_headers(node.request_key, "POST", path, "wire-test",
                           hashlib.sha256(body).hexdigest(), to=node.node_id)
    headers[H_ADMIN] = node.identity.admin_token
    host, port = node.address
    head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", "Connection: close",
            *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode(), body


def send_paced(node, head: bytes, body: bytes, segment: int, pause: float,
               timeout: float = 20.0) -> tuple[int, dict]:
    """Send the head, then the body ``segment`` bytes at a time with ``pause`` s between writes
    (TCP_NODELAY, so each write leaves as its own segment); return (status, JSON answer)."""
    with socket.create_connection(node.address, timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(head)
        for start in range(0, len(body), segment):
            time.sleep(pause)
            sock.sendall(body[start:start + segment])
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    payload = rest.partition(b"\r\n\r\n")[2]
    return int(status_line.split()[1]), json.loads(payload)


def exclude_body(size: int) -> bytes:
    """A valid JSON body of about ``size`` bytes."""
    return json.dumps({"reason": "r" * max(0, size - 14)}).encode()


@pytest.fixture
def node(tmp_path, tiny_base):
    with node_in_thread(tmp_path / "n", tiny_base) as n:
        yield n


def test_a_body_in_one_write_sets_the_expected_answer(node):
    """The baseline the split cases must match: the body is read and the action runs (here it
    is refused for a reason that proves the body was read whole: no such update)."""
    status, answer = send_paced(node, *signed_request(node, exclude_body(200)), 1 << 20, 0)
    assert (status, answer["error"]) == (404, "not_found")


@pytest.mark.parametrize("size,segment,pause", [
    (200, 100, 0.05),       # two writes 50 ms apart
    (6_000, 1448, 0.0002),  # Ethernet-sized segments, 0.2 ms apart
    (6_000, 1448, 0.001),
    (30_000, 1448, 0.001),
    (1_200_000, 65536, 0.0),  # over 1 MB, well under the documented limit
])
def test_a_body_split_across_segments_is_read_whole(node, size, segment, pause):
    """Issue 20 #2: `read(n)` returned only the first segment, so these were `body_mismatch`."""
    for _ in range(3):
        status, answer = send_paced(node, *signed_request(node, exclude_body(size)),
                                    segment, pause)
        assert (status, answer["error"]) == (404, "not_found"), answer


def test_a_stalled_body_times_out_with_408(node, monkeypatch):
    """The documented body timeout is reached (shortened here): half a body, then silence."""
    monkeypatch.setattr(api, "JSON_BODY_TIMEOUT_S", 1.0)
    head, body = signed_request(node, exclude_body(400))
    started = time.monotonic()
    with socket.create_connection(node.address, timeout=20) as sock:
        sock.sendall(head + body[:200])
        answer = sock.recv(65536)
    assert b" 408 " in answer.split(b"\r\n")[0] and b"upload_timeout" in answer
    assert time.monotonic() - started < 10


def test_a_body_over_the_limit_without_a_length_is_refused_413(node):
    """A chunked body that never says its length is still cut off at the limit."""
    body = exclude_body(api.JSON_BODY_LIMIT + 1000)
    head, _ = signed_request(node, body)
    head = head.replace(f"Content-Length: {len(body)}".encode(), b"Transfer-Encoding: chunked")
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 65536]), body[i:i + 65536])
                      for i in range(0, len(body), 65536)) + b"0\r\n\r\n"
    status, answer = send_paced(node, head, chunks, 1 << 20, 0)
    assert (status, answer["error"]) == (413, "too_large")


def test_deeply_nested_json_is_a_400_not_a_500(node):
    """Issue 20 #15: the parser's recursion limit was a 500 with a traceback."""
    body = b"[" * 100_000 + b"]" * 100_000
    status, answer = send_paced(node, *signed_request(node, body), 1 << 20, 0)
    assert (status, answer["error"]) == (400, "bad_request")
    assert "nested too deeply" in answer["message"]
