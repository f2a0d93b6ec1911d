"""What validrcptto-smtpd --listen did, for Prometheus.

Every number is a slot in a fixed table (label sets fixed and small: no address, no IP).
Each worker process adds to its own row of shared memory (no lock, like the connection
limits); the process serving ``/metrics`` sums the rows.  When a worker dies the
supervisor folds its counters into ``retired`` before the next worker gets the row, so
a counter never goes backwards; its gauges (open sessions) go with it.  The session
core only counts (``Session.counts``); the driver adds a session's counts when it ends.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

BUCKETS = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)

# (name, help, label name, label values): one slot per label value
COUNTERS: list[tuple[str, str, str, tuple[str, ...]]] = [
    ("sessions", "SMTP sessions by how they ended", "end",
     ("quit", "timeout", "limit", "error", "shutdown")),
    ("hangups", "sessions hung up on", "reason", ("invalid_limit", "auth_failures")),
    ("messages", "messages by what qmail-queue said", "result",
     ("queued", "rejected", "tempfail")),
    ("auth", "AUTH attempts", "result", ("ok", "failed", "tempfail")),
    ("connections_refused", "connections refused before the greeting", "reason",
     ("rules", "busy", "per_ip")),
]
RCPT_REASONS = {"accepted": ("validrcptto", "rcpthosts", "relayclient", "auth"),
                "rejected": ("validrcptto", "rcpthosts", "badmailfrom", "syntax", "maxrcpt")}
SINGLE = ("bytes_received", "tls_sessions")
GAUGES = ("sessions_open", "cdb_entries", "cdb_mtime")


def _layout() -> dict[str, int]:
    slots: dict[str, int] = {}
    for name, _, _, values in COUNTERS:
        for v in values:
            slots[f"{name}.{v}"] = len(slots)
    for result, reasons in RCPT_REASONS.items():
        for r in reasons:
            slots[f"rcpt.{result}.{r}"] = len(slots)
    for name in SINGLE:
        slots[name] = len(slots)
    for i in range(len(BUCKETS) + 1):
        slots[f"duration.{i}"] = len(slots)
    slots["duration.sum"] = len(slots)
    for name in GAUGES:
        slots[name] = len(slots)
    return slots


SLOTS = _layout()
WIDTH = len(SLOTS)
FIRST_GAUGE = SLOTS[GAUGES[0]]
# the session core's count names -> slots
FROM_SESSION = {"tls": "tls_sessions", "bytes": "bytes_received",
                "auth.ok": "auth.ok", "auth.failed": "auth.failed",
                "auth.tempfail": "auth.tempfail",
                "hangup.invalid_limit": "hangups.invalid_limit",
                "hangup.auth_failures": "hangups.auth_failures",
                "message.queued": "messages.queued", "message.rejected": "messages.rejected",
                "message.tempfail": "messages.tempfail"}


class Metrics:
    def __init__(self, workers: int):
        self.workers = workers
        import multiprocessing
        if workers > 1:
            self.rows: Any = multiprocessing.RawArray("d", workers * WIDTH)
        else:
            self.rows = [0.0] * WIDTH
        # counters of dead workers: shared, since /metrics may be served by a process
        # other than the supervisor that folds them in
        self.retired: Any = multiprocessing.RawArray("d", WIDTH) if workers > 1 \
            else [0.0] * WIDTH
        self.row = 0

    def add(self, slot: str, n: float = 1.0) -> None:
        self.rows[self.row * WIDTH + SLOTS[slot]] += n

    def set(self, slot: str, value: float) -> None:
        self.rows[self.row * WIDTH + SLOTS[slot]] = value

    def session_ended(self, counts: dict[str, int], end: str, seconds: float) -> None:
        base = self.row * WIDTH
        rows = self.rows
        for what, n in counts.items():
            slot = SLOTS.get(FROM_SESSION.get(what, what))
            if slot is not None:
                rows[base + slot] += n
        rows[base + SLOTS["sessions." + end]] += 1
        i = next((i for i, b in enumerate(BUCKETS) if seconds <= b), len(BUCKETS))
        rows[base + SLOTS[f"duration.{i}"]] += 1
        rows[base + SLOTS["duration.sum"]] += seconds

    def retire(self, row: int) -> None:
        """The worker of ``row`` died: keep its counters, drop its gauges."""
        base = row * WIDTH
        for i in range(WIDTH):
            if i < FIRST_GAUGE:
                self.retired[i] += self.rows[base + i]
            self.rows[base + i] = 0.0

    # ---- exposition (prometheus-client)
    def totals(self) -> list[float]:
        out = list(self.retired)
        for r in range(self.workers):
            base = r * WIDTH
            for i in range(FIRST_GAUGE):
                out[i] += self.rows[base + i]
        return out

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily)
        t = self.totals()
        p = "validrcptto_smtpd_"
        for name, text, label, values in COUNTERS:
            fam = CounterMetricFamily(p + name, text, labels=[label])
            for v in values:
                fam.add_metric([v], t[SLOTS[f"{name}.{v}"]])
            yield fam
        fam = CounterMetricFamily(p + "rcpt", "RCPT commands by answer and reason",
                                  labels=["result", "reason"])
        for result, reasons in RCPT_REASONS.items():
            for r in reasons:
                fam.add_metric([result, r], t[SLOTS[f"rcpt.{result}.{r}"]])
        yield fam
        yield CounterMetricFamily(p + "bytes_received", "message bytes received",
                                  value=t[SLOTS["bytes_received"]])
        yield CounterMetricFamily(p + "tls_sessions", "STARTTLS handshakes completed",
                                  value=t[SLOTS["tls_sessions"]])
        buckets, acc = [], 0.0
        for i, bound in enumerate(list(BUCKETS) + [float("inf")]):
            acc += t[SLOTS[f"duration.{i}"]]
            buckets.append(("+Inf" if bound == float("inf") else f"{bound:g}", acc))
        yield HistogramMetricFamily(p + "session_duration_seconds", "SMTP session length",
                                    buckets=buckets, sum_value=t[SLOTS["duration.sum"]])
        rows = [[self.rows[r * WIDTH + SLOTS[g]] for g in GAUGES] for r in range(self.workers)]
        yield GaugeMetricFamily(p + "sessions_open", "sessions open now",
                                value=sum(r[0] for r in rows))
        newest = max(rows, key=lambda r: r[2])
        yield GaugeMetricFamily("validrcptto_cdb_entries",
                                "keys in the validrcptto.cdb snapshot in use", value=newest[1])
        age = time.time() - newest[2] if newest[2] else 0.0
        yield GaugeMetricFamily("validrcptto_cdb_snapshot_age_seconds",
                                "seconds since the cdb in use was written", value=age)


def bind(listen: str):
    """The /metrics socket, bound while we may still bind (before --user)."""
    import socket
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    sock.listen(16)
    return sock


def http_server(sock, collector: Any = None):
    """An HTTP server for /metrics (prometheus-client's handler and a registry of our
    own, ``.RequestHandlerClass.registry``) on ``sock``; call its ``serve_forever`` from
    a thread, or from a process of its own when the caller forks (the supervisor of
    several workers must not have threads)."""
    import http.server

    from prometheus_client.exposition import MetricsHandler
    from prometheus_client.registry import CollectorRegistry
    registry = CollectorRegistry(auto_describe=False)
    if collector is not None:
        registry.register(collector)      # a collector: anything with collect()

    class Handler(MetricsHandler.factory(registry)):  # type: ignore[misc]
        def log_message(self, format: str, *args: Any) -> None:
            pass                    # no line per scrape

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
    httpd = Server(sock.getsockname()[:2], Handler, bind_and_activate=False)
    httpd.socket.close()
    httpd.socket = sock
    return httpd


def server(metrics: Metrics, sock):
    return http_server(sock, metrics)
