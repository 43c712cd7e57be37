"""A node that measures: after commits, the global model (``W0 + R + adapter``) on this node's
own held-out data (``up --eval-data PATH --eval-every N``).

The figure is what a lab needs to stop a run that stopped helping: it is recorded per round in
the ledger and shared with every member (``node/evaluations.py``: ``GET /v1/rounds/N``,
``rounds --json`` and the TUI show every node's, from any node; ``export --best`` picks by
their mean),
published as ``round_evaluated`` (the TUI's event log shows it), and with ``--patience K`` the
node leaves (exit 0) once K evaluations in a row did not beat the best one.
"""

from __future__ import annotations

import math
import shutil
import time
from typing import TYPE_CHECKING

from chorus_p2p.train.data import Dataset, DatasetOptions, load_texts
from chorus_p2p.node.worker import StepLoop

if TYPE_CHECKING:
    from chorus_p2p.node.service import Node
    from chorus_p2p.train.trainer import TrainConfig



class NodeEvaluator(StepLoop):
    failure_event, name, poll_s, retry_s = "evaluation_failed", "evaluation", 0.5, 5.0

    def __init__(self, node: "Node", eval_data: str, config: "TrainConfig", every: int = 1,
                 patience: int | None = None, options: DatasetOptions = DatasetOptions()):
        super().__init__(node)
        texts = load_texts(eval_data, options)  # all of it is held out: it is never trained on
        self.dataset = Dataset("eval", texts, texts)
        self.config, self.every, self.patience = config, max(1, every), patience
        self.work = node.data_dir / "work" / "eval"  # apart from the participant's folders

    def _due(self) -> int | None:
        latest = self.node.ledger.latest_committed()
        if latest is None or latest["round"] == 0 or latest["round"] % self.every:
            return None
        number = latest["round"]
        done = self.node.ledger.evaluations([number]).get(number, {})
        return None if self.node.node_id in done else number

    async def _step(self) -> None:
        number = self._due()
        if number is None:
            return
        from chorus_p2p.node.participant import materialize_round
        from chorus_p2p.train.trainer import eval_global

        started = time.perf_counter()
        adapter_dir, residual = await materialize_round(self.node, number, self.work)
        try:
            losses = await self._in_thread(eval_global, self.node.spec.model, adapter_dir,
                                             residual, [self.dataset], self.config)
        finally:
            await self._in_thread(shutil.rmtree, adapter_dir, True)
        loss = losses[self.dataset.name]
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)),
                   "seconds": round(time.perf_counter() - started, 3)}
        self.node.ledger.record_evaluation(number, self.node.node_id, metrics)
        self.node.bus.publish("round_evaluated", number,
                              {"node_id": self.node.node_id, **metrics})
        from chorus_p2p.node.evaluations import share

        await share(self.node)  # every member shows every member's figures
        self._maybe_stop()

    def _maybe_stop(self) -> None:
        """``--patience K``: K evaluations in a row after the best one, none better: leave."""
        if not self.patience:
            return
        mine = [(n, m[self.node.node_id]["loss"]) for n, m in
                sorted(self.node.ledger.evaluations().items()) if self.node.node_id in m]
        best_index = min(range(len(mine)), key=lambda i: mine[i][1])
        since = len(mine) - 1 - best_index
        if since >= self.patience:
            best_round, best = mine[best_index]
            self.node.finish(f"held-out loss has not improved for {since} evaluation(s) (best "
                             f"{best:.4f} at round {best_round}; --patience {self.patience})")
