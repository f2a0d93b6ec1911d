"""How long to wait before retrying something that failed (a build, a push).  A leaf
module: it imports nothing of ours."""

from __future__ import annotations


def backoff(failures: int, first: float, longest: float) -> float:
    """Delay before retry number ``failures`` (1, 2, ...): doubling, capped."""
    return float(min(longest, first * (2 ** max(0, failures - 1))))
