"""A node that trains: every round, train on local data from the global state and submit.

The participant reads the global state from its own node's ledger and blob store (replication
already put the committed adapter and ``R`` there), trains in a worker thread, and keeps each
update in ``DATA_DIR/outbox/`` until its round commits. Whenever the live round lacks its update
(a new coordinator took over, or the node restarted) it sends it again; re-sends are idempotent,
so an update counts exactly once and a restarted node never trains a round twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chorus_p2p.node.state_keeper import StateReader
from chorus_p2p.train.data import Dataset, DatasetOptions
from chorus_p2p.train.privacy import (BudgetExhausted, DPConfig, PrivacyBudget, dp_sgd_settings,
                                      release_update)
from chorus_p2p.train.trainer import TrainConfig, train_round
from chorus_p2p.node.worker import StepLoop

if TYPE_CHECKING:
    from chorus_p2p.node.service import Node

log = logging.getLogger("chorus_p2p.train")

RESEND_EVERY_S = 1.0


async def materialize_round(node: "Node", number: int, into: Path) -> tuple[Path, StateReader]:
    """A committed round as a PEFT folder + a reader of ``R`` after it, from this node."""
    row = node.ledger.round(number)
    if row is None or row["state"] != "committed":
        raise LookupError(f"round {number} is not committed on this node")
    folder = await asyncio.to_thread(materialize_adapter, row, node.blobs, into)
    return folder, await node.state.reader(number)


def materialize_adapter(row: dict[str, Any], blobs, into: Path) -> Path:
    """Copy a committed round's adapter blobs into a PEFT folder (file work: safe in a thread)."""
    number = row["round"]
    folder = into / f"global-{number}"
    if not (folder / "adapter_model.safetensors").exists():
        tmp = into / f".global-{number}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        shutil.copyfile(blobs.verified_path(row["adapter_sha"]), tmp / "adapter_model.safetensors")
        shutil.copyfile(blobs.verified_path(row["adapter_config_sha"]), tmp / "adapter_config.json")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return folder


class Participant(StepLoop):
    failure_event, name = "training_failed", "participant"

    def __init__(self, node: "Node", dataset_path: str, config: TrainConfig,
                 dp: "DPConfig | None" = None,
                 dataset_options: DatasetOptions = DatasetOptions(),
                 max_rounds: int | None = None):
        super().__init__(node)
        # Stop once this many committed rounds count our update (in total: a restart goes on
        # from where it was), then leave the federation and exit 0.
        self.max_rounds = max_rounds
        self.budget = PrivacyBudget(node.ledger, dp) if dp is not None else None
        if self.budget is not None:
            self.budget.validate()  # a data dir's releases of another unit: refuse to start
        self._budget_reported = False
        self.dataset = Dataset.load(dataset_path, options=dataset_options)
        self.config = config
        self.outbox = node.data_dir / "outbox"
        self.outbox.mkdir(exist_ok=True)
        self.work = node.data_dir / "work"
        self._last_send: dict[int, float] = {}

    def _outbox_entry(self, number: int) -> dict[str, Any] | None:
        meta = self.outbox / f"round-{number}.json"
        return json.loads(meta.read_text()) if meta.exists() else None

    async def _step(self) -> None:
        latest = self.node.ledger.latest_round()
        if latest is None or latest["state"] not in ("open", "collecting"):
            return
        number, base = latest["round"], latest["trained_from"]
        base_row = self.node.ledger.round(base)
        if base_row is None or base_row["state"] != "committed":
            return
        entry = self._outbox_entry(number)
        if entry is None and self.max_rounds is not None:
            done = self.node.ledger.rounds_contributed(self.node.node_id)
            if done >= self.max_rounds:
                self.node.finish(f"trained {done} committed round(s) (--max-rounds "
                                 f"{self.max_rounds})")
                return  # (rounds run one at a time: the one before this has committed)
        if entry is None:
            try:
                if self.budget is not None:
                    self.budget.check()  # DP-SGD: priced again from the round's plan in training
                entry = await self._train(number, base)
            except BudgetExhausted as exc:
                self._abstain(number, exc)
                return
        if self.node.ledger.update(number, self.node.node_id) is not None:
            return
        if time.monotonic() - self._last_send.get(number, 0.0) < RESEND_EVERY_S:
            return
        self._last_send[number] = time.monotonic()
        await self._submit(number, entry)

    def _abstain(self, number: int, exc: BudgetExhausted) -> None:
        self.node.abstaining = True  # the federation stops waiting for us
        if not self._budget_reported:  # say it once, loudly; then stay quiet
            self._budget_reported = True
            log.warning("%s", exc)
            self.node.bus.publish("dp_budget_exhausted", number, {
                "node_id": self.node.node_id, "message": str(exc)}, level="warning")

    async def _train(self, number: int, base: int) -> dict[str, Any]:
        adapter_dir, residual = await materialize_round(self.node, base, self.work)
        self.node.bus.publish("training_started", number, {
            "node_id": self.node.node_id, "steps": self.config.steps,
            "examples": len(self.dataset.train)})
        loop = asyncio.get_running_loop()
        last_report = [0.0]

        def progress(step: int, loss: float) -> None:
            self._check_stopping()  # a stopping node waits for this thread: end it now
            now = time.monotonic()
            if now - last_report[0] > 0.5 or step == self.config.steps:
                last_report[0] = now
                data = {"node_id": self.node.node_id, "step": step, "steps": self.config.steps}
                if self.budget is None:  # with DP on, losses are private: not even to events
                    data["loss"] = round(loss, 4)
                loop.call_soon_threadsafe(self.node.bus.publish, "training_progress", number, data)

        out = self.work / f"client-{number}"
        shutil.rmtree(out, ignore_errors=True)
        config = TrainConfig(**{**asdict(self.config), "seed": self.config.seed + number,
                                **dp_sgd_settings(self.budget and self.budget.config)})
        check = None if self.budget is None else lambda plan: self.budget.check(plan.to_json())
        result = await self._in_thread(train_round, self.node.spec.model, adapter_dir, residual,
                                         self.dataset, config, out, progress, check)
        update = self.outbox / f"round-{number}.safetensors"
        entry = {"round": number, "trained_from": base, "examples": result.examples,
                 "train_loss": result.train_loss, "eval_loss": result.eval_loss,
                 "seconds": round(result.seconds, 3), "file": update.name}
        if self.budget is not None:  # the noise comes from the OS's CSPRNG (secure_normal)
            raw_norm, epsilon = await self._in_thread(
                release_update, self.budget, adapter_dir / "adapter_model.safetensors",
                out / "adapter_model.safetensors", update, result.dp_release, number)
            entry.update({"train_loss": None, "eval_loss": None, "dp_raw_norm": raw_norm,
                          "dp_epsilon": epsilon})
        else:
            shutil.copyfile(out / "adapter_model.safetensors", update)
        # The outbox holds what is sent (fsynced): the trained adapter itself, pre-noise under
        # DP, is no longer needed, and must not stay on disk.
        shutil.rmtree(out, ignore_errors=True)
        (self.outbox / f"round-{number}.json").write_text(json.dumps(entry))
        public = {k: v for k, v in entry.items() if k != "dp_raw_norm"}  # pre-noise: private
        self.node.bus.publish("training_finished", number, {"node_id": self.node.node_id,
                                                            **public})
        return entry

    async def _submit(self, number: int, entry: dict[str, Any]) -> None:
        from chorus_p2p.client import AsyncNodeClient, NodeError, NodeUnreachable

        async with AsyncNodeClient(self.node.url, secret=self.node.identity.secret,
                                   client_id=self.node.node_id, timeout=30) as client:
            try:
                await client.submit(self.outbox / entry["file"], round=number,
                                    examples=entry["examples"], trained_from=entry["trained_from"],
                                    eval_loss=entry["eval_loss"], train_loss=entry["train_loss"])
            except (NodeError, NodeUnreachable) as exc:
                log.info("submit of round %d not taken yet (%s); will retry", number, exc)
