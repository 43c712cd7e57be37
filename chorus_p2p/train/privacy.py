"""Differential privacy for a node's own updates: L2 clipping + the Gaussian mechanism, with a
Rényi-DP accountant from Google's ``dp-accounting`` library.

What is protected: each round, the change a node makes to the global adapter (all LoRA factors,
flattened) is clipped to L2 norm ``clip`` and Gaussian noise of standard deviation
``noise_multiplier * clip`` is added to every coordinate *on the node, before the update leaves
it*. The released update is (epsilon, delta)-DP under add/remove adjacency of the node's whole
local dataset (the node trained on its data, versus contributed a zero change): *local* DP at
the level of a node's whole dataset (not DP-FedAvg, whose noise is added by a trusted server,
and not record-level DP-SGD): the change has L2 sensitivity ``clip``. Under
replace-the-dataset adjacency the sensitivity is ``2 * clip``; for that guarantee double
``--dp-noise``. Everything computed from the update (the global adapter, R, the merged model)
inherits the guarantee by post-processing. The accountant composes
one Gaussian mechanism (sampling rate 1) per submitted round; the rounds spent and epsilon are
persisted in the ledger, and past the budget the node refuses to submit.

Record-level DP-SGD (``dp_sgd.py``, mechanism ``dp-sgd``) protects one record instead, with
far less noise per round; its releases are priced here too (Poisson-subsampled Gaussian steps)
and written by :func:`release_dp_sgd_file`. One budget holds releases of one unit.

What is not protected: the example count sent as the update's weight, the timing of submissions,
and anything the node does outside chorus-p2p. Reported train/eval losses are not sent at all
while DP is on.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from chorus_p2p.errors import UsageError
from chorus_p2p.federation.accounting import epsilon_of, epsilon_of_releases
from chorus_p2p.federation.dp_policy import (DECLARATION_KEY, DP_SGD, MECHANISM as GAUSSIAN_LOCAL,
                                             MECHANISMS, UNITS)


class BudgetExhausted(Exception):
    """Submitting one more round would exceed the configured epsilon."""


class BudgetMismatch(BudgetExhausted, UsageError):
    """The budget's past releases protect another unit than the configured mechanism's: a
    usage error at start-up (exit 2), and never a release."""


@dataclass(frozen=True)
class DPConfig:
    """``clip`` bounds the round's change (``gaussian-local``) or each record's gradient
    (``dp-sgd``); the noise's standard deviation is ``noise_multiplier * clip`` in both."""

    epsilon: float
    delta: float = 1e-5
    clip: float = 1.0
    noise_multiplier: float = 1.0
    mechanism: str = GAUSSIAN_LOCAL

    def __post_init__(self) -> None:
        if not (self.epsilon > 0 and 0 < self.delta < 1 and self.clip > 0
                and self.noise_multiplier > 0):
            raise ValueError("DP needs epsilon > 0, 0 < delta < 1, clip > 0, noise > 0")
        if self.mechanism not in MECHANISMS:
            raise ValueError(f"DP mechanism {self.mechanism!r}: one of {', '.join(MECHANISMS)}")

    @property
    def unit(self) -> str:
        return UNITS[self.mechanism]


def epsilon_after(rounds: int, config: DPConfig) -> float:
    """Epsilon (at ``config.delta``) after ``rounds`` Gaussian releases, by the RDP accountant."""
    return epsilon_of([config.noise_multiplier] * max(rounds, 0), config.delta)


class PrivacyBudget:
    """Every release this node made, with the settings it was made under, persisted in the
    ledger's meta table (``dp_releases``: a JSON list of {round, noise, clip, delta}).

    The spent epsilon composes those releases as they were made: a restart with a larger
    ``--dp-noise`` makes the *next* rounds cheaper, never the past ones (only a round count was
    kept before, and past rounds were re-priced with today's settings: 10 rounds at z = 0.5,
    epsilon 48.8, showed as 8.08 after a restart with z = 2). It is reported at the smallest
    delta any release or the current setting used, the conservative side."""

    def __init__(self, ledger, config: DPConfig):
        self.ledger = ledger
        self.config = config

    def releases(self) -> list[dict[str, float]]:
        import json

        recorded = json.loads(self.ledger.get_meta("dp_releases", "[]") or "[]")
        legacy = int(self.ledger.get_meta("dp_rounds", "0") or 0) - len(recorded)
        if legacy > 0:  # counted before per-round settings were kept: their noise is unknown,
            # priced at today's (README says so)
            recorded = [{"round": None, "noise": self.config.noise_multiplier,
                         "clip": self.config.clip, "delta": self.config.delta}] * legacy + recorded
        return recorded

    @property
    def rounds(self) -> int:
        return len(self.releases())

    def _delta(self, releases: list[dict[str, float]]) -> float:
        return min([self.config.delta, *(float(r["delta"]) for r in releases)])

    def _epsilon(self, releases: list[dict[str, Any]]) -> float:
        return epsilon_of_releases(releases, self._delta(releases))

    def validate(self) -> None:
        """Refuse a budget whose past releases protect another unit than this config's: an
        epsilon over whole datasets and one over records do not add up to either."""
        other = {r.get("mechanism", GAUSSIAN_LOCAL) for r in self.releases()} - {
            self.config.mechanism}
        if other:
            theirs = other.pop()
            raise BudgetMismatch(
                f"this privacy budget already holds {theirs} releases (unit: {UNITS[theirs]}); "
                f"{self.config.mechanism} protects {self.config.unit}, and the two do not "
                "compose into one epsilon. Keep --dp-mechanism "
                f"{theirs}, or give this data its own budget (a new data dir, or "
                "--dp-budget-file) knowing the old releases still count against the other unit")

    @property
    def spent(self) -> float:
        return self._epsilon(self.releases())

    def check(self, planned: dict[str, Any] | None = None) -> float:
        """Epsilon after one more release; raises past the budget. ``planned``: a DP-SGD round's
        settings (sampling rate, steps); without it a DP-SGD budget assumes its last round's,
        and local DP today's settings."""
        self.validate()
        releases = self.releases()
        upcoming = self._next(planned)
        after = self._epsilon([*releases, *([upcoming] if upcoming else [])])
        if after > self.config.epsilon:
            raise BudgetExhausted(
                f"privacy budget exhausted: {len(releases)} round(s) spent epsilon "
                f"{self._epsilon(releases):.3f}; one more at noise multiplier "
                f"{self.config.noise_multiplier:g} would make it {after:.3f} > the budget "
                f"{self.config.epsilon:g} (delta {self._delta(releases):g}; the unit: "
                f"{self.config.unit}). This node will not submit again. What was "
                "spent stays spent: a larger --dp-noise only makes future rounds cheaper")
        return after

    def _next(self, planned: dict[str, Any] | None = None) -> dict[str, Any] | None:
        if planned is not None:
            return {**planned, "delta": self.config.delta}
        if self.config.mechanism == DP_SGD:  # priced from its plan; until then, the last one
            last = [r for r in self.releases() if r.get("mechanism") == DP_SGD][-1:]
            return {**last[0], "noise": self.config.noise_multiplier,
                    "delta": self.config.delta} if last else None
        return {"noise": self.config.noise_multiplier, "clip": self.config.clip,
                "delta": self.config.delta}

    def record(self, round_no: int | None = None, planned: dict[str, Any] | None = None
               ) -> float:
        import json

        upcoming = self._next(planned)
        if upcoming is None:
            raise ValueError("a DP-SGD release is recorded with its plan (sampling rate, steps)")
        releases = [*self.releases(), {**upcoming, "round": round_no}]
        eps = self._epsilon(releases)
        with self.ledger.db.atomic() if hasattr(self.ledger, "db") else nullcontext():
            self.ledger.set_meta("dp_releases", json.dumps(releases))
            self.ledger.set_meta("dp_rounds", str(len(releases)))
            self.ledger.set_meta("dp_epsilon", f"{eps:.6f}")
        return eps


class NonFiniteUpdate(ValueError):
    """The trained adapter holds NaN or Inf: it cannot be clipped, so it is never released."""


def secure_normal(shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Standard normal float64 samples from the operating system's CSPRNG (``os.urandom``).

    The noise is the privacy: whoever can reproduce it subtracts it. torch's CPU generator keeps
    32 bits of its seed (seeds ``s`` and ``s + 2**32`` give the same noise), so a token holder
    could search the seed of a published update in CPU-hours. Here every draw is 2 x 64 fresh
    bits from the kernel's CSPRNG, turned into normals by Box-Muller; nothing is seeded."""
    count = math.prod(shape)
    if count == 0:
        return torch.zeros(shape, dtype=torch.float64)
    words = torch.frombuffer(bytearray(os.urandom(16 * count)), dtype=torch.int64)
    # 53 random bits per uniform, in (0, 1]: log() never sees 0.
    uniform = ((words & ((1 << 53) - 1)).to(torch.float64) + 1.0) / float(1 << 53)
    u1, u2 = uniform[:count], uniform[count:]
    normal = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return normal.reshape(shape)


def privatize(start: dict[str, torch.Tensor], trained: dict[str, torch.Tensor],
              config: DPConfig, noise: Callable[[torch.Size], torch.Tensor] = secure_normal
              ) -> tuple[dict[str, torch.Tensor], float]:
    """``start + clip(trained - start) + N(0, (noise * clip)^2)``; returns it and the raw norm.

    ``noise`` draws standard normals; the default is the CSPRNG (tests may pass a seeded one to
    check the arithmetic, never the node). A non-finite change is refused: ``min(1, C / nan)``
    is 1, so it would leave unclipped."""
    keys = sorted(trained)
    if set(keys) != set(start):
        raise ValueError("the trained adapter and the global adapter have different tensors")
    deltas = {k: trained[k].double() - start[k].double() for k in keys}
    bad = [k for k, d in deltas.items() if not bool(torch.isfinite(d).all())]
    if bad:
        raise NonFiniteUpdate(f"the trained adapter holds NaN or Inf in {bad[0]}"
                              f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}; it "
                              "cannot be clipped, so it is not released (nothing was sent)")
    norm = math.sqrt(sum(float((d * d).sum()) for d in deltas.values()))
    factor = min(1.0, config.clip / norm) if norm > 0 else 1.0
    sigma = config.noise_multiplier * config.clip
    out = {}
    for k in keys:
        out[k] = (start[k].double() + deltas[k] * factor + noise(deltas[k].shape) * sigma
                  ).to(trained[k].dtype)
    return out, norm


class BudgetFile:
    """A privacy budget kept outside a node: the same ``dp_releases`` record as a node's ledger,
    in one JSON file (written whole, fsynced, renamed into place). For ``chorus-node train``,
    the SDK and the Flower client, whose releases must count against the same budget across
    runs: a new temp dir must not mean a fresh epsilon."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def _read(self) -> dict[str, str]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as exc:  # never guess a budget: refuse until someone looks
            raise BudgetExhausted(f"{self.path}: the privacy budget file is damaged ({exc}); "
                                  "nothing was released. Restore it from a backup") from exc

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        return self._read().get(key, default)

    def set_meta(self, key: str, value: str) -> None:
        data = {**self._read(), key: value}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".partial")
        with open(tmp, "w") as fh:
            fh.write(json.dumps(data, sort_keys=True))
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(self.path)


def release_update(budget: PrivacyBudget, start_file: str | os.PathLike,
                   trained_file: str | os.PathLike, out_file: str | os.PathLike,
                   dp_release: Any = None, round_no: int | None = None
                   ) -> tuple[float | None, float]:
    """Write what may leave for one round under ``budget``'s mechanism; returns (the pre-noise
    norm, local DP only, else None; the epsilon spent including this release). ``dp_release``:
    the ``DPSGDRelease`` that training reported (DP-SGD only)."""
    if budget.config.mechanism == DP_SGD:
        if dp_release is None:
            raise ValueError("a DP-SGD release needs the round's plan: train with dp_sgd_clip")
        return None, release_dp_sgd_file(trained_file, out_file, budget, dp_release.to_json(),
                                         round_no)
    return privatize_file(start_file, trained_file, out_file, budget, round_no)


def dp_sgd_settings(config: DPConfig | None) -> dict[str, Any]:
    """The ``TrainConfig`` fields that make training record-level DP-SGD under ``config``."""
    if config is None or config.mechanism != DP_SGD:
        return {"dp_sgd_clip": None}
    return {"dp_sgd_clip": config.clip, "dp_sgd_noise": config.noise_multiplier}


def default_budget_file(federation: str) -> Path:
    """Where ``chorus-node train`` keeps its budget: one per federation and user account, so
    every run that sends this account's data to that federation spends from the same one."""
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in federation)
    return state / "chorus-p2p" / f"dp-budget-{safe}.json"


def declaration(config: DPConfig, epsilon: float, releases: int,
                planned: dict[str, Any] | None = None) -> dict[str, Any]:
    """What an update tells the federation about its DP (``chorus_dp`` in its header)."""
    out = {"mechanism": config.mechanism, "noise": config.noise_multiplier, "clip": config.clip,
           "delta": config.delta, "epsilon": round(epsilon, 6), "releases": releases,
           "unit": config.unit}
    if planned is not None:
        out.update(sampling_rate=planned["sampling_rate"], steps=planned["steps"])
    return out


def _write_release(tensors: dict[str, torch.Tensor], out_file: str | os.PathLike,
                   declared: dict[str, Any]) -> None:
    """The update that may leave, its DP declared in the header; fsynced, then renamed."""
    from safetensors.torch import save_file

    out = Path(out_file)
    tmp = out.with_name(out.name + ".partial")
    save_file(tensors, str(tmp), metadata={"format": "pt", DECLARATION_KEY: json.dumps(
        declared, sort_keys=True)})
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    tmp.replace(out)


def release_dp_sgd_file(trained_file: str | os.PathLike, out_file: str | os.PathLike,
                        budget: PrivacyBudget, planned: dict[str, Any],
                        round_no: int | None = None) -> float:
    """Write a DP-SGD round's trained adapter as the update that may leave; returns the epsilon
    spent including it. Training already noised every step, so nothing is added here; the
    release is recorded (fsynced) before the file exists, as for local DP."""
    from safetensors.torch import load_file

    budget.check(planned)
    trained = load_file(str(trained_file))
    bad = [k for k, t in trained.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise NonFiniteUpdate(f"the trained adapter holds NaN or Inf in {bad[0]}; it is not "
                              "released (nothing was sent)")
    epsilon = budget.record(round_no, planned)
    _write_release(trained, out_file, declaration(budget.config, epsilon, budget.rounds,
                                                  planned))
    return epsilon


def privatize_file(start_file: str | os.PathLike, trained_file: str | os.PathLike,
                   out_file: str | os.PathLike, budget: PrivacyBudget,
                   round_no: int | None = None) -> tuple[float, float]:
    """Clip and noise one round's change and write the update that may leave, declaring its
    DP in the safetensors header; returns (raw norm, epsilon spent including this release).

    The SDK's one call for local DP: ``start_file`` is the global adapter you trained from,
    ``trained_file`` your trained one. Order matters: the budget is checked, the release is
    recorded (fsynced) *before* the noised file exists, so a crash can only over-count; the
    file is fsynced before this returns, so the caller may delete the raw adapter."""
    from safetensors.torch import load_file

    if budget.config.mechanism != GAUSSIAN_LOCAL:
        raise ValueError("privatize_file is local DP's release; a DP-SGD round is released by "
                         "release_dp_sgd_file")
    budget.check()
    start, trained = load_file(str(start_file)), load_file(str(trained_file))
    noisy, raw_norm = privatize(start, trained, budget.config)
    epsilon = budget.record(round_no)
    _write_release(noisy, out_file, declaration(budget.config, epsilon, budget.rounds))
    return raw_norm, epsilon
