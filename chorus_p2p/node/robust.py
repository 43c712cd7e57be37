"""Robust aggregation filters, applied by the coordinator before it aggregates.

- **Norm bound** (``--max-update-norm``): an update whose weight change ``||s B A||`` (over all
  modules) exceeds the bound is left out.
- **Outlier rejection** (``--outlier-mad K``): with at least 3 updates, one whose norm is more than
  ``K`` median absolute deviations from the median norm is left out. The MAD is scaled by 1.4826
  so that ``K`` reads as standard deviations for well-behaved clients.

Exactness is over what remains: the global model equals the weighted mean of the *accepted*
clients' models. Every exclusion is recorded in the ledger with its reason.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class FilterPolicy:
    max_norm: float | None = None
    mad_k: float | None = None

    @property
    def active(self) -> bool:
        return self.max_norm is not None or self.mad_k is not None


def filter_updates(updates: list[dict[str, Any]], policy: FilterPolicy) -> dict[str, str]:
    """Return ``{node_id: reason}`` for updates to leave out (possibly all of them)."""
    excluded: dict[str, str] = {}
    if policy.max_norm is not None:
        for u in updates:
            if u["norm"] > policy.max_norm:
                excluded[u["node_id"]] = (f"update norm {u['norm']:.4g} exceeds the bound "
                                          f"{policy.max_norm:.4g}")
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
