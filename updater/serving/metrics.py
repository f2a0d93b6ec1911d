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
from typing import TYPE_CHECKING, Any

from ..limits import MAX_SCRAPES, SCRAPE_TIMEOUT, TEXTFILE_LOCK_WAIT
from ..smtp.replies import COUNTED, Acceptance, Refusal

if TYPE_CHECKING:                 # the tcpserver front end imports this per connection
    import http.server
    import socket

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
     ("rules", "busy", "per_ip", "harvest")),
]
# the RCPT counters come from the session's one funnel: every acceptance and refusal
RCPT_REASONS = {"accepted": tuple(a.value for a in Acceptance),
                "rejected": tuple(dict.fromkeys(r.reason for r in Refusal))}
# the counters without labels: name -> help
SINGLE = {"bytes_received": "message bytes received",
          "tls_sessions": "STARTTLS handshakes completed",
          "rcpt_tarpitted": "refused RCPT commands answered late (VALIDRCPTTO_TARPIT)",
          "textfile_drops": "sessions METRICS_TEXTFILE could not add (its lock was held "
                            "too long)",
          "harvesters_held": "client addresses held back by --harvest-limit (each time "
                             "one reaches it)"}
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
                "rcpt.tarpitted": "rcpt_tarpitted",
                "auth.ok": "auth.ok", "auth.failed": "auth.failed",
                "auth.tempfail": "auth.tempfail",
                "hangup.invalid_limit": "hangups.invalid_limit",
                "hangup.auth_failures": "hangups.auth_failures",
                "message.queued": "messages.queued", "message.rejected": "messages.rejected",
                "message.tempfail": "messages.tempfail"}


# every name a session may count has its slot (checked when this module loads: a name
# added to the session without one is an import error in every test, never a lost count)
_UNSLOTTED = sorted(n for n in COUNTED if FROM_SESSION.get(n, n) not in SLOTS)
if _UNSLOTTED:
    raise ImportError(f"metrics: no slot for the session's counts {_UNSLOTTED}")


class Metrics:
    def __init__(self, workers: int):
        self.workers = workers
        self.rows: Any = [0.0] * WIDTH
        self.retired: Any = [0.0] * WIDTH
        if workers > 1:
            import multiprocessing
            self.rows = multiprocessing.RawArray("d", workers * WIDTH)
            # counters of dead workers: shared, since /metrics may be served by a
            # process other than the supervisor that folds them in
            self.retired = multiprocessing.RawArray("d", WIDTH)
        self.row = 0

    def add(self, slot: str, n: float = 1.0) -> None:
        self.rows[self.row * WIDTH + SLOTS[slot]] += n

    def set(self, slot: str, value: float) -> None:
        self.rows[self.row * WIDTH + SLOTS[slot]] = value

    def session_ended(self, counts: dict[str, int], end: str, seconds: float) -> None:
        base = self.row * WIDTH
        rows = self.rows
        for what, n in counts.items():
            rows[base + SLOTS[FROM_SESSION.get(what, what)]] += n
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

    # ---- exposition
    def totals(self) -> list[float]:
        out = list(self.retired)
        for r in range(self.workers):
            base = r * WIDTH
            for i in range(FIRST_GAUGE):
                out[i] += self.rows[base + i]
        return out

    def gauges(self) -> tuple[float, float, float]:
        """(open sessions, cdb entries, cdb mtime) of the newest snapshot in use."""
        rows = [[self.rows[r * WIDTH + SLOTS[g]] for g in GAUGES] for r in range(self.workers)]
        newest = max(rows, key=lambda r: r[2])
        return sum(r[0] for r in rows), newest[1], newest[2]

    def collect(self) -> Iterator[Any]:
        """prometheus-client's collector interface."""
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )
        for name, kind, text, labels, samples in families(self.totals(), self.gauges()):
            if kind == "histogram":
                buckets = [(le, v) for (le,), v in samples[:-1]]
                yield HistogramMetricFamily(name, text, buckets=buckets,
                                            sum_value=samples[-1][1])
                continue
            fam = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
                name, text, labels=labels)
            for values, value in samples:
                fam.add_metric(list(values), value)
            yield fam


# (name, kind, help, label names, [(label values, value)])
Family = tuple[str, str, str, list[str], list[tuple[tuple[str, ...], float]]]


def families(t: list[float], gauges: tuple[float, float, float]) -> list[Family]:
    """Every metric as (name, kind, help, label names, [(label values, value)]); a
    histogram's samples are its cumulative buckets by ``le``, then ("sum",) and the sum."""
    p = "validrcptto_smtpd_"
    out: list[Family] = []
    for name, text, label, values in COUNTERS:
        out.append((p + name, "counter", text, [label],
                    [((v,), t[SLOTS[f"{name}.{v}"]]) for v in values]))
    out.append((p + "rcpt", "counter", "RCPT commands by answer and reason",
                ["result", "reason"],
                [((result, r), t[SLOTS[f"rcpt.{result}.{r}"]])
                 for result, reasons in RCPT_REASONS.items() for r in reasons]))
    out += [(p + name, "counter", text, [], [((), t[SLOTS[name]])])
            for name, text in SINGLE.items()]
    samples: list[tuple[tuple[str, ...], float]] = []
    acc = 0.0
    for i, bound in enumerate(list(BUCKETS) + [float("inf")]):
        acc += t[SLOTS[f"duration.{i}"]]
        samples.append((("+Inf" if bound == float("inf") else f"{bound:g}",), acc))
    samples.append((("sum",), t[SLOTS["duration.sum"]]))
    out.append((p + "session_duration_seconds", "histogram", "SMTP session length", ["le"],
                samples))
    open_, entries, mtime = gauges
    out.append((p + "sessions_open", "gauge", "sessions open now", [], [((), open_)]))
    return out + cdb_gauges(entries, mtime)


def cdb_gauges(entries: float, mtime: float) -> list[Family]:
    """The cdb snapshot a server uses, the same two gauges for both servers."""
    return [("validrcptto_cdb_entries", "gauge", "keys in the validrcptto.cdb snapshot in use",
             [], [((), entries)]),
            ("validrcptto_cdb_snapshot_age_seconds", "gauge",
             "seconds since the cdb in use was written", [],
             [((), time.time() - mtime if mtime else 0.0)])]


def text(fams: list[Family]) -> str:
    """The Prometheus text format, written here rather than by prometheus-client: the
    tcpserver front end runs once per connection and cannot pay its import."""
    lines = []
    for name, kind, help_, labels, samples in fams:
        base = name + ("_total" if kind == "counter" else "")
        lines += [f"# HELP {base} {help_}", f"# TYPE {base} {kind}"]
        for values, value in samples:
            if kind == "histogram":
                if values == ("sum",):
                    lines.append(f"{name}_sum {value!r}")
                    lines.append(f"{name}_count {samples[-2][1]!r}")
                else:
                    lines.append(f'{name}_bucket{{le="{values[0]}"}} {value!r}')
                continue
            tags = ",".join(f'{k}="{v}"' for k, v in zip(labels, values))
            lines.append(f"{base}{{{tags}}} {value!r}" if tags else f"{base} {value!r}")
    return "\n".join(lines) + "\n"


def cdb_header(path: str) -> tuple[int, float]:
    """(entries, mtime) of a cdb file from its header; (0, 0.0) when unreadable."""
    import os
    import struct
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return 0, 0.0
    try:
        head = os.pread(fd, 2048, 0)
        mtime = os.fstat(fd).st_mtime
    except OSError:
        return 0, 0.0
    finally:
        os.close(fd)
    if len(head) < 2048:
        return 0, mtime
    return sum(slots for _, slots in struct.iter_unpack("<LL", head)) // 2, mtime




def _own_file(path: str, flags: int) -> int:
    """Open a file of ours for writing: not through a symlink, a regular file of our
    uid with one link (a planted hard link is refused, never written through), made
    0600 (an older version's 0644 file is ours: its mode is set on the descriptor)."""
    import os
    import stat
    fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                 0o600)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
        os.close(fd)
        raise OSError(1, "not a regular file of ours with one link: refusing to write it",
                      path)
    if st.st_mode & 0o077:
        os.fchmod(fd, 0o600)
    return fd


def _lock_or_drop(fd: int, path: str) -> None:
    """The data file's lock within TEXTFILE_LOCK_WAIT seconds; else the session is counted in
    ``path``.drops and OSError says it was not added."""
    import fcntl
    import os
    import time
    deadline = time.monotonic() + TEXTFILE_LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                drop = _own_file(path + ".drops", os.O_WRONLY | os.O_APPEND)
                try:
                    os.write(drop, b"x")
                finally:
                    os.close(drop)
                raise OSError(11, f"lock held for more than {TEXTFILE_LOCK_WAIT:g}s: this "
                                  "session was not counted (textfile_drops)") from None
            time.sleep(0.01)


def accumulate(path: str, counts: dict[str, int], end: str, seconds: float,
               cdb: tuple[int, float]) -> str | None:
    """tcpserver mode: add one session to the totals kept in ``path``.data (ours only:
    ``_own_file``) and rewrite the textfile ``path`` (a temporary file and a rename)
    for node-exporter's textfile collector.  The lock is waited for TEXTFILE_LOCK_WAIT seconds
    at most: past that the session is not added, only counted in ``path``.drops (added
    to ``textfile_drops`` by the next session that gets the lock), and OSError says so.
    Returns a line for the log when the totals were corrupt and started over."""
    import math
    import os
    import struct
    import tempfile
    fd = _own_file(path + ".data", os.O_RDWR)
    note = None
    try:
        _lock_or_drop(fd, path)
        raw = os.pread(fd, WIDTH * 8, 0)
        m = Metrics(1)
        if len(raw) == WIDTH * 8:
            rows = list(struct.unpack(f"<{WIDTH}d", raw))
            if all(math.isfinite(x) and x >= 0 for x in rows):
                m.rows = rows
            else:
                note = "the totals were corrupt (NaN, infinite or negative): starting over"
        elif raw:
            note = "the totals were of another size: starting over"
        m.session_ended(counts, end, seconds)
        try:
            drop = _own_file(path + ".drops", os.O_RDWR)
        except OSError:
            drop = -1
        if drop >= 0:
            try:
                m.add("textfile_drops", float(os.fstat(drop).st_size))
                os.ftruncate(drop, 0)
            finally:
                os.close(drop)
        m.set("sessions_open", 0.0)
        m.set("cdb_entries", float(cdb[0]))
        m.set("cdb_mtime", cdb[1])
        os.pwrite(fd, struct.pack(f"<{WIDTH}d", *m.rows), 0)
        directory, base = os.path.split(os.path.abspath(path))
        tfd, tmp = tempfile.mkstemp(prefix=f".{base}.", dir=directory)
        try:
            with os.fdopen(tfd, "w") as f:
                os.fchmod(f.fileno(), 0o644)
                f.write(text(families(m.totals(), m.gauges())))
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    finally:
        os.close(fd)
    return note




def bind(listen: str) -> socket.socket:
    """The /metrics socket, bound while we may still bind (before --user)."""
    from .netsock import listen_tcp
    host, _, port = listen.rpartition(":")
    return listen_tcp(host.strip("[]") or "0.0.0.0", int(port), 16, blocking=True)


def http_server(sock: socket.socket, collector: Any = None) -> http.server.ThreadingHTTPServer:
    """An HTTP server for /metrics (prometheus-client's handler and a registry of our
    own, ``.RequestHandlerClass.registry``) on ``sock``; call its ``serve_forever`` from
    a thread, or from a process of its own when the caller forks (the supervisor of
    several workers must not have threads)."""
    import http.server
    import threading

    from prometheus_client.exposition import MetricsHandler
    from prometheus_client.registry import CollectorRegistry
    registry = CollectorRegistry(auto_describe=False)
    if collector is not None:
        registry.register(collector)      # a collector: anything with collect()

    class Handler(MetricsHandler.factory(registry)):  # type: ignore[misc]
        timeout = SCRAPE_TIMEOUT    # every read and write of a scrape

        def do_GET(self) -> None:
            if self.path.partition("?")[0] != "/metrics":
                self.send_error(404)
                return
            super().do_GET()

        def log_message(self, format: str, *args: Any) -> None:
            pass                    # no line per scrape

    class Server(http.server.ThreadingHTTPServer):
        """At most MAX_SCRAPES connections served at once (a thread each); one more is
        closed as soon as it is accepted, so /metrics never holds more than a few
        descriptors of the service's, however many clients connect and wait."""
        daemon_threads = True
        slots = threading.BoundedSemaphore(MAX_SCRAPES)

        def process_request(self, request: Any, client_address: Any) -> None:
            if not self.slots.acquire(blocking=False):
                self.shutdown_request(request)
                return
            try:
                super().process_request(request, client_address)
            except BaseException:
                self.slots.release()
                raise

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            try:
                super().process_request_thread(request, client_address)
            finally:
                self.slots.release()
    httpd = Server(sock.getsockname()[:2], Handler, bind_and_activate=False)
    httpd.socket.close()
    httpd.socket = sock
    return httpd


def server(metrics: Metrics, sock: socket.socket) -> http.server.ThreadingHTTPServer:
    return http_server(sock, metrics)
