"""Per-caller token buckets, so one noisy or hostile peer cannot starve the rest.

Applied after authentication (an outsider is refused by the HMAC check before it costs a bucket;
refused requests spend a per-address budget of their own).
The default, 100 requests per second with bursts of 200 per caller, is far above what a node or
client needs (heartbeats are 4 per second) and far below what would hurt the node.
"""

from __future__ import annotations

import time
from collections import OrderedDict


class RateLimited(Exception):
    code = "rate_limited"

    def __init__(self, caller: str, rate: float):
        self.message = f"{caller[:16]} is sending more than {rate:g} requests per second; slow down"
        super().__init__(self.message)


class RateLimiter:
    def __init__(self, rate: float = 100.0, burst: float = 200.0, max_callers: int = 10_000):
        self.rate = rate
        self.burst = burst
        self.max_callers = max_callers
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def check(self, caller: str, now: float | None = None) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(caller, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[caller] = (tokens, now)
            raise RateLimited(caller, self.rate)
        self._buckets[caller] = (tokens - 1.0, now)
        while len(self._buckets) > self.max_callers:  # bounded memory: forget the oldest caller
            self._buckets.popitem(last=False)
