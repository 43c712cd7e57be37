"""The dense state R: exact over many rounds, checkpointed, fingerprinted, recoverable.

These drive :class:`StateStore` directly with random factored residuals; the node-level tests
(long runs, late joiners, kill -9, migration) are in ``test_long_run.py``.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from chorus_p2p.lora.residual import FactoredResidual
from chorus_p2p.state import sketch as sketches
from chorus_p2p.state.dense_file import DenseFile, StateFileError
from chorus_p2p.state.store import StateError, StateStore

Q = "base_model.model.model.layers.0.self_attn.q_proj"
V = "base_model.model.model.layers.0.self_attn.v_proj"
SHAPES = {Q: (96, 64), V: (32, 64)}


def _residual(gen: torch.Generator, rank: int = 6, scale: float = 0.01) -> FactoredResidual:
    return FactoredResidual({p: (torch.randn(s[0], rank, generator=gen) * scale,
                                 torch.randn(rank, s[1], generator=gen)) for p, s in SHAPES.items()})


class Federation:
    """Residuals written round by round, with the float64 sum and the sketch chain beside them."""

    def __init__(self, root, seed: int = 0):
        self.root = root
        self.gen = torch.Generator().manual_seed(seed)
        self.probes = sketches.Probes("statelab", SHAPES)
        self.exact = {p: torch.zeros(s, dtype=torch.float64) for p, s in SHAPES.items()}
        self.sketch = self.probes.zero()
        self.sketches = {0: self.sketch}
        self.paths = {}

    def next(self, number: int):
        residual = _residual(self.gen)
        path = self.root / f"D{number}.safetensors"
        residual.save(path)
        self.paths[number] = path
        for prefix in SHAPES:
            self.exact[prefix] += residual.dense(prefix)
        self.sketch = sketches.add(self.sketch, {p: self.probes.of_factors(p, *residual.factors[p])
                                                 for p in SHAPES})
        self.sketches[number] = self.sketch
        return path

    def plan(self, start: int, upto: int):
        return [(n, self.paths[n]) for n in range(start + 1, upto + 1)]


def _error(store: StateStore, exact) -> float:
    got = dict(store.read(store.round))
    return max(float((got[p].double() - exact[p]).norm() / exact[p].norm()) for p in SHAPES)


def test_two_hundred_rounds_stay_exact_fingerprinted_and_bounded(tmp_path):
    fed = Federation(tmp_path)
    store = StateStore(tmp_path / "state", SHAPES, fed.probes, checkpoint_every=10)
    for number in range(1, 201):
        report = store.apply(number, fed.next(number))
        # One module in rotation per round; all of them before each checkpoint.
        assert len(report.sketch) == 1
        assert not sketches.compare(report.sketch, {p: fed.sketch[p] for p in report.sketch})
        if store.checkpoint_due():
            assert not sketches.compare(store.sketch(), fed.sketch)
            store.checkpoint()
        # Never more than the working file and one checkpoint (+ its sidecar) on disk.
        assert len(list((tmp_path / "state" / "checkpoints").glob("R-*.safetensors"))) <= 1
    assert store.round == 200
    assert _error(store, fed.exact) <= 1e-5
    checkpoint = store.latest_checkpoint()
    assert checkpoint.round == 200 and checkpoint.size == store.layout.total_bytes
    # The state files are ordinary safetensors files.
    with safe_open(str(checkpoint.path), framework="pt") as handle:
        assert handle.metadata()["format"] == "chorus-state"
        assert sorted(handle.keys()) == sorted(p + ".residual" for p in SHAPES)


def _apply_rounds(store: StateStore, fed: Federation, numbers) -> dict[int, dict]:
    """Apply these rounds as a node does (checkpoint when due); R after each, copied."""
    snapshots = {}
    for number in numbers:
        store.apply(number, fed.next(number))
        if store.checkpoint_due():
            store.checkpoint()
        snapshots[number] = {p: t.clone() for p, t in store.read(number)}
    return snapshots


def test_a_past_round_is_rebuilt_from_the_checkpoint_and_the_residuals_after_it(tmp_path):
    fed = Federation(tmp_path, seed=1)
    store = StateStore(tmp_path / "state", SHAPES, fed.probes, checkpoint_every=5)
    snapshots = _apply_rounds(store, fed, range(1, 13))
    # R after round 11 from checkpoint 10 + D11: the same bits the working state had.
    rebuilt = dict(store.read(11, fed.plan(10, 11)))
    assert all(torch.equal(rebuilt[p], snapshots[11][p]) for p in SHAPES)
    # R after round 7, which the checkpoint (10) has passed: backward, checkpoint minus D8..D10
    # in float64, within float32 rounding of the state the node had at round 7.
    back = dict(store.read(7, fed.plan(7, 10)))
    assert all(back[p].dtype == torch.float32 for p in SHAPES)
    assert max(float((back[p] - snapshots[7][p]).norm() / snapshots[7][p].norm())
               for p in SHAPES) <= 1e-6
    with pytest.raises(StateError, match=r"needs the residuals of rounds 8\.\.10"):
        list(store.read(7, fed.plan(0, 7)))  # forward residuals cannot reach back
    with pytest.raises(StateError, match="needs the residuals"):
        list(store.read(11, fed.plan(10, 10)))


def test_a_pinned_checkpoint_still_reads_after_a_newer_one_replaced_it(tmp_path):
    """An export opens the checkpoint its plan starts from; the node may write the next one
    (deleting this one) before the export reads: the open file still serves it."""
    fed = Federation(tmp_path, seed=3)
    store = StateStore(tmp_path / "state", SHAPES, fed.probes, checkpoint_every=3)
    snapshots = _apply_rounds(store, fed, range(1, 5))
    reader = StateStore(tmp_path / "state", SHAPES, read_only=True)
    pinned = reader.pin_checkpoint()
    assert pinned.round == 3
    _apply_rounds(store, fed, range(5, 7))  # the node goes on: checkpoint 6 replaces 3
    assert not pinned.checkpoint.path.exists()
    plan = fed.plan(3, 4)
    assert pinned.hold(plan)  # its residuals held open too: garbage collection may drop them
    for _, path in plan:
        path.unlink()
    rebuilt = dict(reader.read(4, plan, pinned))
    assert all(torch.equal(rebuilt[p], snapshots[4][p]) for p in SHAPES)
    assert not reader.pin_checkpoint().hold(plan)  # pinned after they went: says so
    # unpinned, the same read finds checkpoint 6 and needs the residuals back to round 4
    with pytest.raises(StateError, match=r"rounds 5\.\.6"):
        list(StateStore(tmp_path / "state", SHAPES, read_only=True).read(4, fed.plan(3, 4)))


def test_an_interrupted_update_is_detected_and_rebuilt_exactly(tmp_path):
    fed = Federation(tmp_path, seed=2)
    store = StateStore(tmp_path / "state", SHAPES, fed.probes, checkpoint_every=4)
    for number in range(1, 7):
        store.apply(number, fed.next(number))
        if store.checkpoint_due():
            store.checkpoint()
    path7 = fed.next(7)
    # What a kill -9 in the middle of applying round 7 leaves: the marker says so and one module
    # already has D7 added.
    (tmp_path / "state" / "working.json").write_text(json.dumps({"round": 6, "applying": 7}))
    state = DenseFile(store.working, store.layout, writable=True)
    state.write_module(Q, state.read_module(Q) + 1.0)
    reopened = StateStore(tmp_path / "state", SHAPES, fed.probes, checkpoint_every=4)
    assert reopened.dirty and reopened.recovery_round == 4
    with pytest.raises(StateError, match="interrupted"):
        reopened.apply(7, path7)
    assert reopened.reset_to_checkpoint() == 4
    for number, path in fed.plan(4, 7):
        reopened.apply(number, path)
    assert not sketches.compare(reopened.sketch(), fed.sketches[7])
    assert _error(reopened, fed.exact) <= 1e-5


def test_the_fingerprint_catches_a_corrupted_state(tmp_path):
    fed = Federation(tmp_path, seed=3)
    store = StateStore(tmp_path / "state", SHAPES, fed.probes)
    for number in range(1, 4):
        store.apply(number, fed.next(number))
    assert not sketches.compare(store.sketch(), fed.sketch)
    scale = float(fed.exact[V].abs().mean())
    state = DenseFile(store.working, store.layout, writable=True)
    dense = state.read_module(V)
    dense[5, 7] += 50 * scale  # one element off: a bit flip, a bad disk, a buggy copy
    state.write_module(V, dense)
    bad = sketches.compare(store.sketch(), fed.sketch)
    assert [m.prefix for m in bad] == [V]


def test_state_files_of_another_shape_are_refused(tmp_path):
    store = StateStore(tmp_path / "a", SHAPES)
    other = StateStore(tmp_path / "b", {Q: (96, 64)})
    with pytest.raises(StateFileError, match="not a state file for this federation"):
        store.install_checkpoint(other.working, 3, "0" * 64)
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(store.working.read_bytes()[:100])
    with pytest.raises(StateFileError):
        DenseFile(truncated, store.layout)


def test_a_new_state_is_a_sparse_file_of_zeros(tmp_path):
    shapes = {Q: (4096, 4096)}
    store = StateStore(tmp_path / "state", shapes)
    assert store.working.stat().st_size == store.layout.total_bytes > 64 << 20
    assert store.working.stat().st_blocks * 512 < 1 << 20  # nothing written yet
    assert float(dict(store.read(0))[Q].abs().max()) == 0.0
