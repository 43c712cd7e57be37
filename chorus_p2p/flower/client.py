"""The client half of :class:`~chorus_p2p.flower.strategy.ExactLoRA`: keep ``R``, train, reply.

A ClientApp built on :class:`ExactLoRAClient` keeps its own copy of the residual ``R`` (the same
dense state a node keeps, under ``workdir/run-<run id>/node-<node id>``), adds the factored
``D``s each message carries in round order, trains the global adapter on ``W0 + R`` with our
trainer, and replies with the adapter and its example count. A gap in the rounds (a node whose
state was wiped) is refused with a clear error rather than trained on the wrong model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from chorus_p2p.flower.records import (DP_KEY, STATE_KEY, STATE_ROUND_METRIC, adapter_record,
                                       write_adapter_folder, write_delta)
from chorus_p2p.federation.spec import FederationSpec
from chorus_p2p.state.store import StateStore
from chorus_p2p.train.data import Dataset
from chorus_p2p.train.privacy import DPConfig
from chorus_p2p.train.trainer import TrainConfig, eval_global, train_round


class StateGap(RuntimeError):
    """The message's deltas do not start where this node's ``R`` is."""


class ExactLoRAClient:
    """Train and evaluate the exact global model on one node's data."""

    def __init__(self, model_path: str | Path, spec: FederationSpec, workdir: str | Path, *,
                 dp: "DPConfig | None" = None, budget_file: str | Path | None = None):
        """``dp``: release only a private update, as a node does: the clipped and noised change
        (local DP) or, with ``DPConfig(mechanism="dp-sgd")``, a round trained by record-level
        DP-SGD; spending from ``budget_file`` (default ``workdir/dp-budget.json``, kept across
        runs: a new run is not a new budget)."""
        self.model_path = str(model_path)
        self.spec = spec
        self.workdir = Path(workdir)
        self.budget = None
        if dp is not None:
            from chorus_p2p.train.privacy import BudgetFile, PrivacyBudget

            self.budget = PrivacyBudget(BudgetFile(budget_file or self.workdir /
                                                   "dp-budget.json"), dp)
            self.budget.validate()
            if dp.mechanism == "dp-sgd":
                from chorus_p2p.train.dp_sgd import check_targets

                check_targets(spec.kinds)

    def _state(self, context: Context) -> StateStore:
        root = self.workdir / f"run-{context.run_id}" / f"node-{context.node_id}"
        return StateStore(root / "state", self.spec.modules, checkpoint_every=10,
                          transposed=self.spec.transposed)

    def _catch_up(self, state: StateStore, content: RecordDict, scratch: Path) -> None:
        info = content.config_records[STATE_KEY]
        if str(info["spec"]) != self.spec.fingerprint():
            raise StateGap("the server's federation spec differs from this client's (model, "
                           "rank, alpha or target modules); start both from the same settings")
        first, last = int(info["from-round"]), int(info["to-round"])
        if first > state.round or last < state.round:
            raise StateGap(f"this node's R is at round {state.round} but the server sent rounds "
                           f"{first + 1}..{last}; its state dir was lost or belongs to another run")
        for number in range(state.round + 1, last + 1):
            state.apply(number, write_delta(content, number, scratch / f"d{number}.safetensors"))
            if state.checkpoint_due():
                state.checkpoint()

    def _global_model(self, state: StateStore, message: Message, scratch: Path) -> Path:
        """Fold the message's new D's into our R; the global adapter as a PEFT folder."""
        self._catch_up(state, message.content, scratch)
        return write_adapter_folder(message.content.array_records["arrays"], scratch / "global",
                                    self.spec.adapter_config())

    def train(self, message: Message, context: Context, data: Dataset,
              config: TrainConfig) -> Message:
        """Fold the new D's, train the global adapter on ``data``, reply with it."""
        state = self._state(context)
        with tempfile.TemporaryDirectory(dir=state.root, prefix=".train-") as tmp:
            scratch = Path(tmp)
            global_dir = self._global_model(state, message, scratch)
            if self.budget is not None:
                from dataclasses import replace

                from chorus_p2p.train.privacy import dp_sgd_settings

                config = replace(config, **dp_sgd_settings(self.budget.config))
            budget = self.budget
            result = train_round(self.model_path, global_dir, state.read(state.round), data,
                                 config, scratch / "trained",
                                 before_release=None if budget is None
                                 else lambda plan: budget.check(plan.to_json()))
            from safetensors.torch import load_file

            released = result.adapter_dir / "adapter_model.safetensors"
            metrics = {"num-examples": result.examples, "train-loss": result.train_loss,
                       "eval-loss": result.eval_loss, STATE_ROUND_METRIC: state.round}
            declared = None
            if self.budget is not None:  # the private update leaves; the losses stay here
                from chorus_p2p.federation.dp_policy import read_declaration
                from chorus_p2p.train.privacy import release_update

                noised = scratch / "noised.safetensors"
                release_update(self.budget, global_dir / "adapter_model.safetensors", released,
                               noised, result.dp_release)
                released, declared = noised, read_declaration(noised)
                del metrics["train-loss"], metrics["eval-loss"]
            trained = load_file(str(released))
        content = RecordDict({"arrays": adapter_record(trained),
                              "metrics": MetricRecord(metrics)})
        if declared is not None:
            content[DP_KEY] = ConfigRecord(declared)
        return Message(content=content, reply_to=message)

    def evaluate(self, message: Message, context: Context, data: Dataset,
                 config: TrainConfig) -> Message:
        """Held-out loss of the exact global model on this node's data."""
        state = self._state(context)
        with tempfile.TemporaryDirectory(dir=state.root, prefix=".eval-") as tmp:
            global_dir = self._global_model(state, message, Path(tmp))
            loss = eval_global(self.model_path, global_dir, state.read(state.round), [data],
                               config)[data.name]
        content = RecordDict({"metrics": MetricRecord({
            "num-examples": len(data.eval), "eval-loss": loss, STATE_ROUND_METRIC: state.round})})
        return Message(content=content, reply_to=message)


__all__ = ["ExactLoRAClient", "StateGap"]
