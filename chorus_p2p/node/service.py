"""A running node: wires identity, ledger, blob store, rounds and the HTTP API together.

``chorus-node up`` calls :func:`run_node`; tests start a :class:`Node` in-process on loopback the
same way. SIGINT/SIGTERM stop accepting connections, let in-flight requests and an aggregation in
progress finish, then close the ledger.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import json
import logging
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable

from aiohttp import web

from chorus_p2p import __version__
from chorus_p2p.errors import Refused, UsageError
from chorus_p2p.node.api import build_app
from chorus_p2p.trust.auth import NonceCache, request_key
from chorus_p2p.node.blobs import BlobStore
from chorus_p2p.node.cluster import Cluster, ClusterTiming
from chorus_p2p.node.admin import AdminService
from chorus_p2p.node.discovery import Discovery
from chorus_p2p.node.doctor import ledger_problem
from chorus_p2p.node.events import EventBus
from chorus_p2p.node.guard import ConnectionGuard
from chorus_p2p.trust.identity import load_identity
from chorus_p2p.node.ledger import Ledger
from chorus_p2p.node.cumulative import CumulativeFiles
from chorus_p2p.node.lock import DataDirBusy, DataDirLock
from chorus_p2p.node.nonces import NONCE_FILE, NonceJournal
from chorus_p2p.node.ratelimit import RateLimiter
from chorus_p2p.node.robust import FilterPolicy
from chorus_p2p.node.migrate import convert_legacy_state, needs_conversion
from chorus_p2p.node.retention import Retention
from chorus_p2p.node.rounds import RoundManager, RoundPolicy
from chorus_p2p.node.model_identity import is_local_model, model_fingerprint
from chorus_p2p.node.settings import NodeSettings
from chorus_p2p.federation.dp_policy import DPPolicy, policy_json
from chorus_p2p.federation.spec import FederationSpec
from chorus_p2p.federation.wire import WIRE_VERSION
from chorus_p2p.node.state_keeper import StateKeeper
from chorus_p2p.state.store import StateStore

log = logging.getLogger("chorus_p2p.node")

LEDGER_FILE = "ledger.sqlite"
BLOB_DIR = "blobs"
STATE_DIR = "state"
SPEC_KEYS = ("model", "rank", "alpha", "target_modules", "task_type", "modules_to_save")


def load_or_create_spec(ledger: Ledger, settings: NodeSettings) -> FederationSpec:
    """The federation's spec is fixed at the first ``up``; later flags must agree with it."""
    stored = ledger.get_meta("spec")
    if stored is None:
        if not settings.model:
            raise UsageError("the first `chorus-node up` needs --model ID_OR_PATH")
        spec = FederationSpec.build(settings.model, settings.rank, settings.alpha,
                                    settings.target_modules, settings.task_type,
                                    settings.modules_to_save)
        ledger.set_meta("spec", json.dumps(spec.to_json(), sort_keys=True))
        _record_model(ledger, settings.model)
        return spec
    spec = FederationSpec.from_json(json.loads(stored))
    wanted = {"model": settings.model, "rank": settings.rank, "alpha": settings.alpha,
              "target_modules": tuple(settings.target_modules), "task_type": settings.task_type,
              "modules_to_save": tuple(settings.modules_to_save)}
    for key in SPEC_KEYS:
        if key not in settings.sources or wanted[key] == getattr(spec, key):
            continue
        if key == "model":
            spec = _same_model_elsewhere(ledger, spec, settings.model)
            continue
        raise UsageError(f"this data dir's federation trains {key}={getattr(spec, key)!r}, "
                         f"not {wanted[key]!r}; use a new --data-dir for a different setup")
    return spec


def _mechanism_flag(mechanism: str) -> str:
    from chorus_p2p.federation.dp_policy import MECHANISM

    return "" if mechanism == MECHANISM else f" with --dp-mechanism {mechanism}"


def load_dp_policy(ledger: Ledger, identity) -> DPPolicy | None:
    """The federation's DP policy, from the join token, recorded in the ledger at the first
    ``up``. A data dir that ran under a policy never runs without it (an identity re-made from
    a token with the policy stripped is refused here, as its peers refuse it in the hello)."""
    ours = DPPolicy.from_json(identity.dp_policy)
    stored = ledger.get_meta("dp_policy")
    if stored is None:
        ledger.set_meta("dp_policy", json.dumps(policy_json(ours), sort_keys=True))
        return ours
    recorded = DPPolicy.from_json(json.loads(stored))
    if recorded != ours:
        raise UsageError(f"this data dir's federation has DP policy "
                         f"{policy_json(recorded)}, but its identity's join token says "
                         f"{policy_json(ours)}: a federation's DP policy does not change")
    return ours


def _same_model_elsewhere(ledger: Ledger, spec: FederationSpec, model: str) -> FederationSpec:
    """``--model`` names another path: accept it if it is the same model by content (and
    remember the new path), refuse it otherwise.

    Two local folders compare config and weights. A hub id on one side and a local folder on
    the other (the model was downloaded, or the federation started from a hub id and a lab now
    points at its copy) compare configs only, since one side's weights are not on this disk;
    the log says so. Two different hub ids are refused: nothing here can tell two fine-tunes
    with one architecture apart."""
    marker = ledger.get_meta("model_local")
    recorded_local = marker == "1" if marker else is_local_model(spec.model)
    offered_local = is_local_model(model)
    if recorded_local and offered_local:
        recorded = ledger.get_meta("model_fingerprint") or model_fingerprint(spec.model)
        offered = model_fingerprint(model)
    elif recorded_local or offered_local:
        recorded = (ledger.get_meta("model_config_fingerprint")
                    or model_fingerprint(spec.model, weights=False))
        offered = model_fingerprint(model, weights=False)
    else:
        recorded = offered = None
    if not recorded or offered != recorded:
        why = ("its content differs" if recorded and offered else
               "cannot compare contents (one of them cannot be read here)")
        raise UsageError(f"this data dir's federation trains model={spec.model!r}, not "
                         f"{model!r} ({why}); use a new --data-dir for a different setup")
    if recorded_local and offered_local:
        log.info("the base model moved: %s -> %s (same content)", spec.model, model)
    else:
        log.warning("the base model is now %s (was %s): the same configuration; weights "
                    "could not be compared (a hub id on one side)", model, spec.model)
    moved = dataclasses.replace(spec, model=model)
    ledger.set_meta("spec", json.dumps(moved.to_json(), sort_keys=True))
    _record_model(ledger, model)
    return moved


def _record_model(ledger: Ledger, model: str) -> None:
    """What a later start compares ``--model`` against (see :func:`_same_model_elsewhere`)."""
    ledger.set_meta("model_fingerprint", model_fingerprint(model) or "")
    ledger.set_meta("model_config_fingerprint", model_fingerprint(model, weights=False) or "")
    ledger.set_meta("model_local", "1" if is_local_model(model) else "0")


class Node:
    def __init__(self, settings: NodeSettings):
        self.settings = settings
        self.data_dir = Path(settings.data_dir)
        self.identity = load_identity(self.data_dir)
        self.lock = DataDirLock(self.data_dir)
        try:
            self.lock.acquire()
        except DataDirBusy as exc:
            raise Refused(str(exc)) from exc
        problem = ledger_problem(self.data_dir)
        if problem is not None:
            self.lock.release()
            raise Refused(f"{self.data_dir}: {problem}; nothing was changed. Run `chorus-node "
                             f"doctor --data-dir {self.data_dir}` (with --repair it rebuilds the "
                             "history from the federation, re-using the blobs here)")
        try:
            self.ledger = Ledger(self.data_dir / LEDGER_FILE)
        except BaseException:
            self.lock.release()
            raise
        try:
            self.spec = load_or_create_spec(self.ledger, settings)
            self.dp_policy = load_dp_policy(self.ledger, self.identity)
        except BaseException:
            self.ledger.close()
            self.lock.release()
            raise
        self.blobs = BlobStore(self.data_dir / BLOB_DIR)
        self.request_key = request_key(self.identity.secret)
        self.wire_version = WIRE_VERSION  # what peers must speak (a test makes a newer node)
        self.client_ssl = None
        self.server_ssl = None
        if settings.tls:
            from chorus_p2p.trust.tls import client_context, server_context

            self.server_ssl = server_context(self.identity)
            self.client_ssl = client_context()
        self.nonces = NonceCache()
        self.nonce_journal = NonceJournal(self.data_dir / NONCE_FILE, self.nonces.window)
        since = time.time() - self.nonces.window
        # (0.1 kept nonces in the ledger; a data dir upgraded within the window has some there)
        self.nonces.load(self.nonce_journal.recent(since) + self.ledger.recent_nonces(since))
        # Budgets are charged after authentication, so what strangers send never spends an
        # honest caller's: per caller id; per source address for authenticated requests (a
        # token holder cannot dodge its limit with a new id per request); and a separate
        # per-address budget for refused requests (past it, 429 instead of 401).
        self.rate_limiter = RateLimiter(settings.rate_limit, 2 * settings.rate_limit)
        self.address_limiter = RateLimiter(4 * settings.rate_limit, 8 * settings.rate_limit)
        self.refusal_limiter = RateLimiter(4 * settings.rate_limit, 8 * settings.rate_limit)
        self.bus = EventBus()
        self.policy = RoundPolicy(settings.strategy, settings.min_updates, settings.round_deadline,
                                  FilterPolicy(settings.max_update_norm, settings.outlier_mad,
                                               settings.max_update_ratio))
        self.rounds = RoundManager(self.ledger, self.blobs, self.spec, self.identity.federation,
                                   self.identity.node_id, self.policy, self.bus)
        self.state_store = StateStore(self.data_dir / STATE_DIR, self.spec.modules,
                                      self.rounds.probes,
                                      checkpoint_every=settings.checkpoint_every,
                                      transposed=self.spec.transposed)
        self.retention = Retention(self.ledger, self.blobs, settings.keep_rounds, self.bus,
                                   self.rounds.lock)
        # the cluster is made below; the keeper asks it for the coordinator's files when it runs
        self.state = StateKeeper(self.state_store, self.ledger, self.blobs, self.bus,
                                 self.retention, lambda: self.cluster.coordinator_fetchers())
        self.cumulative = CumulativeFiles(self.data_dir / "cache" / "cumulative")
        self.rounds.on_committed = self.state.wake
        self.rounds.on_history_replaced = self.state.history_replaced
        self.rounds.keep_rounds = settings.keep_rounds
        self.rounds.state_hint = self.state_hint
        self.cluster = Cluster(self, _timing(settings.election_timeout),
                               static_peers=list(settings.peers), discovery_enabled=settings.mdns,
                               approve_joins=settings.approve_joins)
        self.admin = AdminService(self.rounds, self.cluster, self.identity, self.bus,
                                  remote_admin=settings.remote_admin)
        self.discovery: Discovery | None = None
        self.participant = None
        if settings.train:
            from chorus_p2p.node.participant import Participant
            from chorus_p2p.train.trainer import TrainConfig

            from chorus_p2p.train.data import DatasetOptions
            from chorus_p2p.train.privacy import DPConfig, PrivacyBudget

            dp = None if settings.dp_epsilon is None else DPConfig(
                settings.dp_epsilon, settings.dp_delta, settings.dp_clip or 1.0, settings.dp_noise,
                settings.dp_mechanism)
            try:
                if dp is not None:
                    PrivacyBudget(self.ledger, dp).validate()  # releases of another unit
                if dp is not None and dp.mechanism == "dp-sgd":
                    from chorus_p2p.train.dp_sgd import check_targets

                    check_targets(self.spec.kinds)
                if self.dp_policy is not None and dp is None:
                    raise UsageError(f"this federation requires {self.dp_policy.kind} "
                                     f"({self.dp_policy.describe()}): `up --train` needs "
                                     "--dp-epsilon, --dp-clip and --dp-noise"
                                     + _mechanism_flag(self.dp_policy.mechanism))
                if self.dp_policy is not None:
                    self.dp_policy.check_settings(dp.noise_multiplier, dp.delta, dp.epsilon,
                                                  "this node's --dp-* setting", dp.mechanism)
            except BaseException:
                self.ledger.close()
                self.lock.release()
                raise
            released = int(self.ledger.get_meta("dp_rounds", "0") or 0)
            if dp is None and released:
                # Loud: this data dir released DP-noised updates before, and would now send
                # raw ones; the guarantee stated for its earlier rounds says nothing of these.
                log.error("this node released %d differentially private update(s) before and is "
                          "now training WITHOUT DP (no --dp-epsilon): its updates from now on "
                          "carry no privacy guarantee. Stop it and restart with the same --dp-* "
                          "settings unless that is what you mean", released)
                self.bus.publish("dp_disabled", None, {"released_before": released},
                                 level="error")
            self.participant = Participant(self, settings.dataset or "", TrainConfig(
                steps=settings.steps, lr=settings.lr, batch_size=settings.batch_size,
                device=settings.device, compute_dtype=settings.compute_dtype,
                grad_accum=settings.grad_accum, seq_len=settings.max_seq_len,
                gradient_checkpointing=settings.gradient_checkpointing,
                quantize=settings.quantize), dp,
                DatasetOptions(settings.text_field, settings.dataset_split,
                               settings.dataset_config), settings.max_rounds)
        self.evaluator = None
        if settings.eval_data:
            from chorus_p2p.train.data import DatasetOptions
            from chorus_p2p.node.evaluator import NodeEvaluator
            from chorus_p2p.train.trainer import TrainConfig

            self.evaluator = NodeEvaluator(self, settings.eval_data, TrainConfig(
                batch_size=settings.batch_size, device=settings.device,
                seq_len=settings.max_seq_len), settings.eval_every, settings.patience,
                DatasetOptions(settings.text_field, settings.dataset_split,
                               settings.dataset_config))
        self.guard = ConnectionGuard(settings.header_timeout, settings.max_connections)
        self.started_at = time.time()
        self.exit_code = 0
        self.fatal_reason: str | None = None
        # This node takes no part in rounds any more (its privacy budget is spent): heartbeat
        # answers say so, and the coordinator stops waiting for it.
        self.abstaining = False
        self.on_fatal: Callable[[], None] = lambda: None  # run_node: stop the process
        self._runner: web.AppRunner | None = None
        self.address: tuple[str, int] | None = None

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    @property
    def url(self) -> str:
        assert self.address is not None
        host, port = self.address
        scheme = "https" if self.settings.tls else "http"
        return f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}"

    def policy_json(self) -> dict[str, Any]:
        return {"strategy": self.policy.strategy, "min_updates": self.policy.min_updates,
                "round_deadline": self.policy.deadline_s,
                "max_update_norm": self.policy.filters.max_norm,
                "outlier_mad": self.policy.filters.mad_k,
                "max_update_ratio": self.policy.filters.max_ratio,
                "dp_policy": policy_json(self.dp_policy)}

    def finish(self, reason: str) -> None:
        """Stop because the work asked of this node is done (``--max-rounds``): exit 0, leaving
        the federation as SIGTERM does."""
        if self.fatal_reason is None and not getattr(self, "_finishing", False):
            self._finishing = True
            log.info("done: %s; stopping", reason)
            self.bus.publish("node_finished", None, {"reason": reason})
            self.on_fatal()

    def fatal(self, reason: str) -> None:
        """Stop this node for a reason the operator must act on (exit code 3)."""
        log.error("stopping: %s", reason)
        self.bus.publish("fatal", None, {"reason": reason}, level="error")
        self.exit_code = 3
        self.fatal_reason = reason
        self.on_fatal()

    def state_hint(self) -> dict[str, Any]:
        """What this node's state offers peers catching up (sent with heartbeats)."""
        checkpoint = self.state_store.latest_checkpoint()
        return {"round": self.state_store.round,
                "checkpoint_round": checkpoint.round if checkpoint else 0,
                "checkpoint_sha": checkpoint.sha256 if checkpoint else None,
                "retained_from": self.ledger.first_retained_round()}

    def status(self) -> dict[str, Any]:
        current = self.ledger.latest_round()
        committed = self.ledger.latest_committed()
        current_json = None
        if current is not None and current["state"] != "committed":
            current_json = {"round": current["round"], "state": current["state"],
                            "trained_from": current["trained_from"],
                            "updates": self.ledger.count_updates(current["round"]),
                            "min_updates": self.policy.min_updates,
                            "expected": self.rounds.expected_participants(current["round"]),
                            "opened_at": current["opened_at"],
                            "deadline_at": current["deadline_at"]}
        cluster = self.cluster.status_json()
        return {
            "node_id": self.node_id, "federation": self.identity.federation, "url": self.url,
            "version": __version__, **cluster, "paused": self.rounds.paused,
            "history_diverged": self.rounds.diverged,
            "current_round": current_json,
            "latest_committed": None if committed is None else {
                "round": committed["round"], "adapter_sha": committed["adapter_sha"],
                "log_hash": committed["log_hash"], "committed_at": committed["committed_at"],
                "bytes": (committed.get("metrics") or {}).get("bytes")},
            "state": self.state.info(),
            "counts": {"rounds": self.ledger.count_rounds(), "updates": self.ledger.count_updates(),
                       "members": self.ledger.count_members()},
            "policy": self.policy_json(), "spec_fingerprint": self.spec.fingerprint(),
            "privacy": self.privacy_json(),
            "uptime_s": round(time.time() - self.started_at, 3),
        }

    def privacy_json(self) -> dict[str, Any]:
        """The federation's DP policy and this node's own spending, with the unit they are
        about (an epsilon means nothing without what it protects)."""
        budget = self.participant.budget if self.participant is not None else None
        local = None
        if budget is not None:
            local = {"mechanism": budget.config.mechanism, "unit": budget.config.unit,
                     "epsilon_spent": round(budget.spent, 6),
                     "epsilon_budget": budget.config.epsilon, "delta": budget.config.delta,
                     "noise_multiplier": budget.config.noise_multiplier,
                     "clip": budget.config.clip, "releases": budget.rounds,
                     "exhausted": self.abstaining}
        return {"policy": policy_json(self.dp_policy), "local": local}

    async def start(self) -> tuple[str, int]:
        now = time.time()
        self.ledger.upsert_member({
            "node_id": self.node_id, "name": socket.gethostname(),
            "addresses": [], "public_key": self.identity.public_key_bytes.hex(),
            "admitted_at": now, "last_seen": now, "status": "live"})
        if needs_conversion(self.ledger):
            convert_legacy_state(self.ledger, self.blobs, self.state_store)
        await self.rounds.start()
        self.state.start()
        # auto_decompress off: see the Content-Encoding check in the API (no gzip bombs).
        self._runner = web.AppRunner(build_app(self), handle_signals=False, access_log=None,
                                     auto_decompress=False, keepalive_timeout=15.0)
        await self._runner.setup()
        self.guard.start(self._runner)
        site = web.TCPSite(self._runner, self.settings.host, self.settings.port,
                           ssl_context=self.server_ssl)
        await site.start()
        sockets = site._server.sockets if site._server else []  # type: ignore[union-attr]
        host, port = sockets[0].getsockname()[:2]
        self.address = (host, port)
        advertised = self.settings.interfaces[0] if self.settings.interfaces else host
        if advertised in ("0.0.0.0", "::"):
            advertised = _primary_ipv4()
        self.address = (advertised, port)
        self.ledger.upsert_member({"node_id": self.node_id, "addresses": [f"{advertised}:{port}"]})
        self.lock.describe(url=self.url)
        self.bus.publish("listening", None, {"url": self.url, "node_id": self.node_id,
                                             "federation": self.identity.federation})
        if not self.settings.tls and not host.startswith("127."):
            log.warning("serving plain HTTP on %s: requests are authenticated, but adapters and "
                        "metadata are readable on the network; use --tls off trusted LANs", host)
        await self.cluster.start()
        if self.settings.mdns:
            self.discovery = Discovery(self.identity.federation, self.node_id, port,
                                       list(self.settings.interfaces) or None,
                                       lambda node_id, url: self.cluster.consider(url),
                                       tls=self.settings.tls)
            await self.discovery.start()
        if self.participant is not None:
            self.participant.start()
        if self.evaluator is not None:
            self.evaluator.start()
        return self.address

    async def stop(self) -> None:
        if self.participant is not None:
            await self.participant.stop()
        if self.evaluator is not None:
            await self.evaluator.stop()
        if self.discovery is not None:
            await self.discovery.stop()  # mDNS goodbye
        await self.cluster.stop()  # hand over the coordinator role, tell peers we leave
        self.bus.close()  # event streams (a TUI) would otherwise hold the shutdown ~30 s
        if self._runner is not None:
            await self._runner.shutdown()
        self.cumulative.close()  # stop accepting; let in-flight requests finish
        await self.rounds.stop()
        await self.state.stop()
        await self.guard.stop()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.bus.publish("stopped", None, {"node_id": self.node_id})
        self.nonce_journal.close()
        self.ledger.close()
        self.lock.release()


def _timing(election_timeout: float) -> ClusterTiming:
    """Everything scales with the election timeout so one knob tunes a slow or fast network."""
    # Bootstrap: mDNS takes ~1.3 s to introduce a node (the name probe), so machines started
    # together wait at least 3 s to know each other before anyone may elect itself.
    return ClusterTiming(heartbeat_s=election_timeout / 4, election_min_s=election_timeout,
                         election_max_s=2 * election_timeout,
                         bootstrap_s=max(3.0, 3 * election_timeout),
                         lost_after_s=3 * election_timeout, hello_retry_s=election_timeout)


def _primary_ipv4() -> str:
    """The address peers should use when we listen on all interfaces (no packet is sent)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # TEST-NET-1: routing lookup only
        return probe.getsockname()[0]
    except OSError:
        # No default route (an isolated lab network): any LAN address beats 127.0.0.1, which
        # would tell every peer to call itself.
        from chorus_p2p.node.discovery import local_ipv4_addresses

        return (local_ipv4_addresses() or ["127.0.0.1"])[0]
    finally:
        probe.close()


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                               "logger": record.name}
        event = getattr(record, "event", None)
        if event is not None:
            out.update({"event": event["kind"], "round": event["round"], "data": event["data"]})
            if event.get("id") is not None:
                out["event_id"] = event["id"]
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class _HumanFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        event = getattr(record, "event", None)
        if event is not None:
            where = f"round {event['round']} " if event["round"] is not None else ""
            detail = " ".join(f"{k}={v}" for k, v in event["data"].items() if k != "nodes")
            kind = event["kind"].replace("_", " ")
            if where and kind.startswith("round "):
                kind = kind[len("round "):]
            text = f"{where}{kind}  {detail}".rstrip()
        else:
            text = record.getMessage()
        line = f"{stamp} {record.levelname.lower():<7} {text}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


_LISTENER = None


def _stop_listener(listener) -> None:
    """Flush and stop once (a second stop() raises on Python 3.11)."""
    if getattr(listener, "_thread", None) is not None:
        listener.stop()


def configure_logging(headless: bool, verbose: bool = False) -> None:
    """Log lines are formatted and written by a thread of their own: a slow or full stdout (a
    pipe nobody reads, a busy terminal) must never stall the event loop."""
    import logging.handlers
    import queue

    global _LISTENER
    if _LISTENER is not None:  # configured again in the same process (tests, the demo)
        _stop_listener(_LISTENER)
    output = _CurrentStreamHandler("stdout" if headless else "stderr")
    output.setFormatter(_JsonFormatter() if headless else _HumanFormatter())
    lines: queue.Queue = queue.Queue(100_000)
    listener = _LISTENER = logging.handlers.QueueListener(lines, output,
                                                          respect_handler_level=True)
    listener.start()
    atexit.register(_stop_listener, listener)
    handler = _DroppingQueueHandler(lines)
    root = logging.getLogger("chorus_p2p")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    for noisy in ("aiohttp.server", "aiohttp.access", "aiohttp.web"):
        # aiohttp logs a traceback per broken request; a flood of those is what an attacker
        # wants. Ours (request_refused, rate limited) say the same in one line.
        logging.getLogger(noisy).setLevel(logging.CRITICAL)


class _CurrentStreamHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout``/``sys.stderr`` is at the moment of writing, not the one
    at configuration time: a caller that swaps the stream (a test runner's capture, a program
    embedding the node) must not leave the writer thread on a closed file."""

    def __init__(self, name: str) -> None:
        super().__init__(getattr(sys, name))
        self._name = name

    @property  # type: ignore[override]
    def stream(self):
        return getattr(sys, self._name)

    @stream.setter
    def stream(self, _value) -> None:  # StreamHandler.__init__ assigns it; we always look it up
        pass


class _DroppingQueueHandler(logging.Handler):
    """Hands records to the writer thread; drops them (counting) if it is 100k lines behind."""

    def __init__(self, lines) -> None:
        super().__init__()
        self.lines = lines
        self.dropped = 0

    def emit(self, record: logging.LogRecord) -> None:
        import queue

        try:
            if self.dropped:
                note = logging.LogRecord(record.name, logging.WARNING, "", 0,
                                         "%d log lines dropped: the log output is too slow",
                                         (self.dropped,), None)
                self.lines.put_nowait(note)
                self.dropped = 0
            record.msg, record.args = record.getMessage(), None  # format args now, in order
            self.lines.put_nowait(record)
        except queue.Full:
            self.dropped += 1


async def run_node(settings: NodeSettings, ready: asyncio.Event | None = None) -> int:
    node = Node(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread (embedded use)
            pass
    try:
        await node.start()
    except OSError as exc:
        node.ledger.close()
        node.lock.release()
        raise UsageError(f"cannot listen on {settings.host}:{settings.port}: "
                         f"{exc.strerror or exc}") from exc
    node.on_fatal = stop.set
    if ready is not None:
        ready.set()
    await stop.wait()
    log.info("shutting down: finishing in-flight work")
    await node.stop()
    if node.exit_code:
        raise NodeRefused(node.fatal_reason)
    return 0


class NodeRefused(UsageError):
    """The node stopped for a reason the operator must act on (refused by its federation)."""

    exit_code = 3
