"""The Rényi-DP accountant (Google's ``dp-accounting``): what a list of DP releases costs in
epsilon at a given delta.

Both sides price releases the same way: a node before it sends (``train/privacy.py``) and a
coordinator checking a declaration against its policy (``dp_policy.py``)."""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

MECHANISM = "gaussian-local"  # clip the round's change, add N(0, (z C)^2) on the node
DP_SGD = "dp-sgd"  # record-level: per-record clipping and noise on every step (train/dp_sgd.py)
MECHANISMS = (MECHANISM, DP_SGD)


def epsilon_of(noise_multipliers: list[float], delta: float) -> float:
    """Epsilon at ``delta`` after one Gaussian release per noise multiplier, composed by the
    RDP accountant: rounds released under different settings each count at their own price."""
    return epsilon_of_releases([{"noise": z} for z in noise_multipliers], delta)


class _SkippedOrders(logging.Filter):
    """dp-accounting logs a warning each time its series for a fractional RDP order below 2
    does not converge at a Poisson rate near 0.1, and drops that order (the bound stays valid:
    fewer orders can only over-state epsilon). A DP-SGD round prices ~10 such orders, so a node
    would log them every round: nothing a user can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_SkippedOrders())


def epsilon_of_releases(releases: list[dict[str, Any]], delta: float) -> float:
    """Epsilon at ``delta`` after ``releases``, each at its own settings, composed by the RDP
    accountant: a local-DP round is one Gaussian mechanism; a DP-SGD round is ``steps``
    Poisson-subsampled Gaussian mechanisms at its sampling rate. (Releases of one budget share
    one unit: ``PrivacyBudget`` refuses to mix them.)"""
    if not releases:
        return 0.0
    from dp_accounting import dp_event, rdp

    kinds: Counter = Counter()
    for release in releases:
        z = float(release["noise"])
        if release.get("mechanism", MECHANISM) == DP_SGD:
            kinds[(z, float(release["sampling_rate"]))] += int(release["steps"])
        else:
            kinds[(z, 1.0)] += 1
    accountant = rdp.RdpAccountant()
    for (z, rate), count in sorted(kinds.items()):
        event = dp_event.GaussianDpEvent(z)
        if rate < 1.0:
            event = dp_event.PoissonSampledDpEvent(rate, event)
        accountant.compose(event, count)
    return float(accountant.get_epsilon(delta))
