"""Upgrading a 0.1 data dir in place: factored per-round ``R`` blobs -> the dense state.

chorus-p2p 0.1 stored ``R`` after every round as a factored blob (``rounds.cumulative_sha``). On
the first start of this version the node converts the latest one to the dense state (written and
installed as a checkpoint at that round), records the state fingerprint of that round and the
log hash chain of every committed round, clears ``cumulative_sha`` and deletes the old ``R``
blobs. Each step is safe to repeat: until the ledger transaction has happened, the next start
simply converts again.
"""

from __future__ import annotations

import logging
from typing import Iterator

import torch

from chorus_p2p.lora.residual import ResidualFile
from chorus_p2p.node.blobs import BlobStore
from chorus_p2p.federation.round_states import COMMITTED
from chorus_p2p.node.ledger import Ledger, chain_hash
from chorus_p2p.state import sketch as sketches
from chorus_p2p.state.store import StateStore

log = logging.getLogger("chorus_p2p.migrate")


def needs_conversion(ledger: Ledger) -> bool:
    return any(True for _ in ledger.db.query(
        "select 1 from rounds where cumulative_sha is not null limit 1"))


def _dense_modules(path, layout_modules) -> Iterator[tuple[str, torch.Tensor]]:
    with ResidualFile(path) as residual:
        for prefix in layout_modules:
            if prefix in residual.modules:
                left, right = residual.factors(prefix)
                yield prefix, (left.double() @ right.double()).to(torch.float32)


def convert_legacy_state(ledger: Ledger, blobs: BlobStore, store: StateStore) -> int:
    """Convert; returns the round the new state is at. Call before the node starts serving."""
    committed = [r for r in ledger.list_rounds(limit=1 << 30) if r["state"] == COMMITTED]
    committed.sort(key=lambda r: r["round"])
    latest = committed[-1]
    legacy = {r["cumulative_sha"] for r in ledger.list_rounds(limit=1 << 30)
              if r.get("cumulative_sha")}
    source = latest.get("cumulative_sha")
    if source:
        store.adopt_dense(latest["round"], _dense_modules(blobs.verified_path(source),
                                                          [p for p, _, _ in store.layout.modules]))
    else:  # no residual yet (fedavg, or only round 0): R is zero
        store.adopt_dense(latest["round"], iter(()))
    latest_sketch = sketches.encode(store.sketch()) if store.probes is not None else None
    previous = None
    with ledger.db.atomic():
        for row in committed:
            sketch = latest_sketch if row["round"] == latest["round"] else None
            if row["round"] == 0 and store.probes is not None:
                sketch = sketches.encode(store.probes.zero())
            row_hash = chain_hash(previous, {**row, "state_sketch": sketch})
            ledger.db.execute("update rounds set state_sketch = ?, log_hash = ?, "
                              "cumulative_sha = null where round = ?",
                              [sketch, row_hash, row["round"]])
            previous = row_hash
        ledger.db.execute("update rounds set cumulative_sha = null")
    for sha in legacy:
        blobs.path(sha).unlink(missing_ok=True)
    log.info("converted the 0.1 state: R after round %d is now a dense checkpoint; %d old R "
             "blob(s) removed", latest["round"], len(legacy))
    return latest["round"]
