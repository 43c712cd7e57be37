"""Splitting a task's examples among clients: ``iid``, ``dirichlet`` over labels, ``natural``.

``dirichlet`` is the usual label-skew split (Hsu et al. 2019): for each label, the shares of
its examples across clients are drawn from Dirichlet(alpha); alpha = 0.1 leaves most clients
with one or two labels, alpha = 100 is nearly IID. ``natural`` keeps the data's own grouping:
one client per source file (or per ``group`` of a built-in task).
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from typing import TypeVar

from chorus_p2p.errors import UsageError

T = TypeVar("T")
PARTITIONS = ("iid", "dirichlet", "natural")


def _gamma_shares(rng: random.Random, alpha: float, clients: int) -> list[float]:
    draws = [rng.gammavariate(alpha, 1.0) for _ in range(clients)]
    total = sum(draws)
    return [d / total for d in draws] if total > 0 else [1.0 / clients] * clients


def split(items: Sequence[T], labels: Sequence[str], groups: Sequence[str], clients: int,
          how: str, seed: int, alpha: float = 0.1, known_labels: Sequence[str] = ()
          ) -> list[list[T]]:
    """``clients`` lists of ``items``; every client gets at least one item (a Dirichlet draw
    that leaves one empty gives it one from the largest client, and says nothing: it is the
    partition's edge, not an error)."""
    if how not in PARTITIONS:
        raise UsageError(f"partition {how!r}: one of {', '.join(PARTITIONS)}")
    if clients < 1 or clients > len(items):
        raise UsageError(f"{clients} clients for {len(items)} examples")
    rng = random.Random(f"partition-{how}-{seed}-{clients}-{alpha}")
    if how == "natural":
        names = sorted(set(groups))
        if len(names) != clients:
            raise UsageError(f"partition natural: the data has {len(names)} groups (source "
                             f"files), so it makes {len(names)} clients, not {clients}")
        return [[x for x, g in zip(items, groups) if g == name] for name in names]
    order = list(range(len(items)))
    rng.shuffle(order)
    if how == "iid":
        return [[items[i] for i in order[c::clients]] for c in range(clients)]
    if not alpha > 0:
        raise UsageError("dirichlet_alpha must be > 0")
    parts: list[list[T]] = [[] for _ in range(clients)]
    # The shares depend on the seed and the label only, not on the items: a task's training
    # examples and its held-out ones are split the same way (each client's held-out split
    # has its training data's labels).
    shares_rng = random.Random(f"dirichlet-shares-{seed}-{clients}-{alpha}")
    all_shares = {label: _gamma_shares(shares_rng, alpha, clients)
                  for label in sorted(set(labels) | set(known_labels))}
    for label in sorted(set(labels)):
        members = [i for i in order if labels[i] == label]
        shares = all_shares[label]
        cuts = [round(sum(shares[:c + 1]) * len(members)) for c in range(clients)]
        start = 0
        for c, end in enumerate(cuts):
            parts[c].extend(items[i] for i in members[start:end])
            start = end
    for part in parts:  # no client may be empty
        if not part:
            donor = max(parts, key=len)
            part.append(donor.pop())
    return parts


def label_skew(parts: Sequence[Sequence[str]]) -> float:
    """How far the clients' label distributions are from the pooled one: the mean total
    variation distance (0: IID; near 1 - 1/labels: each client holds one label)."""
    pooled = Counter(label for part in parts for label in part)
    total = sum(pooled.values())
    distances = []
    for part in parts:
        counts = Counter(part)
        distances.append(0.5 * sum(abs(counts[k] / len(part) - pooled[k] / total)
                                   for k in pooled))
    return sum(distances) / len(distances) if distances else math.nan
