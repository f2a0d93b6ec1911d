"""The contract between a --listen connection and the worker process that owns it: what
``connection.SmtpProtocol`` needs of ``worker.Worker`` (a structural type, so neither
module imports the other's class)."""

from __future__ import annotations

import ssl
from collections.abc import Coroutine
from typing import Any, Protocol

from ..checker import CdbGetter
from ..serving.anvil import Limits
from ..serving.cdbfile import CdbCache
from ..serving.metrics import Metrics
from ..smtp.context import Controls
from .controls import IpMe
from .options import SmtpdOptions


class Host(Protocol):
    """What a connection needs of the worker process that owns it (``worker.Worker`` is
    one): its options, limits, metrics, cached controls and rules, TLS and AUTH set-up;
    the sessions are the worker's own (``opened``/``closed``), and the attributes are
    read here, never written: the worker alone changes its state."""
    o: SmtpdOptions
    limits: Limits
    metrics: Metrics
    base_env: dict[str, str]
    ipme: IpMe
    rules: CdbCache | None
    tls: ssl.SSLContext | None
    checkpw: list[str] | None
    checkpw_timeout: float
    stopping: bool
    grace_over: bool

    def next_id(self) -> int: ...
    def opened(self, conn: Any) -> None: ...
    def closed(self, conn: Any) -> None: ...

    def setup(self, env: dict[str, str]
              ) -> tuple[Controls, CdbGetter | None, CdbGetter | None]: ...
    def rules_current(self) -> CdbGetter: ...
    def rules_failed(self, err: OSError, ident: int, where: str) -> None: ...
    def cleanup(self, coro: Coroutine[Any, Any, None]) -> None: ...
