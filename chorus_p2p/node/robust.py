"""Robust aggregation filters, applied by the coordinator before it aggregates.

- **Scale bound** (default, ``--max-update-ratio R``, 100): an update whose weight change
  ``||s B A||`` (over all modules, float64) is more than ``R`` times the federation's scale is
  left out: a client that scales its adapter by 1e30 cannot wedge the round. The scale is the
  larger of the federation's (the median of the last rounds' median norms, one vote per round)
  and the client's own smallest norm of the last rounds: made-up client ids with tiny updates
  cannot turn the bound against a client whose own history shows its size, and a client cannot
  raise its own bound faster than 100x per 5 rounds. (Uploads beyond any plausible norm are
  refused outright.)
- **Norm bound** (``--max-update-norm``): an update whose weight change exceeds the bound is
  left out.
- **Outlier rejection** (``--outlier-mad K``): with at least 3 updates, one whose norm is more than
  ``K`` median absolute deviations from the median norm is left out. The MAD is scaled by 1.4826
  so that ``K`` reads as standard deviations for well-behaved clients.

Exactness is over what remains: the global model equals the weighted mean of the *accepted*
clients' models. Every exclusion is recorded in the ledger with its reason.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

MAD_TO_SIGMA = 1.4826


DEFAULT_MAX_RATIO = 100.0


@dataclass(frozen=True)
class FilterPolicy:
    max_norm: float | None = None
    mad_k: float | None = None
    # The default bound, relative to the federation's own scale: an update whose norm is more
    # than this many times the median norm of the updates accepted in recent rounds is left out.
    # ``None`` turns it off.
    max_ratio: float | None = DEFAULT_MAX_RATIO

    @property
    def active(self) -> bool:
        return self.max_norm is not None or self.mad_k is not None


def _norm(update: dict[str, Any]) -> float:
    norm = update.get("norm")
    return math.inf if norm is None or not math.isfinite(norm) else float(norm)


@dataclass(frozen=True)
class Scale:
    """What "large" means for an update: the federation's recent scale (None before any
    history) and each client's own smallest recent norm."""

    federation: float | None = None
    own: dict[str, float] = field(default_factory=dict)

    def for_client(self, node_id: str) -> float | None:
        return max(self.federation or 0.0, self.own.get(node_id, 0.0)) or None


def filter_updates(updates: list[dict[str, Any]], policy: FilterPolicy,
                   scale: Scale | None = None) -> dict[str, str]:
    """Return ``{node_id: reason}`` for updates to leave out (possibly all of them)."""
    excluded = bound_exclusions(updates, policy, scale)
    remaining = [u for u in updates if u["node_id"] not in excluded]
    if policy.mad_k is not None and len(remaining) >= 3:
        norms = [u["norm"] for u in remaining]
        median = statistics.median(norms)
        mad = statistics.median(abs(n - median) for n in norms) * MAD_TO_SIGMA
        if mad > 0:
            for u in remaining:
                score = abs(u["norm"] - median) / mad
                if score > policy.mad_k:
                    excluded[u["node_id"]] = (f"outlier: norm {u['norm']:.4g} is {score:.1f} MADs "
                                              f"from the median {median:.4g} (limit "
                                              f"{policy.mad_k:g})")
    return excluded


def bound_exclusions(updates: list[dict[str, Any]], policy: FilterPolicy,
                     scale: Scale | None = None) -> dict[str, str]:
    """The exclusions each update earns on its own (unknown norm, the norm bound, the scale
    bound): decided as soon as the update arrives. Outliers need the round's whole set."""
    excluded: dict[str, str] = {}
    for u in updates:
        norm = _norm(u)
        reference = (scale or Scale()).for_client(u["node_id"])
        if math.isinf(norm):
            excluded[u["node_id"]] = "the update's norm is unknown or infinite"
        elif policy.max_norm is not None and norm > policy.max_norm:
            excluded[u["node_id"]] = (f"update norm {norm:.4g} exceeds the bound "
                                      f"{policy.max_norm:.4g}")
        elif policy.max_ratio is not None and reference and norm > policy.max_ratio * reference:
            excluded[u["node_id"]] = (f"update norm {norm:.4g} is {norm / reference:.3g} times "
                                      f"the federation's recent scale {reference:.4g} (limit "
                                      f"{policy.max_ratio:g}x, --max-update-ratio)")
    return excluded
