"""P2P on a virtual LAN: real node processes in network namespaces, real mDNS between them.

Skipped (with the reason) where namespaces cannot be made; CI runs as root and runs them.
Every wait is bounded; the lab is torn down even when an assertion fails.
"""

from __future__ import annotations

import pytest

from chorus_p2p.client import ConflictError, NodeClient
from chorus_p2p.node.identity import init_data_dir
from chorus_p2p.node.spec import FederationSpec

from chorus_p2p.netlab import NetLab, namespaces_unavailable, wait_until
from nodeutil import ALPHA, RANK, TARGETS, write_update

REASON = namespaces_unavailable()
pytestmark = [pytest.mark.skipif(REASON is not None, reason=f"virtual LAN unavailable: {REASON}"),
              pytest.mark.timeout(300)]
NODE_ARGS = ["--rank", str(RANK), "--alpha", str(ALPHA), "--target-modules", ",".join(TARGETS),
             "--election-timeout", "0.5", "--min-updates", "2"]


@pytest.fixture(scope="module")
def spec(tiny_base):
    return FederationSpec.build(str(tiny_base), RANK, ALPHA, TARGETS)


def make_dirs(tmp_path, n: int, name: str = "vlan"):
    first = init_data_dir(tmp_path / "d0", name)
    for i in range(1, n):
        init_data_dir(tmp_path / f"d{i}", join_token=first.join_token())
    return first


def client(proc, secret, cid="probe") -> NodeClient:
    return NodeClient(proc.url, secret=secret, client_id=cid, timeout=10)


def statuses(procs, secret) -> dict[int, dict]:
    out = {}
    for p in procs:
        with client(p, secret) as c:
            out[p.index] = c.status()
    return out


def one_coordinator(procs, secret, members: int):
    """Exactly one coordinator that everyone follows, with every member admitted."""
    def check():
        st = statuses(procs, secret)
        leaders = [i for i, s in st.items() if s["role"] == "coordinator"]
        if len(leaders) != 1:
            return None
        leader = st[leaders[0]]["node_id"]
        ok = all(s["coordinator"] == leader and s["voting_members"] == members for s in st.values())
        return next(p for p in procs if p.index == leaders[0]) if ok else None
    return wait_until(check, 30, f"one coordinator among {len(procs)} nodes")


def histories(procs, secret):
    out = {}
    for p in procs:
        with client(p, secret) as c:
            out[p.index] = [(r["round"], r["state"], r["adapter_sha"], r["log_hash"])
                            for r in c.all_rounds() if r["state"] == "committed"]
    return out


def run_round(leader, procs, secret, spec, tmp_path, number: int):
    for k, cid in enumerate(("alice", "bob")):
        with client(leader, secret, cid) as c:
            c.submit(write_update(tmp_path / f"u{number}{cid}.safetensors", spec, number * 7 + k),
                     examples=k + 1)

    def everywhere():
        h = histories(procs, secret)
        return all(any(r[0] == number for r in rows) for rows in h.values())
    wait_until(everywhere, 30, f"round {number} committed on every node")


def test_five_nodes_discover_elect_replicate_and_survive_a_partition(tmp_path, tiny_base, spec):
    identity = make_dirs(tmp_path, 5)
    secret = identity.secret
    with NetLab(5) as lab:
        procs = [lab.start(i, tmp_path / f"d{i}", tiny_base, NODE_ARGS) for i in range(5)]
        leader = one_coordinator(procs, secret, members=5)
        for number in (1, 2, 3):
            run_round(leader, procs, secret, spec, tmp_path, number)
        h = histories(procs, secret)
        assert len({tuple(rows) for rows in h.values()}) == 1 and len(h[0]) == 4

        # Partition 2 | 3: cut two followers' LAN links.
        minority = [p for p in procs if p is not leader][:2]
        majority = [p for p in procs if p not in minority]
        for p in minority:
            lab.link(p.index, up=False)

        def minority_idle():
            st = statuses(minority, secret)
            return all(s["role"] != "coordinator" and not s["quorum"] for s in st.values())
        wait_until(minority_idle, 20, "minority to report no quorum")
        leader = one_coordinator(majority, secret, members=5)
        run_round(leader, majority, secret, spec, tmp_path, 4)
        for rows in histories(minority, secret).values():
            assert max(r[0] for r in rows) == 3  # the minority ran nothing
        with client(minority[0], secret, "carol") as c:
            with pytest.raises(ConflictError) as exc:
                c.submit(tmp_path / "u4alice.safetensors", round=5, examples=1, trained_from=4)
            assert exc.value.code == "not_coordinator"

        for p in minority:
            lab.link(p.index, up=True)
        leader = one_coordinator(procs, secret, members=5)

        def converged():
            h = histories(procs, secret)
            return len({tuple(rows) for rows in h.values()}) == 1 and len(h[0]) == 5
        wait_until(converged, 30, "healed minority to catch up")


def test_coordinator_kill9_late_joiner_and_wrong_secret(tmp_path, tiny_base, spec):
    identity = make_dirs(tmp_path, 4)
    secret = identity.secret
    init_data_dir(tmp_path / "intruder", identity.federation)  # same name, different secret
    with NetLab(3) as lab:
        procs = [lab.start(i, tmp_path / f"d{i}", tiny_base, NODE_ARGS) for i in range(3)]
        leader = one_coordinator(procs, secret, members=3)
        lab.add_host(3)
        intruder = lab.start(3, tmp_path / "intruder", tiny_base, NODE_ARGS)
        run_round(leader, procs, secret, spec, tmp_path, 1)

        # Round 2: alice's update reaches the coordinator, then it dies (kill -9).
        files = {cid: write_update(tmp_path / f"k{cid}.safetensors", spec, 50 + k)
                 for k, cid in enumerate(("alice", "bob"))}
        with client(leader, secret, "alice") as c:
            c.submit(files["alice"], examples=2)
        followers = [p for p in procs if p is not leader]

        def replicated():
            for p in followers:
                with client(p, secret) as c:
                    if len(c.round(2)["updates"]) != 1:
                        return False
            return True
        wait_until(replicated, 10, "alice's update replicated to followers")
        leader.kill9()
        new_leader = one_coordinator(followers, secret, members=3)
        assert new_leader is not leader
        for cid in ("alice", "bob"):  # participants re-send what they keep
            with client(new_leader, secret, cid) as c:
                c.submit(files[cid], examples=2)

        def committed_once():
            for p in followers:
                with client(p, secret) as c:
                    detail = c.round(2)
                    if detail["state"] != "committed":
                        return False
                    assert sorted(u["node_id"] for u in detail["updates"]) == ["alice", "bob"]
            return True
        wait_until(committed_once, 30, "round 2 committed with both updates")
        run_round(new_leader, followers, secret, spec, tmp_path, 3)

        # A node started after 3 rounds (on a fresh namespace) catches up to identical state.
        lab.add_host(4)
        late = lab.start(4, tmp_path / "d3", tiny_base, NODE_ARGS)
        everyone = followers + [late]

        def caught_up():
            h = histories(everyone, secret)
            return len({tuple(rows) for rows in h.values()}) == 1 and len(h[late.index]) == 4
        wait_until(caught_up, 40, "late joiner to catch up")

        # The intruder was seen on mDNS (refused) but never admitted anywhere.
        assert any(intruder.lan_ip in str(e.get("data")) for p in everyone
                   for e in p.saw("peer_refused")), "intruder never seen on mDNS"
        intruder_id = next(e["data"]["node_id"] for e in intruder.events
                           if e.get("event") == "listening")
        for p in everyone:
            with client(p, secret) as c:
                assert intruder_id not in {m["node_id"] for m in c.members()}
