"""A federation's differential-privacy policy, and the check every update must pass under it.

Local DP protects a node only if the node turns it on. Before this policy existed a new data
dir, a restart without ``--dp-epsilon``, ``chorus-node train``, the SDK and the Flower client all
sent raw updates, and nothing refused them. The policy makes DP the federation's rule instead of
each node's choice:

- It is fixed at ``init --require-dp`` and travels in the join token, so every node of the
  federation holds the same one; peers compare it in their hello, as they compare the spec, so a
  node made from a token with the policy stripped is refused.
- The coordinator refuses an update that does not declare the mechanism and the budget it spent
  (the ``chorus_dp`` entry of the safetensors header, written by :func:`privacy.privatize_file`),
  or declares settings weaker than the policy.
- It also measures the noise, tensor by tensor: an honest release of ``n`` numbers sits at
  squared distance ``~ sigma^2 n`` from the global adapter it started from (``sigma = noise *
  clip``), give or take a few ``sigma^2 sqrt(2n)`` and the clipped change. An update far below
  that band carries no such noise; one far above holds a change larger than its clip. Either
  way it was not released as declared.

What it cannot see: a sender that adds noise of the right size but can reproduce it (or
random bytes shaped like noise instead of its training). Such a sender fools no one but its own
data: the noise is what protects the sender. The check catches mistakes and stripped
settings; it is not a proof.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chorus_p2p.errors import UsageError
from chorus_p2p.federation.accounting import DP_SGD, MECHANISM, MECHANISMS, epsilon_of_releases
from chorus_p2p.federation.refusals import UpdateRejected

DECLARATION_KEY = "chorus_dp"
UNITS = {MECHANISM: "a node's whole local dataset (add/remove)",
         DP_SGD: "one record (text) of a node's data (add/remove)"}
UNIT = UNITS[MECHANISM]
NOISE_SIGMAS = 6.0  # how far below its expectation the measured noise may fall (chi-square)


@dataclass(frozen=True)
class DPPolicy:
    """What every update of the federation must meet. ``min_noise`` fixes the per-round price;
    ``max_epsilon`` caps what a node may have spent; ``max_delta`` the failure probability."""

    max_epsilon: float
    min_noise: float
    max_delta: float = 1e-5
    # Which mechanism, hence which unit, every update must use: an epsilon over a whole dataset
    # and one over a record are different promises, so a federation takes one.
    mechanism: str = MECHANISM

    def __post_init__(self) -> None:
        if not (self.max_epsilon > 0 and self.min_noise > 0 and 0 < self.max_delta < 1):
            raise UsageError("a DP policy needs --dp-max-epsilon > 0, --dp-min-noise > 0 and "
                             "0 < --dp-max-delta < 1")
        if self.mechanism not in MECHANISMS:
            raise UsageError(f"--dp-mechanism {self.mechanism}: one of {', '.join(MECHANISMS)}")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"max_epsilon": self.max_epsilon, "min_noise": self.min_noise,
                               "max_delta": self.max_delta}
        if self.mechanism != MECHANISM:  # tokens made before DP-SGD existed stay the same
            out["mechanism"] = self.mechanism
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> "DPPolicy | None":
        if not data:
            return None
        return cls(float(data["max_epsilon"]), float(data["min_noise"]),
                   float(data.get("max_delta", 1e-5)), str(data.get("mechanism", MECHANISM)))

    @property
    def kind(self) -> str:
        return "local DP" if self.mechanism == MECHANISM else "record-level DP-SGD"

    def describe(self) -> str:
        return (f"{self.kind} required: noise multiplier >= {self.min_noise:g}, epsilon <= "
                f"{self.max_epsilon:g} at delta <= {self.max_delta:g}, per "
                f"{UNITS[self.mechanism]}")

    def check_settings(self, noise: float, delta: float, epsilon: float, what: str,
                       mechanism: str = MECHANISM) -> None:
        """A node's or client's own settings against the policy, before it trains."""
        if mechanism != self.mechanism:
            raise UsageError(f"{what} uses --dp-mechanism {mechanism}, and this federation "
                             f"requires {self.mechanism} ({self.describe()})")
        if noise < self.min_noise or delta > self.max_delta or epsilon > self.max_epsilon:
            raise UsageError(f"{what} is weaker than this federation's policy ({self.describe()})"
                             f": --dp-noise {noise:g}, --dp-delta {delta:g}, --dp-epsilon "
                             f"{epsilon:g}")


def _rejected(code: str, message: str) -> Exception:
    return UpdateRejected(code, message)


def policy_json(policy: DPPolicy | None) -> dict[str, float] | None:
    return policy.to_json() if policy is not None else None


def read_declaration(path: Path) -> dict[str, Any] | None:
    """The ``chorus_dp`` entry of a safetensors file's header; None when it has none."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        raw = (handle.metadata() or {}).get(DECLARATION_KEY)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise _rejected("dp_required", f"the update's {DECLARATION_KEY} declaration is not "
                        "JSON") from exc
    return parse_declaration(data)


def check_update(policy: DPPolicy, path: Path, start_path: Path | None) -> dict[str, Any]:
    """Refuse an update file that does not meet ``policy``; return its declaration.

    ``start_path``: the global adapter the update says it trained from (its noise is measured
    against it); None skips the measurement (that adapter is not on this node)."""
    declared = read_declaration(path)
    check_declared(policy, declared)
    if start_path is not None:
        check_release(declared, path, start_path)
    return declared


def parse_declaration(data: Any) -> dict[str, Any] | None:
    """A declaration as the header or a Flower reply carries it (None: none declared)."""
    if data is None:
        return None
    try:
        out = {"mechanism": str(data["mechanism"]), "noise": float(data["noise"]),
               "clip": float(data["clip"]), "delta": float(data["delta"]),
               "epsilon": float(data["epsilon"]), "releases": int(data["releases"])}
        if out["mechanism"] == DP_SGD:
            out.update(sampling_rate=float(data["sampling_rate"]), steps=int(data["steps"]))
        return out
    except (ValueError, KeyError, TypeError) as exc:
        raise _rejected("dp_required", f"the update's DP declaration is damaged "
                        f"({exc.__class__.__name__}: {exc})") from exc


def check_declared(policy: DPPolicy, declared: dict[str, Any] | None) -> None:
    """The declared mechanism and budget against the policy (``dp_required`` /
    ``dp_insufficient``)."""
    if declared is None:
        raise _rejected("dp_required", (
            f"this federation requires {policy.describe()}; the update declares no DP. Train "
            "with DP on: `up --train --dp-epsilon E --dp-clip C --dp-noise Z`, `chorus-node "
            "train --dp-epsilon ...`, the SDK's privatize_file(), or ExactLoRAClient(dp=...)"))
    problems = []
    if declared["mechanism"] != policy.mechanism:
        problems.append(f"mechanism {declared['mechanism']!r} (wanted {policy.mechanism!r})")
    if not declared["noise"] >= policy.min_noise:
        problems.append(f"noise multiplier {declared['noise']:g} < {policy.min_noise:g}")
    if not declared["delta"] <= policy.max_delta:
        problems.append(f"delta {declared['delta']:g} > {policy.max_delta:g}")
    if not declared["epsilon"] <= policy.max_epsilon:
        problems.append(f"spent epsilon {declared['epsilon']:.3f} > {policy.max_epsilon:g}")
    if not declared["clip"] > 0:
        problems.append(f"clip {declared['clip']:g}")
    if declared["mechanism"] == DP_SGD and not (0 < declared["sampling_rate"] <= 1
                                                 and declared["steps"] >= 1):
        problems.append(f"sampling rate {declared['sampling_rate']:g} over "
                        f"{declared['steps']} step(s)")
    if not problems and declared["mechanism"] in MECHANISMS:
        alone = _epsilon_of_this_round(declared)
        if declared["epsilon"] < alone * (1 - 1e-6):
            problems.append(f"spent epsilon {declared['epsilon']:.3f} is less than this round "
                            f"alone spends ({alone:.3f})")
    if problems:
        raise _rejected("dp_insufficient", f"the update's DP does not meet this federation's "
                        f"policy: {'; '.join(problems)}")


def _epsilon_of_this_round(declared: dict[str, Any]) -> float:
    """What the declared round costs by itself: a lower bound on any honest total."""
    return epsilon_of_releases([declared], declared["delta"])


def check_release(declared: dict[str, Any], path: Path, start_path: Path) -> None:
    """The update at ``path`` carries the noise ``declared`` says, measured from the global
    adapter at ``start_path`` it trained from (``dp_noise_missing``). Local DP only: DP-SGD
    noised every step, not the update, so there is no band to measure it against."""
    if declared["mechanism"] != MECHANISM:
        return
    _check_noise(declared, _squared_distances(path, start_path))


def noise_band(sigma: float, numbers: int, clip: float) -> tuple[float, float]:
    """Where the squared distance of an honest release of ``numbers`` coordinates lies but with
    negligible probability (``NOISE_SIGMAS`` standard deviations out): ``||N||^2 ~ sigma^2
    chi^2_n`` has mean ``sigma^2 n`` and sd ``sigma^2 sqrt(2n)``; the clipped change adds at most
    ``clip`` to the norm, and its cross term ``2 <delta, N>`` has sd at most ``2 sigma clip``."""
    spread = NOISE_SIGMAS * math.sqrt(2.0 * numbers)
    low = sigma * sigma * (numbers - spread) - NOISE_SIGMAS * 2.0 * sigma * clip
    high = (clip + sigma * math.sqrt(numbers + spread)) ** 2
    return low, high


def _check_noise(declared: dict[str, Any], distances: dict[str, tuple[float, int]]) -> None:
    """Each tensor must sit in its band: noise is spread over every coordinate, so a tensor far
    below its band carries none, and one far above holds a change larger than the clip."""
    sigma, clip = declared["noise"] * declared["clip"], declared["clip"]
    for name, (measured, numbers) in distances.items():
        low, high = noise_band(sigma, numbers, clip)
        if not low <= measured <= high:
            raise _rejected("dp_noise_missing", (
                f"the update declares noise {declared['noise']:g} x clip {clip:g}, but its "
                f"{name} lies {math.sqrt(measured):.4g} from the global adapter it trained "
                f"from, where a clipped and noised release lies within "
                f"{math.sqrt(max(low, 0.0)):.4g}..{math.sqrt(high):.4g}: it was not "
                f"{'noised' if measured < low else 'clipped'} as declared"))


def _squared_distances(path: Path, start_path: Path) -> dict[str, tuple[float, int]]:
    """Per tensor, ``||update - start||^2`` and how many numbers it holds (float64, one tensor
    at a time: adapters of large models stay out of memory)."""
    from safetensors import safe_open

    out = {}
    with safe_open(str(path), framework="pt") as update, \
            safe_open(str(start_path), framework="pt") as start:
        names = set(update.keys())
        if names != set(start.keys()):
            raise _rejected("wrong_shape", "the update's tensors differ from the global "
                            "adapter's it says it trained from")
        for name in sorted(names):
            diff = update.get_tensor(name).double() - start.get_tensor(name).double()
            out[name] = (float((diff * diff).sum()), diff.numel())
    return out
