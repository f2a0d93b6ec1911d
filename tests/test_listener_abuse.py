"""The newer listeners under the attacks the SMTP server already holds: validrcptto-
policyd (pipelining floods, trickling clients, the unix socket's path), /metrics (idle
connections, other paths), METRICS_TEXTFILE (another uid, a held lock, a planted hard
link, corrupt totals) and `report` (a FIFO, a device, a huge line)."""

from __future__ import annotations

import fcntl
import os
import resource
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest

from helpers.net import free_port, wait_port
from helpers.tools import CI, need, script
from helpers.wait import wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0 and not CI,
                                reason="switches to other uids and chowns sockets: run as root")
REQUEST = b"request=smtpd_access_policy\nprotocol_state=RCPT\nrecipient=nobody@example.com\n\n"


class Policyd:
    def __init__(self, qdir: Path, *args: str, listen: str | None = None,
                 nofile: int | None = None):
        self.port = free_port()
        self.lines: list[str] = []

        def limit():
            if nofile:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        self.proc = subprocess.Popen(
            [script("validrcptto-policyd"), "--listen", listen or f"127.0.0.1:{self.port}",
             "--qmail-dir", str(qdir), *args], stderr=subprocess.PIPE, text=True,
            preexec_fn=limit)
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True).start()

    def started(self) -> Policyd:
        wait_for(lambda: any("listening on" in x for x in self.lines) or
                 self.proc.poll() is not None, 15, "policyd listening")
        assert self.proc.poll() is None, self.lines
        return self

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(20)

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/task"))

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))


def ask(port: int) -> tuple[bytes, float]:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(REQUEST)
        buf = b""
        while not buf.endswith(b"\n\n"):
            chunk = s.recv(4096)
            assert chunk
            buf += chunk
    return buf, time.monotonic() - started


def test_forty_pipelining_clients_do_not_starve_a_normal_request(qdir):
    """40 clients pipeline requests without reading the answers: a normal request is
    still answered quickly, the log stays bounded, the server's memory bounded, and
    clients that went away cost nothing more."""
    pd = Policyd(qdir, "--verbose", "1").started()
    rss = lambda: int(next(x for x in open(f"/proc/{pd.proc.pid}/status")
                           if x.startswith("VmRSS:")).split()[1])
    stop = threading.Event()
    floods = []

    def flood() -> None:
        s = socket.create_connection(("127.0.0.1", pd.port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        floods.append(s)
        block = REQUEST * 200
        s.setblocking(False)
        while not stop.is_set():
            try:
                s.send(block)
            except BlockingIOError:
                time.sleep(0.01)
            except OSError:
                return
    try:
        before = rss()
        workers = [threading.Thread(target=flood, daemon=True) for _ in range(40)]
        for w in workers:
            w.start()
        time.sleep(2)
        waits = []
        for _ in range(10):
            answer, took = ask(pd.port)
            assert answer.startswith(b"action=REJECT"), answer
            waits.append(took)
            time.sleep(0.2)
        waits.sort()
        assert waits[5] < 1.0, waits               # the goal is 100 ms; see RESULTS
        assert rss() - before < 64 * 1024, (before, rss())
        stop.set()
        for s in floods:
            s.close()
        time.sleep(2)
        assert pd.proc.poll() is None
        assert ask(pd.port)[0].startswith(b"action=REJECT")
        lines = len(pd.lines)
        assert lines < 40 * 100, lines              # bounded: at most 100 a second
        assert any("more log lines in the last second left out" in x for x in pd.lines)
        assert not any("socket.send() raised" in x for x in pd.lines)
    finally:
        stop.set()
        assert pd.stop() == 0


def test_a_trickling_client_is_closed_by_the_request_deadline(qdir):
    pd = Policyd(qdir, "--request-timeout", "2", "--idle-timeout", "600").started()
    try:
        s = socket.create_connection(("127.0.0.1", pd.port), timeout=10)
        started = time.monotonic()
        closed = False
        for byte in REQUEST[:-2]:                   # one byte every half second
            try:
                s.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.5)
            if time.monotonic() - started > 8:
                break
        if not closed:
            s.settimeout(5)
            assert s.recv(100) == b""               # closed by the server
        assert time.monotonic() - started < 8
        assert any("not complete within 2s of its first byte" in x for x in pd.lines)
        assert ask(pd.port)[0].startswith(b"action=REJECT")
    finally:
        assert pd.stop() == 0


@pytest.mark.parametrize("planted", ["symlink", "dangling", "regular", "directory"])
def test_the_unix_socket_path_is_never_followed_or_replaced(qdir, tmp_path, planted):
    spool = tmp_path / "private"
    spool.mkdir()
    path = spool / "validrcptto"
    victim = tmp_path / "victim"
    victim.write_text("root's file\n")
    victim.chmod(0o600)
    if planted == "symlink":
        path.symlink_to(victim)
    elif planted == "dangling":
        path.symlink_to(tmp_path / "nowhere")
    elif planted == "regular":
        path.write_text("x")
    else:
        path.mkdir()
    pd = Policyd(qdir, "--socket-owner", "nobody:nogroup", listen=f"unix:{path}")
    assert pd.proc.wait(15) == 111
    text = "".join(pd.lines)
    assert str(path) in text
    assert {"symlink": "is a symbolic link", "dangling": "dangling",
            "regular": "a regular file", "directory": "a directory"}[planted] in text
    st = victim.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)     # untouched
    assert victim.read_text() == "root's file\n"


def test_the_unix_socket_gets_its_mode_and_owner_and_replaces_a_stale_one(qdir, tmp_path):
    need("setpriv")
    spool = tmp_path / "private"
    spool.mkdir()
    for p in [spool, *spool.parents]:               # other uids must reach the socket
        if p in (Path("/tmp"), Path("/")):
            break
        p.chmod(p.stat().st_mode | 0o711)
    path = spool / "validrcptto"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    pd = Policyd(qdir, "--socket-mode", "0660", "--socket-owner", "nobody:nogroup",
                 listen=f"unix:{path}").started()
    try:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_uid == 65534
        # another uid (nobody, the socket's owner here) can ask; one outside can't
        code = ("import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
                "s.sendall(sys.argv[2].encode()); print(s.recv(100).decode())")
        done = subprocess.run([need("setpriv"), "--reuid", "nobody", "--regid", "nogroup",
                               "--clear-groups", "/usr/bin/python3", "-c", code, str(path),
                               REQUEST.decode()], capture_output=True, text=True, timeout=30)
        assert done.stdout.startswith("action=REJECT"), done.stderr
        done = subprocess.run([need("setpriv"), "--reuid", "daemon", "--regid", "daemon",
                               "--clear-groups", "/usr/bin/python3", "-c", code, str(path),
                               REQUEST.decode()], capture_output=True, text=True, timeout=30)
        assert "Permission denied" in done.stderr
    finally:
        assert pd.stop() == 0


def test_metrics_bounded_under_idle_connections_and_ulimit(qdir):
    """1,000 idle half-sent requests to /metrics: a few threads at most, every idle
    connection dropped within seconds; under `ulimit -n 256`, 300 idle /metrics
    connections leave the policy service answering; other paths get 404."""
    mport = free_port()
    pd = Policyd(qdir, "--metrics", f"127.0.0.1:{mport}", nofile=256).started()
    try:
        base = pd.threads()
        idle = []
        for _ in range(300):
            try:
                s = socket.create_connection(("127.0.0.1", mport), timeout=5)
                s.sendall(b"GET /metrics HTTP/1.1\r\n")
                idle.append(s)
            except OSError:
                pass
        time.sleep(1)
        assert pd.threads() <= base + 4 + 1, pd.threads()
        assert pd.fds() < 100, pd.fds()
        assert ask(pd.port)[0].startswith(b"action=REJECT")
        for s in idle:
            s.close()
        time.sleep(6)                               # the scrape timeout
        assert pd.threads() <= base + 1
        import urllib.error
        import urllib.request
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{mport}/other", timeout=10)
        assert err.value.code == 404
        body = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read()
        assert b"validrcptto_policyd_requests" in body
        assert pd.proc.poll() is None
    finally:
        assert pd.stop() == 0


def session(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        f = s.makefile("rwb")
        f.readline()
        f.write(b"HELO x\r\nQUIT\r\n")
        f.flush()
        while f.readline():
            pass


def test_the_metrics_textfile_cannot_be_held_or_planted(tmp_path: Path):
    from helpers.smtp_client import smtp_tree
    need("setpriv")
    env = smtp_tree(tmp_path)
    textfile = tmp_path / "t.prom"
    data = Path(str(textfile) + ".data")
    port = free_port()
    server = subprocess.Popen([need("tcpserver"), "-HR", "-c", "2", "127.0.0.1", str(port),
                               script("validrcptto-smtpd")],
                              env={**env, "METRICS_TEXTFILE": str(textfile)},
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(server.stderr), daemon=True).start()
    try:
        wait_port(port, server, 15)
        session(port)
        wait_for(data.exists, 10, "the data file")
        st = data.stat()
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
        # a lock held for ever (by the same uid here: others cannot even open it)
        holder = os.open(data, os.O_RDWR)
        fcntl.flock(holder, fcntl.LOCK_EX)
        started = time.monotonic()
        for _ in range(4):                          # with -c 2 they would pile up
            session(port)
        assert time.monotonic() - started < 10
        wait_for(lambda: sum("was not counted" in x for x in lines) >= 4, 10, "drops logged")
        os.close(holder)
        dropped = sum("was not counted" in x for x in lines)

        def counted() -> bool:                      # the next session adds the drops
            session(port)
            time.sleep(0.5)
            return f"validrcptto_smtpd_textfile_drops_total {float(dropped)}" in \
                textfile.read_text()
        wait_for(counted, 30, f"the {dropped} drops counted")
        # corrupt totals: started over, with one line
        with open(data, "r+b") as f:
            f.write(b"\xff" * 16)                   # NaNs
        session(port)
        wait_for(lambda: any("corrupt" in x and "starting over" in x for x in lines), 10,
                 "the corrupt totals noticed")
        # a planted hard link: refused, the linked file untouched
        other = tmp_path / "other"
        other.write_bytes(b"precious")
        data.unlink()
        os.link(other, data)
        session(port)
        wait_for(lambda: any("refusing to write it" in x for x in lines), 10, "refused")
        assert other.read_bytes() == b"precious"
    finally:
        os.killpg(server.pid, 15)
        server.wait(10)


def test_report_reads_only_regular_files_and_bounded_lines(tmp_path: Path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.write(b"@400000006b0000000000000 validrcptto-smtpd[1]: ok 1 a b\n")
        f.write(b"x" * (50 << 20) + b"\n")           # one 50 MB line
        f.write(b"validrcptto-smtpd[1]: validrcptto [1.2.3.4] not found: a@b.example\n")
    limit = [need("prlimit"), "--as=600000000"]     # 600 MB of address space at most
    for path, want in ((fifo, "not a regular file"), ("/dev/zero", "not a regular file")):
        done = subprocess.run(limit + [script("qmail-updater"), "report", str(path)],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 1 and want in done.stderr, done.stderr
        assert len(done.stderr.splitlines()) == 1
    done = subprocess.run(limit + [script("qmail-updater"), "report", str(big)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "lines skipped:        1" in done.stdout
    assert "recipients refused:   1" in done.stdout
