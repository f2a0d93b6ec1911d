"""The one debounce rule of the daemon's scheduler, and how its reasons read."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Window:
    """Requests gathered until none came for ``quiet`` seconds, or ``max_delay`` after
    the first: the one debounce rule, used for each kind of request."""
    quiet: float
    max_delay: float
    first: float | None = None
    last: float | None = None

    def note(self, now: float) -> None:
        self.first = now if self.first is None else self.first
        self.last = now if self.last is None else max(self.last, now)

    def due(self) -> float | None:
        if self.first is None or self.last is None:
            return None
        return min(self.last + self.quiet, self.first + self.max_delay)

    def clear(self) -> None:
        self.first = self.last = None


def why(reasons: list[str]) -> str:
    more = f" (+{len(reasons) - 3} more)" if len(reasons) > 3 else ""
    return "; ".join(reasons[:3]) + more or "no reason recorded"
