"""Differential privacy for a node's own updates: L2 clipping + the Gaussian mechanism, with a
Rényi-DP accountant from Google's ``dp-accounting`` library.

What is protected: each round, the change a node makes to the global adapter (all LoRA factors,
flattened) is clipped to L2 norm ``clip`` and Gaussian noise of standard deviation
``noise_multiplier * clip`` is added to every coordinate *on the node, before the update leaves
it*. The released update is (epsilon, delta)-DP under add/remove adjacency of the node's whole
local dataset (the node trained on its data, versus contributed a zero change), the usual
user-level framing of DP-FedAvg: the change has L2 sensitivity ``clip``. Under
replace-the-dataset adjacency the sensitivity is ``2 * clip``; for that guarantee double
``--dp-noise``. Everything computed from the update (the global adapter, R, the merged model)
inherits the guarantee by post-processing. The accountant composes
one Gaussian mechanism (sampling rate 1) per submitted round; the rounds spent and epsilon are
persisted in the ledger, and past the budget the node refuses to submit.

What is not protected: the example count sent as the update's weight, the timing of submissions,
and anything the node does outside chorus-p2p. Reported train/eval losses are not sent at all
while DP is on.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable

import torch


class BudgetExhausted(Exception):
    """Submitting one more round would exceed the configured epsilon."""


@dataclass(frozen=True)
class DPConfig:
    epsilon: float
    delta: float = 1e-5
    clip: float = 1.0
    noise_multiplier: float = 1.0

    def __post_init__(self) -> None:
        if not (self.epsilon > 0 and 0 < self.delta < 1 and self.clip > 0
                and self.noise_multiplier > 0):
            raise ValueError("DP needs epsilon > 0, 0 < delta < 1, clip > 0, noise > 0")


def epsilon_after(rounds: int, config: DPConfig) -> float:
    """Epsilon (at ``config.delta``) after ``rounds`` Gaussian releases, by the RDP accountant."""
    if rounds <= 0:
        return 0.0
    from dp_accounting import dp_event, rdp

    accountant = rdp.RdpAccountant()
    accountant.compose(dp_event.GaussianDpEvent(config.noise_multiplier), rounds)
    return float(accountant.get_epsilon(config.delta))


class PrivacyBudget:
    """Rounds already released, persisted in the ledger's meta table."""

    def __init__(self, ledger, config: DPConfig):
        self.ledger = ledger
        self.config = config

    @property
    def rounds(self) -> int:
        return int(self.ledger.get_meta("dp_rounds", "0"))

    @property
    def spent(self) -> float:
        return epsilon_after(self.rounds, self.config)

    def check(self) -> float:
        """Epsilon after one more release; raises if that is past the budget."""
        after = epsilon_after(self.rounds + 1, self.config)
        if after > self.config.epsilon:
            raise BudgetExhausted(
                f"privacy budget exhausted: {self.rounds} round(s) spent epsilon "
                f"{self.spent:.3f}; one more would make it {after:.3f} > the budget "
                f"{self.config.epsilon:g} (delta {self.config.delta:g}, noise multiplier "
                f"{self.config.noise_multiplier:g}). This node will not submit again; raise "
                f"--dp-epsilon or --dp-noise to continue, knowing what that means")
        return after

    def record(self) -> float:
        rounds = self.rounds + 1
        self.ledger.set_meta("dp_rounds", str(rounds))
        eps = epsilon_after(rounds, self.config)
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
