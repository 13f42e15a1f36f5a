"""Token buckets, one per key. Pure: the caller passes the time in."""

from __future__ import annotations


class Buckets:
    """``per_minute`` tokens per key; a bucket holds one minute's worth and
    refills evenly. ``per_minute == 0`` turns the limit off."""

    def __init__(self, per_minute: int) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self._state: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str, now: float) -> float:
        """Take one token. Returns 0.0 on success, else the seconds to wait."""
        if not self.capacity:
            return 0.0
        tokens, at = self._state.get(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - at) * self.rate)
        if tokens >= 1.0:
            self._state[key] = (tokens - 1.0, now)
            return 0.0
        self._state[key] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def forget_full(self, now: float) -> None:
        """Drop buckets that have refilled completely (they equal a new one)."""
        full = [k for k, (t, at) in self._state.items() if t + (now - at) * self.rate >= self.capacity]
        for k in full:
            del self._state[k]
