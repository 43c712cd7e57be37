"""``ExactLoRA``: FedEx-LoRA aggregation as a Flower strategy (message API, Flower >= 1.20).

Flower's own strategies average a LoRA's ``A`` and ``B`` separately (FedIT), so the global model
is not the mean of the clients' models. This strategy keeps Flower's sampling, timeouts and
metrics (it is a :class:`~flwr.serverapp.strategy.FedAvg`) and replaces the aggregation with our
exact core: the mean of the clients' products ``B_k A_k``, of which the best rank-r part becomes
the new global adapter and the rest, ``D``, is added to the residual ``R`` the server keeps,
exactly as a chorus-p2p coordinator does:

- ``R`` is the same dense float32 state a node keeps (:class:`~chorus_p2p.state.store.StateStore`:
  updated in place, checkpointed atomically), under ``workdir/state``.
- Clients never receive ``R`` dense: each message carries the global adapter and the factored
  ``D`` of every round the receiving node has not folded yet, which it adds to its own copy
  (:class:`~chorus_p2p.flower.client.ExactLoRAClient`). So ``W0 + R + B A`` is the same model
  on every client and on the server.
- Every round's global adapter is written as a PEFT folder (``workdir/rounds/round-N``), with
  its ``D`` (``workdir/deltas``) and the aggregation report: the run can be inspected, exported
  (``chorus-node export``-style: ``W0 + R`` folded, adapter beside it) or moved to a node.

What is not here (see README): the deltas are kept for every round, since a node first heard
from in round 50 is sent all of them (a chorus-p2p node catches up from a checkpoint instead);
and Flower 1.42 has no run resumption, so a restarted ServerApp starts a new run.
``resume=True`` starts it from an earlier run's ``workdir`` (its ``R`` and latest adapter; every
client is then sent every ``D``), which is not yet tested across a SuperLink restart.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path
from typing import Callable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from chorus_p2p.flower.records import (DP_KEY, STATE_KEY, STATE_ROUND_METRIC, add_delta, adapter_record,
                                       write_adapter_file, write_adapter_folder)
from chorus_p2p.errors import AdapterError
from chorus_p2p.lora.aggregate import aggregate_adapters
from chorus_p2p.lora.names import DEFAULT_STRATEGY, STRATEGIES
from chorus_p2p.lora.residual import RESIDUAL_FILE
from chorus_p2p.federation.dp_policy import DPPolicy, check_declared, check_release, parse_declaration
from chorus_p2p.federation.refusals import UpdateRejected
from chorus_p2p.federation.spec import FederationSpec
from chorus_p2p.state.store import StateStore

ADAPTER_FILE = "adapter_model.safetensors"


class ExactLoRA(FedAvg):
    """Exact LoRA aggregation (``fedex``, ``fedex-svd`` or plain ``fedavg``) inside Flower.

    ``spec`` fixes the base model, rank, alpha and target modules (every client must use the
    same; they check its fingerprint). Weights are the clients' ``num-examples`` (Flower's
    ``weighted_by_key``). ``keep_updates`` also stores each round's client adapters (PEFT
    folders under ``rounds/round-N/updates``). ``dp_policy`` refuses, as a node does, every
    reply that does not declare local DP at least that strong or lacks the noise it declares
    (clients: ``ExactLoRAClient(dp=...)``). The other keyword arguments are :class:`FedAvg`'s.
    """

    def __init__(self, spec: FederationSpec, workdir: str | Path, *,
                 aggregation: str = DEFAULT_STRATEGY, checkpoint_every: int = 10,
                 resume: bool = False, keep_updates: bool = False,
                 dp_policy: DPPolicy | None = None, **fedavg_options) -> None:
        if aggregation not in STRATEGIES:
            raise ValueError(f"unknown aggregation {aggregation!r}; one of {', '.join(STRATEGIES)}")
        super().__init__(**fedavg_options)
        self.spec, self.aggregation, self.keep_updates = spec, aggregation, keep_updates
        self.dp_policy = dp_policy
        self._sent: ArrayRecord | None = None  # the adapter this round's clients started from
        self.workdir = Path(workdir)
        if not resume and (self.workdir / "state").exists():
            raise FileExistsError(f"{self.workdir}/state holds an earlier run's R; pass "
                                  "resume=True to continue it, or choose a new workdir")
        self.deltas = self.workdir / "deltas"
        self.rounds = self.workdir / "rounds"
        self.deltas.mkdir(parents=True, exist_ok=True)
        self.rounds.mkdir(parents=True, exist_ok=True)
        self.state = StateStore(self.workdir / "state", spec.modules,
                                checkpoint_every=checkpoint_every, transposed=spec.transposed)
        self.offset = self.state.round  # a resumed run's round 1 is the state's round + 1
        self._node_round: dict[int, int] = {}  # what each node's R has reached, from replies
        self.excluded: dict[int, list[str]] = {}  # round -> clients left out, and why

    # -- what the server starts from ------------------------------------------------------------
    def initial_arrays(self, federation: str = "flower",
                       adapter_dir: str | Path | None = None) -> ArrayRecord:
        """Round 0's adapter: PEFT's init seeded by the federation's name; or ``adapter_dir``
        (a PEFT folder: a federation moved here from chorus-p2p nodes starts from its latest
        global adapter, on a base with its ``R`` folded in); or a resumed state's latest."""
        if adapter_dir is not None:
            return adapter_record(_load(Path(adapter_dir) / ADAPTER_FILE))
        if self.offset:
            return adapter_record(_load(self.rounds / f"round-{self.offset}" / ADAPTER_FILE))
        return adapter_record(self.spec.initial_adapter(federation))

    @property
    def global_adapter_dir(self) -> Path | None:
        """The latest round's global adapter as a PEFT folder (None before round 1)."""
        folder = self.rounds / f"round-{self.state.round}"
        return folder if self.state.round and folder.exists() else None

    def residual(self):
        """``R`` after the latest round, module by module, as ``load_global_model`` takes it."""
        return self.state.read(self.state.round)

    # -- configure: the adapter, plus each node's missing D's ----------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._sent = arrays
        return [self._with_state(m) for m in super().configure_train(
            server_round, arrays, config, grid)]

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return [self._with_state(m) for m in super().configure_evaluate(
            server_round, arrays, config, grid)]

    def _with_state(self, message: Message) -> Message:
        """Each node's own copy of the record (FedAvg shares one), with the D's it lacks."""
        node = message.metadata.dst_node_id
        have = self._node_round.get(node, 0)  # a node not heard from yet gets every D
        content = RecordDict(dict(message.content.items()))
        for number in range(have + 1, self.state.round + 1):
            path = self.deltas / f"round-{number}.safetensors"
            if path.exists():  # fedavg rounds have no D
                add_delta(content, number, path)
        content[STATE_KEY] = ConfigRecord({"from-round": have, "to-round": self.state.round,
                                           "spec": self.spec.fingerprint()})
        return Message(content=content, message_type=message.metadata.message_type,
                       dst_node_id=node)

    # -- aggregate: exact, then R += D --------------------------------------------------------
    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # Checked one by one below (a bad reply is left out, as a node refuses a bad upload),
        # not all-or-nothing as FedAvg's consistency check would.
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        if not valid:
            return None, None
        number = self.state.round + 1
        out = self.rounds / f"round-{number}"
        with tempfile.TemporaryDirectory(dir=self.workdir, prefix=".aggregate-") as scratch:
            accepted, paths, weights, labels = [], [], [], []
            for message in valid:
                label = f"node {message.metadata.src_node_id}"
                path = Path(scratch) / f"{message.metadata.src_node_id}.safetensors"
                try:  # the checks a node makes at upload: shapes, rank, NaN/Inf, absurd norms
                    record = message.content.array_records[self.arrayrecord_key]
                    write_adapter_file(record, path)
                    self.spec.validate_update(path)
                    if self.dp_policy is not None:
                        self._check_dp(message, path, Path(scratch))
                    metrics = next(iter(message.content.metric_records.values()))
                    weight = float(metrics[self.weighted_by_key])
                    if not weight > 0:
                        raise UpdateRejected("bad_request", f"{self.weighted_by_key} = {weight}")
                except (UpdateRejected, AdapterError, KeyError, ValueError, TypeError) as exc:
                    reason = f"{label}: {getattr(exc, 'code', 'bad_reply')}: {exc}"
                    log(WARNING, "round %d: leaving out %s", number, reason)
                    self.excluded.setdefault(number, []).append(reason)
                    continue
                accepted.append(message)
                paths.append(str(path))
                weights.append(weight)
                labels.append(label)
            if not accepted:
                log(WARNING, "round %d: no usable adapter; the global model stays", number)
                return None, None
            replied, valid = valid, accepted
            report = aggregate_adapters(paths, out, strategy=self.aggregation, weights=weights,
                                        rank=self.spec.rank, settings=self.spec.settings,
                                        labels=labels, force=True, canonical=True)
        contents = [m.content for m in valid]
        if self.keep_updates:  # an audit trail: each client's adapter, as a PEFT folder
            for message, label in zip(valid, labels):
                write_adapter_folder(message.content.array_records[self.arrayrecord_key],
                                     out / "updates" / label.replace(" ", "-"),
                                     self.spec.adapter_config())
        delta = None
        if (out / RESIDUAL_FILE).exists():
            delta = self.deltas / f"round-{number}.safetensors"
            shutil.move(str(out / RESIDUAL_FILE), delta)
        self.state.apply(number, delta)
        if self.state.checkpoint_due():
            self.state.checkpoint()
        for message in replied:  # they folded every D up to the round before this one
            self._node_round[message.metadata.src_node_id] = number - 1
        log(INFO, "exact %s aggregation of %d adapters in %.1f ms; R now at round %d",
            self.aggregation, len(valid), report.seconds * 1000, number)
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        metrics["aggregation-ms"] = round(report.seconds * 1000, 3)
        metrics["excluded"] = len(self.excluded.get(number, []))
        if self.aggregation != "fedavg":
            metrics["residual-energy"] = float(report.residual_energy)
        return adapter_record(_load(out / ADAPTER_FILE)), metrics

    def _check_dp(self, message: Message, path: Path, scratch: Path) -> None:
        """The federation's DP policy, as a node enforces it: a declared release at least as
        strong as the policy, carrying the noise it declares (measured from the adapter sent)."""
        record = message.content.config_records.get(DP_KEY)
        declared = parse_declaration(dict(record) if record is not None else None)
        check_declared(self.dp_policy, declared)
        if self._sent is not None:
            start = write_adapter_file(self._sent, scratch / "sent.safetensors")
            check_release(declared, path, start)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        replies = list(replies)
        for message in replies:
            if not message.has_error():
                self._node_round[message.metadata.src_node_id] = self.state.round
        return super().aggregate_evaluate(server_round, replies)

    def evaluate_fn(self, model_path: str | Path, datasets, config
                    ) -> Callable[[int, ArrayRecord], MetricRecord | None]:
        """A server-side evaluation for ``start(evaluate_fn=...)``: the exact global model
        ``W0 + R + B A`` on held-out data (mean next-token loss per dataset)."""
        from chorus_p2p.train.trainer import eval_global

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            folder = self.global_adapter_dir
            if folder is None:
                return None
            losses = eval_global(model_path, folder, self.residual(), list(datasets), config)
            return MetricRecord({**{f"eval-loss-{k}": v for k, v in losses.items()},
                                 "eval-loss": sum(losses.values()) / len(losses)})
        return evaluate


def _load(path: Path):
    from safetensors.torch import load_file

    return load_file(str(path))


__all__ = ["ExactLoRA", "STATE_ROUND_METRIC"]
