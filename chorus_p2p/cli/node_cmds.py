"""Sub-commands that create, run or talk to a node: ``init``, ``up``, ``status``, ``rounds``,
``members``, ``submit``, ``pull``, ``close-round``, ``pause``, ``resume``, ``gc``.

Client commands find the node at ``--node URL`` (or ``CHORUS_NODE``, default
``http://127.0.0.1:8470``) and authenticate with the credentials in ``--data-dir`` (the local
node's), or with ``--join TOKEN`` (``CHORUS_JOIN_TOKEN``) from another machine.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from chorus_p2p.cli.output import print_json
from chorus_p2p.cli.types import add_dataset_options, add_dp_options, add_precision_options
from chorus_p2p.cli.types import (non_negative_float, non_negative_int, positive_int,
                                  round_or_latest)
from chorus_p2p.lora.names import STRATEGIES
from chorus_p2p.node.settings import DEFAULT_DATA_DIR


def _node_url(args: argparse.Namespace) -> str:
    """``--node`` (or ``$CHORUS_NODE``) as a URL: ``host:port`` gets ``http://``; anything that
    is not a URL is a usage error, not a traceback."""
    from urllib.parse import urlsplit

    from chorus_p2p.client import DEFAULT_URL
    from chorus_p2p.errors import UsageError

    raw = (getattr(args, "node", None) or os.environ.get("CHORUS_NODE")
           or _local_node_url(args) or DEFAULT_URL).strip()
    url = raw if "://" in raw else f"http://{raw}"
    try:
        parts = urlsplit(url)
        parts.port  # raises on a port that is not a number
    except ValueError as exc:
        raise UsageError(f"--node {raw!r} is not a URL ({exc})") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname or " " in raw:
        raise UsageError(f"--node {raw!r} is not a node URL; give http://HOST:PORT "
                         "(e.g. http://10.0.0.5:8470)")
    return f"{parts.scheme}://{parts.netloc}"


def _local_node_url(args: argparse.Namespace) -> str | None:
    """With no --node, the node running on the local data dir is the one meant, whatever port
    it listens on (its lock file says where)."""
    from chorus_p2p.node.lock import DataDirLock

    url = DataDirLock(_data_dir(args)).running_url()
    if url and "://0.0.0.0:" in url:
        url = url.replace("://0.0.0.0:", "://127.0.0.1:")
    return url


def _join_token(args: argparse.Namespace) -> str | None:
    """The join token: ``--join-file PATH`` (``-`` reads stdin), ``$CHORUS_JOIN_TOKEN``, or
    ``--join TOKEN`` (visible to every user in ``ps`` while the command runs: prefer the
    others for long-running nodes)."""
    from chorus_p2p.errors import UsageError

    path = getattr(args, "join_file", None)
    if path:
        try:
            text = sys.stdin.read() if path == "-" else Path(path).read_text()
        except OSError as exc:
            raise UsageError(f"--join-file {path}: {exc.strerror or exc}") from exc
        return text.strip() or None
    return getattr(args, "join", None) or os.environ.get("CHORUS_JOIN_TOKEN") or None


def _client(args: argparse.Namespace, admin: bool = False):
    """A client for the node at ``--node``.

    Credentials: an explicit ``--join``/``--join-file``, else the local data dir, else
    ``$CHORUS_JOIN_TOKEN``. Admin commands prefer the local data dir even when
    ``CHORUS_JOIN_TOKEN`` is exported, since only the data dir holds the admin token.
    """
    from chorus_p2p.client import NodeClient

    url = _node_url(args)
    kwargs = {"client_id": args.client_id} if getattr(args, "client_id", None) else {}
    token = _credential_token(args, admin)
    if token:
        client = NodeClient.from_join_token(url, token, **kwargs)
    else:
        client = NodeClient.from_data_dir(_data_dir(args), url, **kwargs)
    if admin and not client.admin_token:
        from chorus_p2p.client import MissingAdminToken

        client.close()
        raise MissingAdminToken(
            "this is an admin command: it needs the node's admin token, which only the node's "
            f"data dir holds (looked in {_data_dir(args)}; give --data-dir DIR, or run it on "
            "the node's machine). A join token gives no admin rights.")
    return client


def _credential_token(args: argparse.Namespace, admin: bool) -> str | None:
    """The join token to authenticate with, or None to use the local data dir.

    A flag beats the environment: an explicit ``--join``/``--join-file`` always wins, and an
    explicit ``--data-dir`` that holds an identity beats ``$CHORUS_JOIN_TOKEN`` (another
    federation's token left in the shell signed with the wrong secret: ``bad_signature``).
    Without either flag, a caller that may act as admin (admin commands, the TUI) prefers the
    local data dir over ``$CHORUS_JOIN_TOKEN``: only the data dir holds the admin token."""
    from chorus_p2p.trust.identity import IDENTITY_FILE

    explicit = getattr(args, "join", None) or getattr(args, "join_file", None)
    local = (Path(_data_dir(args)) / IDENTITY_FILE).is_file()
    token = _join_token(args)
    if explicit:
        return token
    if local and (admin or getattr(args, "data_dir", None)):
        return None
    return token


def _data_dir(args: argparse.Namespace) -> str:
    return args.data_dir or os.environ.get("CHORUS_DATA_DIR") or DEFAULT_DATA_DIR


_print_json = print_json


def _when(ts: float | None) -> str:
    # round 0 (the shared initialisation) was never committed at a time: no date for it
    return "-" if not ts else dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


# -- init / up ------------------------------------------------------------------------------------
def _cmd_init(args: argparse.Namespace) -> int:
    from chorus_p2p.errors import UsageError
    from chorus_p2p.federation.dp_policy import DPPolicy
    from chorus_p2p.trust.identity import init_data_dir

    join = _join_token(args) if (args.join or args.join_file) else None
    dp_policy = None
    if args.require_dp:
        if args.dp_max_epsilon is None:
            raise UsageError("--require-dp needs --dp-max-epsilon (the most a node may spend)")
        dp_policy = DPPolicy(args.dp_max_epsilon, args.dp_min_noise, args.dp_max_delta,
                             args.dp_mechanism).to_json()
    elif args.dp_max_epsilon is not None:
        raise UsageError("--dp-max-epsilon belongs with --require-dp")
    identity = init_data_dir(_data_dir(args), args.federation, join_token=join,
                             force=args.force,
                             admission="approval" if args.approve_joins else "open",
                             dp_policy=dp_policy)
    if args.json:
        _print_json({"node_id": identity.node_id, "federation": identity.federation,
                     "data_dir": str(identity.data_dir), "join_token": identity.join_token(),
                     "dp_policy": identity.dp_policy})
        return 0
    print(f"node {identity.node_id} of federation {identity.federation!r} in {identity.data_dir}")
    print("join token (give it to the other machines; it is a secret):")
    print(f"  {identity.join_token()}")
    if identity.dp_policy:
        print(DPPolicy.from_json(identity.dp_policy).describe())
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    from chorus_p2p.node.service import configure_logging, run_node
    from chorus_p2p.node.settings import resolve_settings

    flags = {k: getattr(args, k) for k in ("model", "data_dir", "host", "port", "strategy",
                                           "rank", "alpha", "target_modules", "task_type",
                                           "modules_to_save", "min_updates",
                                           "round_deadline", "headless", "mdns",
                                           "election_timeout", "approve_joins", "remote_admin", "bootstrap",
                                           "member_timeout",
                                           "train",
                                           "max_update_norm", "outlier_mad",
                                           "max_update_ratio", "dp_epsilon",
                                           "rate_limit", "tls", "header_timeout",
                                           "max_connections",
                                           "dp_delta", "dp_clip", "dp_noise", "dp_mechanism",
                                           "dataset", "steps",
                                           "lr", "batch_size", "device", "keep_rounds",
                                           "checkpoint_every", "compute_dtype", "grad_accum",
                                           "max_seq_len", "max_rounds", "eval_data", "eval_every", "patience",
                                           "gradient_checkpointing", "quantize",
                                           "text_field", "dataset_split", "dataset_config")}
    flags["peers"] = args.peer
    flags["interfaces"] = args.interface
    settings = resolve_settings(flags)
    if args.join:
        print("chorus-node: note: --join puts the secret token in the process list (ps) for as "
              "long as the node runs; prefer --join-file PATH or CHORUS_JOIN_TOKEN",
              file=sys.stderr)
    token = _join_token(args)
    if token:
        from chorus_p2p.trust.identity import IDENTITY_FILE, init_data_dir

        if not (Path(settings.data_dir) / IDENTITY_FILE).exists():
            identity = init_data_dir(settings.data_dir, join_token=token)
            print(f"joined federation {identity.federation!r} as node {identity.node_id}",
                  file=sys.stderr)
    configure_logging(settings.headless, args.verbose)
    return asyncio.run(run_node(settings))


# -- client commands ------------------------------------------------------------------------------
def _cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as node:
        status = node.status()
    if args.json:
        _print_json(status)
        return 0
    print(f"node        {status['node_id']}  ({status['role']}, term {status['term']}, "
          f"{'quorum' if status['quorum'] else 'NO QUORUM'})")
    diverged = status.get("history_diverged")
    if diverged:
        print(f"DIVERGED    our committed history ends at round {diverged['ours']['round']} "
              f"({str(diverged['ours']['log_hash'])[:12]}), the coordinator's at round "
              f"{diverged['theirs']['round']} ({str(diverged['theirs']['log_hash'])[:12]}); "
              "`chorus-node resolve` adopts the coordinator's (ours is archived, not deleted)")
    split = status.get("split")
    if split:
        print(f"SPLIT       this node and {split['peer'][:12]} removed each other (remove --force "
              f"on both sides); ours ends at round {split['ours']['round']}, theirs at round "
              f"{split['theirs'].get('round')}. Keep one history: stop the other node and "
              "re-join it with a new --data-dir")
    print(f"federation  {status['federation']}  ({status['counts']['members']} members, "
          f"{status['counts']['rounds']} rounds, {status['counts']['updates']} updates)")
    current = status["current_round"]
    if current:
        print(f"round       {current['round']} {current['state']}: {current['updates']}/"
              f"{current['expected']} updates (min {current['min_updates']}), deadline "
              f"{_when(current['deadline_at'])}")
    else:
        print(f"round       none collecting{' (paused)' if status['paused'] else ''}")
    latest = status["latest_committed"]
    if latest:
        print(f"committed   round {latest['round']} at {_when(latest['committed_at'])}, "
              f"adapter {latest['adapter_sha'][:12]}")
    state = status.get("state")
    if state:
        checkpoint = state["checkpoint"]
        health = ("DIVERGED: " + state["diverged"]) if state["diverged"] else (
            f"verified at round {state['verified_round']}" if state["verified_round"] is not None
            else "not verified yet")
        print(f"state       R at round {state['round']} ({health}); checkpoint "
              f"{checkpoint['round'] if checkpoint else 'none yet'}")
    privacy = status.get("privacy") or {}
    if privacy.get("local"):
        local = privacy["local"]
        kind = "local DP" if local["mechanism"] == "gaussian-local" else "DP-SGD"
        print(f"privacy     {kind}: epsilon {local['epsilon_spent']:.3f} of "
              f"{local['epsilon_budget']:g} spent at delta {local['delta']:g} over "
              f"{local['releases']} release(s); unit: {local['unit']}"
              f"{' (BUDGET SPENT: not submitting)' if local['exhausted'] else ''}")
    if privacy.get("policy"):
        policy = privacy["policy"]
        mechanism = f"{policy['mechanism']}, " if policy.get("mechanism") else ""
        print(f"dp policy   every update: {mechanism}noise >= {policy['min_noise']:g}, epsilon "
              f"<= {policy['max_epsilon']:g}, delta <= {policy['max_delta']:g}")
    return 0


def _cmd_gc(args: argparse.Namespace) -> int:
    """Collect through the node that holds the data dir, or directly when none runs."""
    from chorus_p2p.node.lock import DataDirBusy, DataDirLock

    if args.node or _join_token(args):
        with _client(args, admin=True) as node:
            report = node.gc()
    else:
        data_dir = Path(_data_dir(args))
        try:
            with DataDirLock(data_dir):
                report = _offline_gc(data_dir, args.keep_rounds)
        except DataDirBusy as exc:
            url = exc.holder.get("url")
            if not url:
                raise
            args.node = url
            with _client(args, admin=True) as node:
                report = node.gc()
    if args.json:
        _print_json(report)
    else:
        print(f"pruned {len(report['pruned_rounds'])} round(s), deleted "
              f"{report['deleted_blobs']} blob(s), freed {report['freed_bytes'] / 1e6:.1f} MB")
    return 0


def _offline_gc(data_dir: Path, keep_rounds: str | None) -> dict[str, Any]:
    import json as _json

    from chorus_p2p.errors import UsageError
    from chorus_p2p.node.blobs import BlobStore
    from chorus_p2p.node.ledger import Ledger
    from chorus_p2p.node.retention import Retention
    from chorus_p2p.node.service import BLOB_DIR, LEDGER_FILE, STATE_DIR
    from chorus_p2p.node.settings import parse_keep_rounds, resolve_settings
    from chorus_p2p.federation.spec import FederationSpec
    from chorus_p2p.state.store import StateStore

    if not (data_dir / LEDGER_FILE).exists():
        raise UsageError(f"{data_dir}: no ledger here (is this a node's --data-dir?)")
    try:
        keep = parse_keep_rounds(keep_rounds) if keep_rounds is not None else \
            resolve_settings({"data_dir": str(data_dir)}).keep_rounds
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    ledger = Ledger(data_dir / LEDGER_FILE)
    try:
        spec = FederationSpec.from_json(_json.loads(ledger.get_meta("spec") or "{}"))
        store = StateStore(data_dir / STATE_DIR, spec.modules, read_only=True,
                           transposed=spec.transposed)
        retention = Retention(ledger, BlobStore(data_dir / BLOB_DIR), keep)
        # Nothing is in flight while no node runs: orphans need no grace period.
        report = asyncio.run(retention.collect(store.recovery_round, grace_s=0.0))
    finally:
        ledger.close()
    return report.to_json()


def _cmd_rounds(args: argparse.Namespace) -> int:
    with _client(args) as node:
        rounds = node.all_rounds() if args.all else node.rounds(limit=args.limit)["rounds"]
    if args.json:
        _print_json(rounds)
        return 0
    print(f"{'round':>5}  {'state':<11} {'strategy':<9} {'updates':>7} {'agg ms':>8} "
          f"{'energy':>7}  {'adapter':<12}  committed")
    for r in rounds:
        m = r.get("metrics") or {}
        energy = m.get("residual_energy")
        print(f"{r['round']:>5}  {r['state']:<11} {r['strategy'] or '-':<9} "
              f"{m.get('updates', '-')!s:>7} {m.get('aggregation_ms', '-')!s:>8} "
              f"{'-' if energy is None else f'{energy:.4f}':>7}  {(r['adapter_sha'] or '-')[:12]:<12}"
              f"  {_when(r['committed_at'])}")
    return 0


def _cmd_members(args: argparse.Namespace) -> int:
    with _client(args) as node:
        members = node.members()
    if args.json:
        _print_json(members)
        return 0
    print(f"{'node id':<12}  {'name':<16} {'role':<11} {'status':<8} {'last seen':>9}  addresses")
    for m in members:
        age = m.get("last_seen_age_s")
        seen = "-" if age is None else _age(age)
        if m.get("role") == "coordinator" and m["status"] == "live" and age is None:
            seen = "now"
        print(f"{m['node_id'][:12]:<12}  {(m['name'] or '-')[:16]:<16} {m.get('role') or '-':<11} "
              f"{m['status'] or '-':<8} {seen:>9}  {','.join(m['addresses']) or '-'}")
    return 0


def _age(seconds: float) -> str:
    """A human age: 0.4s, 12s, 5m, 3h, 2d (what `kubectl get` prints)."""
    if seconds < 10:
        return f"{seconds:.1f}s ago"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _why_no_round(status: dict) -> str:
    if status.get("paused"):
        return "rounds are paused (an admin ran `pause`; `resume` opens them)"
    if not status.get("coordinator"):
        return ("the federation has no coordinator yet (an election is under way: a node with "
                "mDNS on first listens for its peers)")
    return "the last round is aggregating or committing; the next opens right after"


def _wait_for_collecting_round(node, wait: float) -> bool:
    """Before a submit to "the current round": wait for one to be collecting. Right after `up`
    there is none until the node has looked for peers and elected a coordinator; a submit then
    failed with a misleading "the federation moved on". Says once why it waits."""
    deadline = time.monotonic() + wait
    said = False
    while True:
        status = node.status()
        current = status.get("current_round")
        if current is not None and current.get("state") in ("open", "collecting"):
            return True
        if time.monotonic() >= deadline:
            print(f"chorus-node: no round is collecting updates after {wait:g}s: "
                  f"{_why_no_round(status)}; nothing was sent", file=sys.stderr)
            return False
        if not said:
            print(f"waiting up to {wait:g}s for a round to collect updates: "
                  f"{_why_no_round(status)}", file=sys.stderr, flush=True)
            said = True
        time.sleep(0.5)


def _cmd_submit(args: argparse.Namespace) -> int:
    from chorus_p2p.client import ConflictError

    with _client(args) as node:
        if args.round is None and not _wait_for_collecting_round(node, args.wait):
            return 3
        try:
            result = node.submit(args.adapter, round=args.round, examples=args.examples,
                                 trained_from=args.trained_from)
        except ConflictError as exc:
            if exc.code not in ("round_closed", "stale_base") or args.round is not None:
                raise
            # The federation committed the round this adapter was for before it arrived
            # (min_updates met without it): routine, and one line says what to do.
            print(f"chorus-node: the federation moved on before this update arrived "
                  f"({exc.code}): it was trained from an older global adapter than the round "
                  "now collecting builds on. Pull the latest (`chorus-node pull`), train from "
                  "it and submit again (`chorus-node train` does this loop itself)",
                  file=sys.stderr)
            return 3
    if args.json:
        _print_json(result)
    else:
        note = " (already received; nothing changed)" if result["duplicate"] else ""
        print(f"round {result['round']}: update {result['sha256'][:12]} accepted{note}")
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    with _client(args) as node:
        out = node.pull(args.out, round=args.round, force=args.force, residual=args.residual,
                        cumulative=args.cumulative)
    from chorus_p2p.client import PROVENANCE_FILE

    number = json.loads((out / PROVENANCE_FILE).read_text())["round"]
    files = sorted(p.name for p in out.iterdir())
    if args.json:
        _print_json({"out": str(out), "round": number, "files": files})
    else:
        print(f"adapter of round {number} -> {out}  ({', '.join(files)})")
    return 0


def _cmd_join_token(args: argparse.Namespace) -> int:
    from chorus_p2p.trust.identity import load_identity

    identity = load_identity(_data_dir(args))
    if args.json:
        _print_json({"join_token": identity.join_token(), "federation": identity.federation,
                     "node_id": identity.node_id})
    else:
        print(identity.join_token())
    return 0


def _admin(action: str):
    def run(args: argparse.Namespace) -> int:
        with _client(args, admin=True) as node:
            result = getattr(node, action)()
        _print_json(result) if args.json else print(
            " ".join(f"{k}={v}" for k, v in result.items()))
        return 0
    return run


def _decide(approve: bool):
    def run(args: argparse.Namespace) -> int:
        with _client(args, admin=True) as node:
            result = node.decide_member(args.member, approve)
        _print_json(result) if args.json else print(f"{result['node_id']}: {result['status']}")
        return 0
    return run


def _cmd_exclude(args: argparse.Namespace) -> int:
    with _client(args, admin=True) as node:
        result = node.exclude_update(args.member, round=args.round, reason=args.reason)
    if args.json:
        _print_json(result)
    else:
        print(f"round {result['round']}: {result['node_id']}'s update excluded ({result['reason']})")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from chorus_p2p.node.doctor import diagnose

    report = diagnose(_data_dir(args), repair=args.repair)
    if args.json:
        _print_json(report.to_json())
    else:
        for finding in report.findings:
            print(finding.line())
    return 0 if report.healthy else 3


def _cmd_remove(args: argparse.Namespace) -> int:
    with _client(args, admin=True) as node:
        result = node.remove_member(args.member, force=args.force)
    if args.json:
        _print_json(result)
    else:
        note = " (forced: on this node only)" if result.get("forced") else ""
        print(f"{result['node_id']}: removed{note}")
    if result.get("forced"):
        print("warning: removed without a majority. If that node is alive on the other side of a "
              "partition and someone removes this one there, the federation becomes two with two "
              "histories; both nodes report the split (status: SPLIT) when they meet again",
              file=sys.stderr)
    return 0


def _cmd_tui(args: argparse.Namespace) -> int:
    from chorus_p2p.client import AsyncNodeClient
    from chorus_p2p.trust.identity import load_identity
    from chorus_p2p.tui.app import run_tui

    url = _node_url(args)
    token = _credential_token(args, admin=True)  # its admin keys need the data dir's token
    kwargs = {"client_id": args.client_id or "tui"}
    if token:
        client = AsyncNodeClient.from_join_token(url, token, **kwargs)
    else:
        load_identity(_data_dir(args))  # a clear error if there is no local node here
        client = AsyncNodeClient.from_data_dir(_data_dir(args), url, **kwargs)
    return run_tui(client, url)


def _client_options(parser: argparse.ArgumentParser, json_flag: bool = True) -> None:
    parser.add_argument("--node", metavar="URL", help="node URL (default $CHORUS_NODE or "
                        "http://127.0.0.1:8470)")
    parser.add_argument("--data-dir", help=f"local node's data dir for credentials (default "
                        f"$CHORUS_DATA_DIR or {DEFAULT_DATA_DIR})")
    parser.add_argument("--join", metavar="TOKEN", help="authenticate with a join token instead "
                        "(default $CHORUS_JOIN_TOKEN)")
    parser.add_argument("--join-file", metavar="PATH", help="read the join token from a file "
                        "('-': stdin), so it does not show in ps")
    parser.add_argument("--client-id", help="name this caller (default: the local node id)")
    if json_flag:
        parser.add_argument("--json", action="store_true", help="machine-readable output")


def register(commands: argparse._SubParsersAction) -> None:
    init = commands.add_parser("init", help="create a node identity and federation credentials")
    init.add_argument("--federation", metavar="NAME", help="name of a new federation")
    init.add_argument("--join", metavar="TOKEN", help="join an existing federation instead "
                      "(visible in ps; prefer --join-file or $CHORUS_JOIN_TOKEN)")
    init.add_argument("--join-file", metavar="PATH", help="read the join token from a file "
                      "('-': stdin)")
    init.add_argument("--data-dir", help=f"default $CHORUS_DATA_DIR or {DEFAULT_DATA_DIR}")
    init.add_argument("--force", action="store_true", help="replace an existing identity")
    init.add_argument("--approve-joins", action="store_true",
                      help="new federation: every node holds a newcomer as pending until an "
                           "admin approves it (the join token carries this policy)")
    init.add_argument("--require-dp", action="store_true",
                      help="new federation: every update must declare local DP at least as "
                           "strong as --dp-min-noise/--dp-max-epsilon/--dp-max-delta (the join "
                           "token carries this policy; nodes refuse raw updates)")
    init.add_argument("--dp-max-epsilon", type=float, metavar="EPS",
                      help="with --require-dp: the most epsilon a node may have spent")
    init.add_argument("--dp-min-noise", type=float, default=1.0, metavar="Z",
                      help="with --require-dp: the least noise multiplier (default 1.0)")
    init.add_argument("--dp-max-delta", type=float, default=1e-5, metavar="DELTA",
                      help="with --require-dp: the largest delta (default 1e-5)")
    init.add_argument("--dp-mechanism", choices=("gaussian-local", "dp-sgd"),
                      default="gaussian-local",
                      help="with --require-dp: the mechanism, hence the unit, every update must "
                           "use (default gaussian-local: a node's whole dataset; dp-sgd: one "
                           "record)")
    init.add_argument("--json", action="store_true", help="machine-readable output")
    init.set_defaults(handler=_cmd_init)

    up = commands.add_parser("up", help="run the node",
                             description="Run a node. Settings: flags, then CHORUS_* environment "
                                         "variables, then DATA_DIR/config.toml.")
    up.add_argument("--model", metavar="ID_OR_PATH", help="base model (HF id or local folder)")
    up.add_argument("--data-dir", help=f"identity, ledger, blobs and state (default "
                    f"$CHORUS_DATA_DIR or {DEFAULT_DATA_DIR})")
    up.add_argument("--host", help="listen address (default 127.0.0.1)")
    up.add_argument("--port", type=non_negative_int, help="listen port (default 8470; 0 picks a free one)")
    up.add_argument("--strategy", choices=STRATEGIES,
                    help="aggregation (default fedex-svd: exact, residual folded into R)")
    up.add_argument("--rank", type=positive_int, help="LoRA rank (default 16)")
    up.add_argument("--alpha", type=float, help="LoRA alpha (default 32)")
    up.add_argument("--target-modules", help="comma-separated (default q_proj,v_proj)")
    up.add_argument("--task-type", choices=("CAUSAL_LM", "SEQ_CLS"),
                    help="PEFT task type (default CAUSAL_LM; SEQ_CLS for a classifier)")
    up.add_argument("--modules-to-save", metavar="NAMES",
                    help="comma-separated modules trained in full and averaged (a classifier "
                         "head such as score or classifier, lm_head, embed_tokens)")
    up.add_argument("--min-updates", type=positive_int, help="updates needed to aggregate (default 2)")
    up.add_argument("--round-deadline", type=float, help="seconds to wait for stragglers "
                    "(default 600)")
    up.add_argument("--headless", action="store_true", default=None,
                    help="one JSON object per log line on stdout")
    up.add_argument("--join-file", metavar="PATH",
                    help="the join token from a file ('-': stdin); or set CHORUS_JOIN_TOKEN. "
                         "Either keeps the secret out of the process list")
    up.add_argument("--join", metavar="TOKEN", help="create this node's identity from a join "
                    "token first (if the data dir has none)")
    up.add_argument("--peer", action="append", metavar="HOST:PORT",
                    help="static peer (repeatable), for networks where multicast does not pass")
    up.add_argument("--interface", action="append", metavar="IP",
                    help="advertise and browse mDNS only on this address (repeatable; "
                         "default: all interfaces)")
    up.add_argument("--no-mdns", dest="mdns", action="store_const", const=False, default=None,
                    help="no mDNS at all: static peers only")
    up.add_argument("--election-timeout", type=float, metavar="SECONDS",
                    help="base election timeout (default 1.0; heartbeats every quarter of it)")
    up.add_argument("--approve-joins", action="store_true", default=None,
                    help="new members wait until an admin approves them (approve/reject, TUI)")
    up.add_argument("--no-remote-admin", dest="remote_admin", action="store_const", const=False,
                    default=None, help="as coordinator, refuse admin actions that other members' "
                    "nodes forward for their admins (default: accept them from verified voting "
                    "members, so an admin attached to any node can steer the federation)")
    up.add_argument("--member-timeout", type=float, metavar="SECONDS",
                    help="a member unseen this long stops counting toward the majority until it "
                         "is back (default 3600; 0: never)")
    up.add_argument("--bootstrap", action="store_true", default=None,
                    help="this node may start the federation's history (what the node that ran "
                         "`init --federation` does anyway); a node that joined with a token "
                         "otherwise waits until it reaches a member")
    up.add_argument("--tls", action="store_true", default=None,
                    help="serve HTTPS; peers pin each other's certificate by node id")
    up.add_argument("--rate-limit", type=float, metavar="PER_SECOND",
                    help="requests per second per caller (default 100, bursts of twice that)")
    up.add_argument("--header-timeout", type=float, metavar="SECONDS",
                    help="close a connection with no request in progress after this long "
                         "(slow or idle clients; default 10)")
    up.add_argument("--max-connections", type=positive_int, metavar="N",
                    help="open connections at most; the longest idle go first (default 512)")
    up.add_argument("--max-update-norm", type=float, metavar="NORM",
                    help="robust filter: leave out updates whose ||s B A|| exceeds NORM")
    up.add_argument("--max-update-ratio", type=float, metavar="R",
                    help="leave out updates whose ||s B A|| is more than R times the median of "
                         "recently accepted ones (default 100; 0 turns it off)")
    up.add_argument("--outlier-mad", type=float, metavar="K",
                    help="robust filter: leave out updates more than K MADs from the median norm")
    add_dp_options(up, defaults=False)
    up.add_argument("--train", action="store_true", default=None,
                    help="train on --dataset every round and submit the update")
    up.add_argument("--eval-data", metavar="PATH",
                    help="held-out text (any format --dataset reads): evaluate each committed "
                         "global model on it; shown per round (rounds --json), export --best")
    up.add_argument("--eval-every", type=positive_int, metavar="N",
                    help="with --eval-data: every N committed rounds (default 1)")
    up.add_argument("--patience", type=positive_int, metavar="N",
                    help="with --eval-data: leave (exit 0) after N evaluations in a row without "
                         "a new best held-out loss")
    up.add_argument("--max-rounds", type=positive_int, metavar="N",
                    help="with --train: once N committed rounds count this node's update (in "
                         "total, across restarts), leave the federation and exit 0")
    up.add_argument("--dataset", metavar="PATH", help="JSONL/JSON/CSV (text, or instruction/"
                    "input/output), a folder of .txt files; with the datasets extra also "
                    "Parquet, a save_to_disk folder or a hub id")
    add_dataset_options(up, defaults=False)
    up.add_argument("--steps", type=positive_int, help="optimizer steps per round (default 30)")
    up.add_argument("--lr", type=float, help="learning rate (default 2e-4)")
    up.add_argument("--batch-size", type=positive_int, help="sequences per step (default 8)")
    up.add_argument("--device", help="training device: auto (default: CUDA, then MPS, else "
                    "CPU), cpu, cuda, cuda:1, ...")
    add_precision_options(up, defaults=False)
    up.add_argument("--keep-rounds", metavar="N|all",
                    help="keep the blobs of the last N committed rounds (default 10; 'all' for "
                         "audit); older rounds keep their record and hashes")
    up.add_argument("--checkpoint-every", type=positive_int, metavar="N",
                    help="checkpoint the state R every N rounds (default 10)")
    up.set_defaults(handler=_cmd_up)

    gc = commands.add_parser(
        "gc", help="(admin) drop blobs outside the retention window now",
        description="Run the garbage collector: through the running node when one holds the "
                    "data dir, else directly on the data dir.")
    _client_options(gc)
    gc.add_argument("--keep-rounds", metavar="N|all",
                    help="(node not running) override the data dir's retention setting")
    gc.set_defaults(handler=_cmd_gc)

    for name, handler, text in (("status", _cmd_status, "node and federation status"),
                                ("members", _cmd_members, "federation members")):
        sub = commands.add_parser(name, help=text)
        _client_options(sub)
        sub.set_defaults(handler=handler)

    rounds = commands.add_parser("rounds", help="round history, newest first")
    _client_options(rounds)
    rounds.add_argument("--limit", type=positive_int, default=20,
                        help="newest N rounds (default 20)")
    rounds.add_argument("--all", action="store_true", help="every round (follows pages)")
    rounds.set_defaults(handler=_cmd_rounds)

    submit = commands.add_parser("submit", help="submit an adapter to a round")
    _client_options(submit)
    submit.add_argument("adapter", metavar="ADAPTER", help="PEFT folder or .safetensors")
    submit.add_argument("--examples", type=positive_int, help="example count (the update's weight)")
    submit.add_argument("--round", type=non_negative_int, help="default: the current round")
    submit.add_argument("--wait", type=non_negative_float, default=60.0, metavar="S",
                        help="without --round: seconds to wait for a round to collect updates "
                             "(right after `up` the node may still be electing; default 60)")
    submit.add_argument("--trained-from", type=non_negative_int, help="round the training started from")
    submit.set_defaults(handler=_cmd_submit)

    pull = commands.add_parser("pull", help="download a round's global adapter as a PEFT folder")
    _client_options(pull)
    pull.add_argument("--out", required=True, metavar="OUT_DIR",
                      help="the PEFT folder to write (created whole, or not at all)")
    pull.add_argument("--round", type=round_or_latest, help="round number (default: latest committed)")
    pull.add_argument("--residual", action="store_true", help="also fetch that round's residual")
    pull.add_argument("--cumulative", action="store_true", help="also fetch R after that round")
    pull.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    pull.set_defaults(handler=_cmd_pull)

    for name, approve in (("approve", True), ("reject", False)):
        sub = commands.add_parser(name, help=f"(admin) {name} a pending member")
        _client_options(sub)
        sub.add_argument("member", metavar="NODE_ID", help="node id (a unique prefix will do)")
        sub.set_defaults(handler=_decide(approve))

    token = commands.add_parser(
        "join-token", help="(admin) print the federation's join token again",
        description="Print the join token that lets another machine join this federation "
                    "(`chorus-node up --join-file FILE`). It is read from the node's data dir, "
                    "so only whoever can read that folder gets it. It contains the federation "
                    "secret: pass it by file or environment, not on a command line.")
    token.add_argument("--data-dir", help=f"the node's data dir (default $CHORUS_DATA_DIR or "
                       f"{DEFAULT_DATA_DIR})")
    token.add_argument("--json", action="store_true", help="machine-readable output")
    token.set_defaults(handler=_cmd_join_token)

    tui = commands.add_parser("tui", help="the live federation dashboard (Textual)")
    _client_options(tui, json_flag=False)
    tui.set_defaults(handler=_cmd_tui)

    remove = commands.add_parser(
        "remove", help="(admin) take a member out of the federation for good",
        description="Remove a member that is gone for good (a dead machine), so the rest keep a "
                    "majority. Run it against the coordinator. In a federation where no "
                    "coordinator is left (two nodes, one dead), --force removes it on this node "
                    "alone: only do that if the other machine will never come back with its "
                    "data dir.")
    _client_options(remove)
    remove.add_argument("member", metavar="NODE_ID", help="node id (a unique prefix will do)")
    remove.add_argument("--force", action="store_true",
                        help="no majority needed (this node only; see above)")
    remove.set_defaults(handler=_cmd_remove)

    exclude = commands.add_parser(
        "exclude", help="(admin) leave one update of the collecting round out",
        description="Leave a client's update out of the round that is collecting (a bad or "
                    "hostile one); the exclusion and its reason are recorded with the round.")
    _client_options(exclude)
    exclude.add_argument("member", metavar="CLIENT_ID", help="the update's client id")
    exclude.add_argument("--round", type=non_negative_int, help="default: the current round")
    exclude.add_argument("--reason", help="recorded with the exclusion")
    exclude.set_defaults(handler=_cmd_exclude)

    doctor = commands.add_parser(
        "doctor", help="check a data dir (ledger, blobs, state); --repair what can be",
        description="Check a node's data dir: identity, ledger, every blob the kept rounds name, "
                    "the state and its checkpoint. With --repair (node stopped): a missing, "
                    "empty or corrupt ledger is moved aside and rebuilt from the federation at "
                    "the next `up`, corrupt blobs are quarantined, a bad checkpoint is removed, "
                    "unnamed blobs are deleted. Exit 0 when healthy (or repaired), 3 otherwise.")
    doctor.add_argument("--data-dir", help=f"default $CHORUS_DATA_DIR or {DEFAULT_DATA_DIR}")
    doctor.add_argument("--repair", action="store_true", help="repair what can be repaired")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.set_defaults(handler=_cmd_doctor)

    resolve = commands.add_parser(
        "resolve", help="(admin) adopt the coordinator's history after a divergence",
        description="When this node's committed history differs from its coordinator's "
                    "(history_diverged), archive this node's rounds (kept in the ledger's "
                    "rounds_archive) and follow the coordinator's history.")
    _client_options(resolve)
    resolve.set_defaults(handler=_admin("resolve"))

    for name, action, text in (("close-round", "close_round", "aggregate the current round now"),
                               ("pause", "pause", "open no new rounds"),
                               ("resume", "resume", "open rounds again")):
        sub = commands.add_parser(name, help=f"(admin) {text}")
        _client_options(sub)
        sub.set_defaults(handler=_admin(action))
