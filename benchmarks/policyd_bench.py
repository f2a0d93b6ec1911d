"""validrcptto-policyd benchmarks: policy requests per second on one connection and on 20
connections with pipelined requests, the server CPU per request, against Postfix's own
``cdb:`` map lookups (``postmap -q - cdb:FILE``, every key of a batch on stdin: one
process, no network) over the same keys, in the same run."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from server_bench import cpu_seconds, free_port

KEYS = 100_000


def request(address: bytes) -> bytes:
    return b"request=smtpd_access_policy\nprotocol_state=RCPT\nrecipient=" + address + b"\n\n"


def answers(sock: socket.socket, n: int, buf: bytearray) -> None:
    """Read ``n`` answers (each ends in an empty line)."""
    while n:
        end = buf.find(b"\n\n")
        if end == -1:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
            continue
        del buf[: end + 2]
        n -= 1


def run_load(
    port: int, connections: int, batch: int, seconds: float, addresses: list[bytes]
) -> int:
    done = [0] * connections

    def one(i: int) -> None:
        s = socket.create_connection(("127.0.0.1", port))
        buf = bytearray()
        deadline = time.monotonic() + seconds
        k = i
        while time.monotonic() < deadline:
            data = b"".join(request(addresses[(k + j) % len(addresses)]) for j in range(batch))
            s.sendall(data)
            answers(s, batch, buf)
            done[i] += batch
            k += batch
        s.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done)


def run(bench, seconds: float = 5.0) -> None:
    import cdbx

    work = Path(tempfile.mkdtemp(prefix="policyd-bench.", dir=bench.root))
    control = work / "qmail/control"
    control.mkdir(parents=True)
    keys = [b"user%06d@example.com" % i for i in range(KEYS)]
    maker = cdbx.CDB.make(str(control / "validrcptto.cdb"))
    for k in keys:
        maker.add(k, b"")
    maker.commit().close()
    (control / "rcpthosts").write_text("example.com\n")
    asked = [keys[i] if i % 2 else b"nobody%06d@example.com" % i for i in range(0, KEYS, 7)]
    policyd = shutil.which("validrcptto-policyd") or str(
        Path(sys.executable).parent / "validrcptto-policyd"
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            policyd,
            "--listen",
            f"127.0.0.1:{port}",
            "--qmail-dir",
            str(work / "qmail"),
            "--verbose",
            "0",
        ],
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                time.sleep(0.05)
        run_load(port, 1, 1, 0.3, asked)  # warm up
        rows = []
        for conns, batch, label in (
            (1, 1, "one connection, one request at a time"),
            (20, 100, "20 connections, 100 pipelined requests"),
        ):
            before = cpu_seconds(proc.pid)
            started = time.monotonic()
            n = run_load(port, conns, batch, seconds, asked)
            elapsed = time.monotonic() - started
            cpu = (cpu_seconds(proc.pid) - before) / max(n, 1)
            rows.append((label, n / elapsed, cpu))
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    postmap = shutil.which("postmap") or "/usr/sbin/postmap"
    ref_rate = None
    if os.path.exists(postmap):
        src = work / "map"
        src.write_bytes(b"".join(k + b" OK\n" for k in keys))
        made = subprocess.run([postmap, f"cdb:{src}"], capture_output=True)
        if made.returncode == 0:
            query = b"".join(a + b"\n" for a in asked) * 5
            started = time.monotonic()
            subprocess.run([postmap, "-q", "-", f"cdb:{src}"], input=query, capture_output=True)
            ref_rate = len(asked) * 5 / (time.monotonic() - started)
    for label, rate, cpu in rows:
        bench.row(
            what=f"policyd requests/s, {label} (vs postmap -q - cdb:)",
            ours=f"{rate:.0f}",
            reference=f"{ref_rate:.0f}" if ref_rate else "n/a",
            ratio=rate / ref_rate if ref_rate else None,
            target="",
            met=None,
        )
        bench.row(
            what=f"  policyd server CPU per request, {label}",
            ours=f"{cpu * 1e6:.0f} µs",
            reference="",
            ratio=None,
            target="<= 100 µs",
            met=cpu <= 100e-6,
        )
