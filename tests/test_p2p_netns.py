"""P2P on a virtual LAN: real node processes in network namespaces, real mDNS between them.

Skipped (with the reason) where namespaces cannot be made; CI runs as root and runs them.
Every wait is bounded; the lab is torn down even when an assertion fails.
"""

from __future__ import annotations

import json
import time

import pytest

from chorus_p2p.client import ConflictError, NodeClient, NodeError
from chorus_p2p.trust.identity import init_data_dir

from chorus_p2p.netlab import NetLab, namespaces_unavailable, wait_until
from nodeutil import ALPHA, RANK, TARGETS, write_update

REASON = namespaces_unavailable()
pytestmark = [pytest.mark.skipif(REASON is not None, reason=f"virtual LAN unavailable: {REASON}"),
              pytest.mark.timeout(300)]
NODE_ARGS = ["--rank", str(RANK), "--alpha", str(ALPHA), "--target-modules", ",".join(TARGETS),
             "--election-timeout", "0.5", "--min-updates", "2"]


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


def chances_to_lead(procs, secret, n: int = 3, timeout: float = 60) -> None:
    """Wait until each node's election timer fired ``n`` more times (``status``'s
    ``election_timeouts``): a check that nobody took the lead waits for chances, not seconds."""
    start = {i: s["election_timeouts"] for i, s in statuses(procs, secret).items()}
    wait_until(lambda: all(s["election_timeouts"] >= start[i] + n
                           for i, s in statuses(procs, secret).items()), timeout,
               f"{n} election timeouts on nodes {sorted(start)}", interval=0.2)


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
    # 60 s: three interpreters importing torch at once on a loaded 2-core CI machine
    return wait_until(check, 60, f"one coordinator among {len(procs)} nodes", lab=procs[0].lab)


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
                   for e in p.saw("peer_refused")), (
            f"intruder never seen on mDNS; intruder's last lines: {intruder.describe(8)}")
        intruder_id = next(e["data"]["node_id"] for e in intruder.events
                           if e.get("event") == "listening")
        for p in everyone:
            with client(p, secret) as c:
                assert intruder_id not in {m["node_id"] for m in c.members()}


def test_an_isolated_coordinator_acknowledges_nothing_and_heals_without_disruption(
        tmp_path, tiny_base, spec):
    """Issue 11 #2: cut off alone, the coordinator takes no write (no 201), keeps its term (no
    Pre-Vote majority), and on healing neither it nor an isolated follower deposes the new one."""
    identity = make_dirs(tmp_path, 3)
    secret = identity.secret
    with NetLab(3) as lab:
        procs = [lab.start(i, tmp_path / f"d{i}", tiny_base, NODE_ARGS) for i in range(3)]
        leader = one_coordinator(procs, secret, members=3)
        run_round(leader, procs, secret, spec, tmp_path, 1)
        term = statuses([leader], secret)[leader.index]["term"]
        lab.link(leader.index, up=False)
        update = write_update(tmp_path / "lonely.safetensors", spec, 4242)
        with client(leader, secret, "lonely") as c:
            with pytest.raises(NodeError) as refused:  # never "accepted"
                c.submit(update, round=2, examples=1, trained_from=1)
        assert refused.value.code in ("not_durable", "no_quorum", "not_coordinator")
        rest = [p for p in procs if p is not leader]
        new_leader = one_coordinator_among(rest, secret)
        new_term = statuses([new_leader], secret)[new_leader.index]["term"]
        # cut off, it stepped down and its timer fired: where 0.1 pushed its term far up
        wait_until(lambda: statuses([leader], secret)[leader.index]["role"] != "coordinator",
                   30, "the isolated coordinator to step down")
        chances_to_lead([leader], secret)
        assert statuses([leader], secret)[leader.index]["term"] == term
        lab.link(leader.index, up=True)
        wait_until(lambda: statuses([leader], secret)[leader.index]["coordinator"] ==
                   statuses([new_leader], secret)[new_leader.index]["node_id"], 20,
                   "the old coordinator to follow the new one")
        # An isolated follower comes back: the coordinator and its term stay.
        follower = next(p for p in procs if p is not new_leader)
        lab.link(follower.index, up=False)
        chances_to_lead([follower], secret)  # alone, its timer fired: no Pre-Vote majority
        lab.link(follower.index, up=True)
        leader_id = statuses([new_leader], secret)[new_leader.index]["node_id"]
        wait_until(lambda: statuses([follower], secret)[follower.index]["coordinator"] ==
                   leader_id, 30, "the follower to hear the coordinator again")
        st = statuses(procs, secret)
        assert st[new_leader.index]["role"] == "coordinator" and st[new_leader.index]["term"] == \
            new_term
        # The refused update was recorded on the isolated node only; healing handed it to the
        # coordinator (its client was told "not durable", not "refused": it may count, once).
        current = st[new_leader.index]["current_round"]
        for k, cid in enumerate(("alice", "bob")[:max(0, 2 - current["updates"])]):
            with client(new_leader, secret, cid) as c:
                c.submit(write_update(tmp_path / f"h{cid}.safetensors", spec, 900 + k),
                         round=current["round"], examples=1, trained_from=current["trained_from"])
        wait_until(lambda: all(any(r[0] == current["round"] for r in rows)
                               for rows in histories(procs, secret).values()), 30,
                   "the round after healing to commit everywhere")


def test_split_start_the_joiner_waits_then_finds_its_founder_within_seconds(
        tmp_path, tiny_base, spec):
    """Issue 11 #3: a joiner that cannot see its founder makes no history of its own; when the
    link comes up, mDNS re-queries find the founder within seconds and it catches up."""
    identity = make_dirs(tmp_path, 2)
    secret = identity.secret
    with NetLab(2) as lab:
        lab.link(1, up=False)
        founder = lab.start(0, tmp_path / "d0", tiny_base, NODE_ARGS)
        joiner = lab.start(1, tmp_path / "d1", tiny_base, NODE_ARGS)
        wait_until(lambda: statuses([founder], secret)[0]["role"] == "coordinator", 30,
                   "the founder to lead alone")
        run_round(founder, [founder], secret, spec, tmp_path, 1)
        chances_to_lead([joiner], secret)  # past its bootstrap wait, with chances to lead
        st = statuses([joiner], secret)[1]
        assert st["role"] == "follower" and st["latest_committed"]["round"] == 0
        assert not joiner.saw("coordinator_elected")
        lab.link(1, up=True)
        started = time.monotonic()
        wait_until(lambda: histories([founder, joiner], secret)[0] ==
                   histories([founder, joiner], secret)[1], 30, "the joiner to catch up")
        assert time.monotonic() - started < 20
        assert not joiner.saw("history_diverged")


def one_coordinator_among(procs, secret):
    def check():
        st = statuses(procs, secret)
        leaders = [i for i, s in st.items() if s["role"] == "coordinator" and s["quorum"]]
        return next(p for p in procs if p.index == leaders[0]) if len(leaders) == 1 else None
    return wait_until(check, 60, "a coordinator among the majority", lab=procs[0].lab)


def test_default_up_over_a_shaped_link_finds_peers_and_runs_rounds(tmp_path, tiny_base, spec):
    """Issue 20 #1 and #2: `up` as README runs it on a lab machine (mDNS on every interface, no
    --interface) starts, finds its peers over mDNS and runs rounds, while one node sits behind a
    slow link whose small MTU splits every peer message into many TCP segments (with 5 ms
    delay and 1% loss where the kernel has sch_netem; this machine's has htb's rate only)."""
    identity = make_dirs(tmp_path, 3)
    secret = identity.secret
    with NetLab(3) as lab:
        shaping = lab.shape(2, rate_mbit=20, delay_ms=5, mtu=576, loss_pct=1.0)
        procs = [lab.start(i, tmp_path / f"d{i}", tiny_base, NODE_ARGS, bind_lan=False)
                 for i in range(3)]
        leader = one_coordinator(procs, secret, members=3)
        for proc in procs:  # the default path: zeroconf on all interfaces, and nothing crashed
            assert proc.proc.poll() is None, proc.describe()
            assert not [e for e in proc.events if "Traceback" in json.dumps(e)], proc.describe()
        for number in (1, 2, 3):
            run_round(leader, procs, secret, spec, tmp_path, number)
        h = histories(procs, secret)
        assert len({tuple(rows) for rows in h.values()}) == 1 and len(h[0]) == 4, shaping
        for proc in procs:  # no peer message was refused as split or mismatched
            refused = [e for e in proc.events if e.get("event") == "request_refused"
                       and e["data"].get("error") == "body_mismatch"]
            assert refused == [], (shaping, refused)


def test_two_bootstrapped_halves_meet_once_the_link_is_back(tmp_path, tiny_base, spec):
    """Issue 20 #3: after a --bootstrap split, two complete one-node federations did not meet
    for minutes after link-up (a one-node federation stopped browsing). They now keep
    re-querying mDNS, meet, and the one that follows reports history_diverged with both heads."""
    identity = make_dirs(tmp_path, 2)
    secret = identity.secret
    args = [*NODE_ARGS[:-2], "--min-updates", "1", "--bootstrap"]
    with NetLab(2) as lab:
        lab.link(1, up=False)
        procs = [lab.start(i, tmp_path / f"d{i}", tiny_base, args, bind_lan=False)
                 for i in range(2)]
        launched = time.monotonic()
        for proc in procs:
            wait_until(lambda p=proc: statuses([p], secret)[p.index]["role"] == "coordinator",
                       60, f"node {proc.index} to lead alone", lab=lab)
            with client(proc, secret, f"c{proc.index}") as c:
                c.submit(write_update(tmp_path / f"half{proc.index}.safetensors", spec,
                                      40 + proc.index), examples=1)
        for proc in procs:
            wait_until(lambda p=proc: max(r[0] for r in histories([p], secret)[p.index]) == 1, 30,
                       f"node {proc.index}'s own round 1", lab=lab)
        # Down long enough that mDNS browsers have backed off to queries a minute apart: the
        # halves must not wait for the next one.
        time.sleep(max(0.0, 40.0 - (time.monotonic() - launched)))
        lab.link(1, up=True)
        started = time.monotonic()

        def reported():
            st = statuses(procs, secret)
            return any(s.get("history_diverged") for s in st.values())
        wait_until(reported, 60, "the halves to meet and report the divergence", lab=lab)
        assert time.monotonic() - started < 20
