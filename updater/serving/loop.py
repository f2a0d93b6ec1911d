"""The asyncio loop both servers run: a periodic sweep, the signals (SIGTERM / SIGINT:
stop, SIGHUP: read again), and loop errors as one log line each (an accept that fails
for want of descriptors pauses accepting and is logged once a minute, never a
traceback)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from typing import Any


def every(loop: asyncio.AbstractEventLoop, seconds: float, fn: Callable[[], None]) -> None:
    """Call ``fn`` on the loop every ``seconds``, from now on."""
    def tick() -> None:
        fn()
        loop.call_later(seconds, tick)
    loop.call_later(seconds, tick)


def stop_on_signals(loop: asyncio.AbstractEventLoop,
                    reload: Callable[[], None]) -> asyncio.Event:
    """An event SIGTERM and SIGINT set; SIGHUP calls ``reload``."""
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)
    return stop


def one_line_errors(loop: asyncio.AbstractEventLoop, log: Callable[[str], None]) -> None:
    """The loop's errors as one line each; EMFILE on accept once a minute."""
    warned = [float("-inf")]

    def on_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        msg = context.get("message", "")
        exc = context.get("exception")
        if "out of system resource" in msg:
            now = time.monotonic()
            if now - warned[0] > 60:
                warned[0] = now
                log(f"accept: {exc}; pausing accepts for a second (connections go on)")
            return
        log(f"{msg}: {type(exc).__name__ if exc else ''} {exc or ''}".strip())
    loop.set_exception_handler(on_error)
