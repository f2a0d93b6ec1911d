"""Waiting for something a process does, with a deadline and a useful message."""

from __future__ import annotations

import time


def wait_for(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {seconds}s waiting for {what}")
