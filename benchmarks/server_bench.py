"""SMTP server benchmarks: validrcptto-smtpd --listen and under tcpserver, against the C
qmail-smtpd (netqmail 1.06, built from ../shared/reference) under tcpserver.

One load client for all (benchmarks/smtpload.c, compiled here: threads in C, so it is
not the bottleneck; its own CPU is reported).  A session: connect, EHLO, MAIL, 5 RCPT
(3 listed, 2 not), QUIT; optionally DATA with a 10 kB body into a qmail-queue stand-in
written in C.  Server CPU is read from /proc (the server and its children).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

QUEUE_C = r"""
#include <unistd.h>
int main(void) { char b[65536];
  while (read(0, b, sizeof b) > 0); while (read(1, b, sizeof b) > 0); return 0; }
"""
KEYS = [b"joe@example.com", b"x@example.net", b"joe-list-default@example.com", b"postmaster"]


def compile_tools(work: Path) -> tuple[str, str] | None:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        return None
    load = work / "smtpload"
    subprocess.run(
        [gcc, "-O2", "-pthread", "-o", str(load), str(HERE / "smtpload.c"), "-lssl", "-lcrypto"],
        check=True,
    )
    (work / "qq.c").write_text(QUEUE_C)
    qq = work / "qmail-queue"
    subprocess.run([gcc, "-O2", "-o", str(qq), str(work / "qq.c")], check=True)
    return str(load), str(qq)


# the two recipients smtpload's sessions send that the list does not have
UNLISTED = [b"nobody1@example.com", b"nobody2@example.com"]


def qmail_tree(qmail: Path, qq: str, extra_keys: int = 10000, listed: bool = False) -> None:
    import cdbx

    (qmail / "control").mkdir(parents=True, exist_ok=True)
    (qmail / "bin").mkdir(exist_ok=True)
    (qmail / "control/me").write_text("mx.example.com\n")
    (qmail / "control/rcpthosts").write_text("example.com\nexample.net\n")
    for name in ("smtpgreeting", "databytes", "timeoutsmtpd", "badmailfrom", "localiphost"):
        try:
            (qmail / "control" / name).unlink()
        except FileNotFoundError:
            pass
    shutil.copy(qq, qmail / "bin/qmail-queue")
    maker = cdbx.CDB.make(str(qmail / "control/validrcptto.cdb"))
    for k in KEYS + (UNLISTED if listed else []):
        maker.add(k, b"")
    for i in range(extra_keys):
        maker.add(b"user%d@example.com" % i, b"")
    maker.commit().close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.recv(100)
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("server did not start")


def tree_pids(pid: int) -> list[int]:
    out = [pid]
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        kids = []
    for k in kids:
        out += tree_pids(int(k))
    return out


def cpu_seconds(pid: int) -> float:
    """CPU of a server: itself, its reaped children, and its live descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in tree_pids(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15]) / tick
    return total


def rss_kb(pid: int) -> int:
    total = 0
    for p in tree_pids(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


class Servers:
    def __init__(self, work: Path, qq: str, reference: str | None, reference_dir: str | None,
                 listed: bool = False):
        self.work, self.reference = work, reference
        self.tcpserver = shutil.which("tcpserver")
        self.ours_dir = work / "qmail"
        qmail_tree(self.ours_dir, qq, listed=listed)
        self.ref_dir = Path(reference_dir) if reference_dir else None
        if self.ref_dir is not None:
            qmail_tree(self.ref_dir, qq, extra_keys=0)
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("VALIDRCPTTO_", "TCP", "RELAYCLIENT", "QMAIL"))
        }
        self.env.update(
            QMAIL_DIR=str(self.ours_dir),
            VALIDRCPTTO_CDB=str(self.ours_dir / "control/validrcptto.cdb"),
        )
        self.smtpd = shutil.which("validrcptto-smtpd") or str(
            Path(sys.executable).parent / "validrcptto-smtpd"
        )

    def start(
        self, kind: str, concurrency: int = 400, extra: tuple[str, ...] = (),
        env: dict[str, str] | None = None
    ) -> tuple[subprocess.Popen, int] | None:
        port = free_port()
        if kind == "listen":
            argv = [
                self.smtpd,
                "--listen",
                f"127.0.0.1:{port}",
                "--workers",
                "0",
                "--max-connections",
                "5000",
                "--max-per-ip",
                "0",
                "--quiet",
                *extra,
            ]
        elif self.tcpserver and (kind == "tcpserver" or (kind == "c" and self.reference)):
            program = self.smtpd if kind == "tcpserver" else self.reference
            argv = [self.tcpserver, "-R", "-H", "-l", "mx.example.com", "-c", str(concurrency),
                    "-b", "1000", "127.0.0.1", str(port), program]
        else:
            return None
        proc = subprocess.Popen(
            argv,
            env={**self.env, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=lambda: _nofile(8192),
        )
        wait_port(port, proc)
        time.sleep(0.3)
        return proc, port

    @staticmethod
    def stop(proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _nofile(n: int) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, n), max(hard, n)))


def load(
    client: str, port: int, concurrency: int, seconds: float, databytes: int, tls: bool = False
) -> dict:
    done = subprocess.run(
        [client, "127.0.0.1", str(port), str(concurrency), str(seconds), str(databytes)]
        + (["tls"] if tls else []),
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=lambda: _nofile(8192),
    )
    n, errors, elapsed, p50, p99, cpu = done.stdout.split()
    return dict(
        n=int(n),
        errors=int(errors),
        rate=int(n) / float(elapsed),
        p50=float(p50),
        p99=float(p99),
        client_cpu=float(cpu),
    )


def measure(
    servers: Servers,
    kind: str,
    client: str,
    concurrency: int,
    seconds: float,
    databytes: int = 0,
    tls: bool = False,
    metrics: bool = False,
    extra: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
) -> dict | None:
    mport = free_port()
    started = servers.start(
        kind, extra=extra + (("--metrics", f"127.0.0.1:{mport}") if metrics else ()), env=env)
    if started is None:
        return None
    proc, port = started
    scraping = [metrics]

    def scrape() -> None:  # as Prometheus would, but every second
        import urllib.request

        while scraping[0]:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read()
            except OSError:
                pass
            time.sleep(1.0)

    if metrics:
        import threading

        threading.Thread(target=scrape, daemon=True).start()
    try:
        load(client, port, min(concurrency, 4), 0.5, databytes, tls)  # warm up
        before = cpu_seconds(proc.pid)
        got = load(client, port, concurrency, seconds, databytes, tls)
        time.sleep(0.3)  # let the last children be reaped
        got["server_cpu"] = (cpu_seconds(proc.pid) - before) / max(got["n"], 1)
        return got
    finally:
        scraping[0] = False
        servers.stop(proc)


def idle_rss(servers: Servers, kind: str, connections: int = 1000, tarpit: int = 0
             ) -> int | None:
    """The server's RSS with ``connections`` open: idle after the greeting, or (with
    ``tarpit`` ms) each waiting for the answer to a refused RCPT."""
    started = servers.start(kind, concurrency=connections + 100,
                            env={"VALIDRCPTTO_TARPIT": str(tarpit)} if tarpit else None)
    if started is None:
        return None
    proc, port = started
    socks = []
    try:
        _nofile(connections + 500)
        for _ in range(connections):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            socks.append(s)
        for s in socks:
            s.recv(100)
            if tarpit:
                s.sendall(b"HELO b\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<nobody1@example.com>\r\n")
        time.sleep(2)
        return rss_kb(proc.pid)
    finally:
        for s in socks:
            s.close()
        servers.stop(proc)


def run(bench, reference: str | None, reference_dir: str | None, seconds: float = 5.0) -> None:
    """Add the server rows to ``bench`` (a run.Bench)."""
    work = Path(tempfile.mkdtemp(prefix="smtp-bench.", dir=bench.root))
    tools = compile_tools(work)
    if tools is None or shutil.which("tcpserver") is None:
        bench.row(
            what="SMTP server benchmarks",
            ours="n/a",
            reference="n/a",
            ratio=None,
            target="needs gcc, tcpserver",
            met=None,
        )
        return
    client, qq = tools
    servers = Servers(work, qq, reference, reference_dir)
    ref_name = "C qmail-smtpd" if reference else "n/a"
    for conc, databytes in ((1, 0), (20, 0), (100, 0), (20, 10240)):
        label = f"c={conc}" + (", 10 kB DATA" if databytes else "")
        ref = measure(servers, "c", client, conc, seconds, databytes)
        for kind, name in (("listen", "--listen"), ("tcpserver", "under tcpserver")):
            ours = measure(servers, kind, client, conc, seconds, databytes)
            ratio = ours["rate"] / ref["rate"] if ref else None
            if kind == "listen" and conc >= 20:
                target = ">= 1.5x" if not databytes else ">= 1.0x"
                met = None if ratio is None else ratio >= (1.5 if not databytes else 1.0)
            else:
                target, met = "", None
            bench.row(
                what=f"sessions/s, {name}, {label} (vs {ref_name})",
                ours=f"{ours['rate']:.0f}",
                reference=f"{ref['rate']:.0f}" if ref else "n/a",
                ratio=ratio,
                target=target,
                met=met,
            )
            p99_met = (
                None if ref is None or kind != "listen" or conc < 20 else ours["p99"] <= ref["p99"]
            )
            bench.row(
                what=f"  p50 / p99 ms, {name}, {label}",
                ours=f"{ours['p50']:.1f} / {ours['p99']:.1f}",
                reference=f"{ref['p50']:.1f} / {ref['p99']:.1f}" if ref else "n/a",
                ratio=None,
                target="p99 <= C" if p99_met is not None else "",
                met=p99_met,
            )
            bench.row(
                what=f"  server CPU per session, {name}, {label}",
                ours=f"{ours['server_cpu'] * 1000:.2f} ms",
                reference=f"{ref['server_cpu'] * 1000:.2f} ms" if ref else "n/a",
                ratio=ours["server_cpu"] / ref["server_cpu"] if ref and ref["server_cpu"] else None,
                target="",
                met=None,
            )
            bench.row(
                what=f"  load client CPU, {name}, {label}",
                ours=f"{ours['client_cpu']:.2f} s",
                reference=f"{ref['client_cpu']:.2f} s" if ref else "n/a",
                ratio=None,
                target="",
                met=None,
            )
    # --metrics, scraped every second, against the same server without it
    plain = measure(servers, "listen", client, 20, seconds)
    scraped = measure(servers, "listen", client, 20, seconds, metrics=True)
    ratio = scraped["rate"] / plain["rate"]
    bench.row(
        what="sessions/s, --listen, c=20, --metrics scraped every 1 s (vs without)",
        ours=f"{scraped['rate']:.0f}",
        reference=f"{plain['rate']:.0f}",
        ratio=ratio,
        target=">= 0.95x",
        met=ratio >= 0.95,
    )
    # STARTTLS: the same session after a handshake (a 2048-bit RSA certificate)
    openssl = shutil.which("openssl")
    if openssl:
        d = work / "tls"
        d.mkdir()
        subprocess.run(
            [
                openssl,
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=mx.example.com",
                "-keyout",
                str(d / "k.pem"),
                "-out",
                str(d / "c.pem"),
            ],
            check=True,
            capture_output=True,
        )
        (servers.ours_dir / "control/servercert.pem").write_bytes(
            (d / "c.pem").read_bytes() + (d / "k.pem").read_bytes()
        )
        plain = measure(servers, "listen", client, 20, seconds)
        tls = measure(servers, "listen", client, 20, seconds, tls=True)
        bench.row(
            what="sessions/s, --listen, c=20, STARTTLS (vs the same without TLS)",
            ours=f"{tls['rate']:.0f}",
            reference=f"{plain['rate']:.0f}",
            ratio=tls["rate"] / plain["rate"],
            target="",
            met=None,
        )
        bench.row(
            what="  p50 / p99 ms, --listen, c=20, STARTTLS",
            ours=f"{tls['p50']:.1f} / {tls['p99']:.1f}",
            reference=f"{plain['p50']:.1f} / {plain['p99']:.1f}",
            ratio=None,
            target="",
            met=None,
        )
        (servers.ours_dir / "control/servercert.pem").unlink()
    features(bench, work, qq, client, servers, seconds)
    ours_rss = idle_rss(servers, "listen")
    ref_rss = idle_rss(servers, "c")
    bench.row(
        what="RSS of the whole server, 1,000 idle connections (--listen vs C)",
        ours=f"{ours_rss // 1024} MB",
        reference=f"{ref_rss // 1024} MB" if ref_rss else "n/a",
        ratio=ours_rss / ref_rss if ref_rss else None,
        target="<= 100 MB",
        met=ours_rss <= 100 * 1024,
    )


def features(bench, work: Path, qq: str, client: str, servers: Servers, seconds: float) -> None:
    """What the opt-in defences cost: the tarpit when no recipient is refused (its
    sessions must run as fast as without it), the harvester table counting every
    refusal (a limit never reached), and sessions waiting in the tarpit (each must cost
    no more than an idle one: no thread, no buffer)."""
    listed = Servers(work / "listed", qq, None, None, listed=True)
    plain = measure(listed, "listen", client, 20, seconds)
    tarpit = measure(listed, "listen", client, 20, seconds, env={"VALIDRCPTTO_TARPIT": "1000"})
    ratio = tarpit["rate"] / plain["rate"]
    bench.row(
        what="sessions/s, --listen, c=20, VALIDRCPTTO_TARPIT=1000, nothing refused (vs without)",
        ours=f"{tarpit['rate']:.0f}",
        reference=f"{plain['rate']:.0f}",
        ratio=ratio,
        target=">= 0.95x",
        met=ratio >= 0.95,
    )
    plain = measure(servers, "listen", client, 20, seconds)
    counted = measure(servers, "listen", client, 20, seconds,
                      extra=("--harvest-limit", "1000000000"))
    ratio = counted["rate"] / plain["rate"]
    bench.row(
        what="sessions/s, --listen, c=20, --harvest-limit counting 2 refusals a session "
        "(vs without)",
        ours=f"{counted['rate']:.0f}",
        reference=f"{plain['rate']:.0f}",
        ratio=ratio,
        target=">= 0.95x",
        met=ratio >= 0.95,
    )
    idle = idle_rss(servers, "listen", 200)
    waiting = idle_rss(servers, "listen", 200, tarpit=30000)
    bench.row(
        what="RSS of the whole server, 200 sessions waiting in the tarpit (vs 200 idle)",
        ours=f"{waiting // 1024} MB",
        reference=f"{idle // 1024} MB",
        ratio=waiting / idle,
        target="<= 1.1x",
        met=waiting <= idle * 1.1,
    )
