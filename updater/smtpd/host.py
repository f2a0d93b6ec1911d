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
    one): its options, limits, metrics, cached controls and rules, TLS and AUTH set-up,
    and the sessions it counts."""
    o: SmtpdOptions
    limits: Limits
    metrics: Metrics
    base_env: dict[str, str]
    sessions: set[Any]                # its connections (connection.SmtpProtocol)
    ipme: IpMe
    rules: CdbCache | None
    tls: ssl.SSLContext | None
    checkpw: list[str] | None
    checkpw_timeout: float
    serial: int
    stopping: bool
    grace_over: bool

    def setup(self, env: dict[str, str]
              ) -> tuple[Controls, CdbGetter | None, CdbGetter | None]: ...
    def rules_current(self) -> CdbGetter: ...
    def rules_failed(self, err: OSError, ident: int, where: str) -> None: ...
    def cleanup(self, coro: Coroutine[Any, Any, None]) -> None: ...
