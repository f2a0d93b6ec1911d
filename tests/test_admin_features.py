"""What hosting admins asked for next (issue 43), used as an admin would: the tarpit
(VALIDRCPTTO_TARPIT) and qmail's own 550 (VALIDRCPTTO_REPLY) set per client in a real
tcprules cdb, on validrcptto-smtpd --listen and under tcpserver's front end, and
validrcptto-policyd's reject action following VALIDRCPTTO_REPLY.  Hundreds of
tarpitted sessions cost what as many idle ones do (no thread, no task)."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest

from helpers.net import free_port, wait_port
from helpers.smtp_client import Client, Server, smtp_tree
from helpers.tools import need, script

NOMAILBOX = b"550 sorry, no mailbox here by that name (#5.1.1)\r\n"
NOTVALID = b"553 sorry, this recipient is not in my validrcptto list (#5.7.1)\r\n"


def rules_cdb(tmp_path: Path, text: str) -> Path:
    src, cdb = tmp_path / "tcp.smtp", tmp_path / "tcp.smtp.cdb"
    src.write_text(text)
    subprocess.run([need("tcprules"), str(cdb), str(cdb) + ".tmp"], stdin=open(src),
                   check=True)
    return cdb


def mail(c: Client) -> None:
    assert c.reply().startswith(b"220 ")
    assert c.cmd("HELO x").startswith(b"250 ")
    assert c.cmd("MAIL FROM:<a@example.org>") == b"250 ok\r\n"


def timed(c: Client, command: str) -> tuple[bytes, float]:
    start = time.monotonic()
    reply = c.cmd(command)
    return reply, time.monotonic() - start


def test_the_pure_session_pauses_before_each_refusal_and_never_before_an_acceptance():
    from updater.smtp import context as P
    from updater.smtp import events as E
    from updater.smtp import session as S
    controls = P.Controls(greeting=b"mx", liphost=b"mx", rcpthosts=frozenset({b"example.com"}),
                          badmailfrom=None, databytes=0, timeout=60)
    s = S.Session(controls, P.Peer(), P.Policy(tarpit=12000, reply550=True, limit=0),
                  validrcptto={b"joe@example.com": b""}.get, clock=lambda: 1000.0)
    s.start()
    s.receive_data(b"HELO x\r\nMAIL FROM:<a@b>\r\n")
    waits = []
    for rcpt in (b"nobody@example.com", b"joe@example.com", b"x@elsewhere.example",
                 b"nobody3@example.com", b"nobody4@example.com"):
        ev = s.receive_data(b"RCPT TO:<" + rcpt + b">\r\n")
        waits.append([e.seconds for e in ev if isinstance(e, E.Pause)])
        replies = [e.data for e in ev if isinstance(e, E.Reply)]
        if rcpt == b"joe@example.com":
            assert replies == [b"250 ok\r\n"]
        elif rcpt.endswith(b"elsewhere.example"):            # rcpthosts: counted, 553 still
            assert replies[0].startswith(b"553 sorry, that domain")
        else:
            assert replies == [NOMAILBOX]
        # the pause comes before the reply it delays
        kinds = [type(e) for e in ev if isinstance(e, (E.Pause, E.Reply))]
        assert kinds == ([E.Reply] if rcpt == b"joe@example.com" else [E.Pause, E.Reply])
    assert waits == [[12.0], [], [24.0], [30.0], [30.0]]      # n x 12 s, capped at 30
    assert s.counts["rcpt.tarpitted"] == 4


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return smtp_tree(tmp_path)


def test_tarpit_and_550_per_client_from_the_rules_on_the_listening_server(env, tmp_path):
    cdb = rules_cdb(tmp_path, '127.0.0.5:allow,VALIDRCPTTO_TARPIT="400",VALIDRCPTTO_REPLY="550"\n'
                              ':allow\n')
    srv = Server(env, "--rules", str(cdb))
    try:
        c = srv.connect("127.0.0.5")
        mail(c)
        first, t1 = timed(c, "RCPT TO:<nobody@example.com>")
        ok, _ = timed(c, "RCPT TO:<joe@example.com>")
        second, t2 = timed(c, "RCPT TO:<nobody2@example.com>")
        assert (first, ok, second) == (NOMAILBOX, b"250 ok\r\n", NOMAILBOX)
        assert t1 >= 0.4 and t2 >= 0.8, (t1, t2)                # n x 400 ms
        # pipelined behind a tarpitted refusal, the next replies keep their order
        c.sock.sendall(b"RCPT TO:<nobody3@example.com>\r\nRCPT TO:<joe@example.com>\r\nQUIT\r\n")
        assert c.reply() == NOMAILBOX and c.reply() == b"250 ok\r\n"
        assert c.reply().startswith(b"221 ")
        c.close()
        plain = srv.connect("127.0.0.6")                       # the default rule: the patch
        mail(plain)
        reply, _ = timed(plain, "RCPT TO:<nobody@example.com>")
        assert reply == NOTVALID
        plain.close()
    finally:
        srv.stop()


def rss_threads(pid: int) -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status"))
    return int(fields["VmRSS"].split()[0]), int(fields["Threads"])


def test_hundreds_tarpitted_at_once_cost_what_idle_sessions_do(env, tmp_path):
    """200 sessions each waiting 20 s for a refused RCPT, against 200 idle ones, on one
    worker: no thread more, and the memory within 1 MiB + 10%; the metric counts them."""
    cdb = rules_cdb(tmp_path, ':allow,VALIDRCPTTO_TARPIT="20000"\n')
    mport = free_port()
    srv = Server(env, "--rules", str(cdb), "--workers", "1", "--max-connections", "1000",
                 "--max-per-ip", "1000", "--metrics", f"127.0.0.1:{mport}")
    n = 200
    clients: list[Client] = []
    try:
        for _ in range(n):                                   # idle, after MAIL
            c = srv.connect()
            mail(c)
            clients.append(c)
        time.sleep(0.5)
        idle = rss_threads(srv.proc.pid)
        for c in clients:
            c.close()
        clients.clear()
        time.sleep(0.5)
        for _ in range(n):
            c = srv.connect()
            mail(c)
            c.sock.sendall(b"RCPT TO:<nobody@example.com>\r\n")    # answered in 20 s
            clients.append(c)
        time.sleep(0.5)
        tarpitted = rss_threads(srv.proc.pid)
        assert tarpitted[1] <= idle[1], (idle, tarpitted)
        assert tarpitted[0] <= idle[0] * 1.1 + 1024, (idle, tarpitted)
        clients[0].sock.settimeout(30)
        assert clients[0].reply() == NOTVALID                 # it does come, in its time
        import urllib.request
        text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read()
        # counted when a session ends: none yet
        assert "validrcptto_smtpd_rcpt_tarpitted_total 0.0" in text.decode()
        for c in clients:
            c.close()
        time.sleep(1)
        text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read()
        assert f"validrcptto_smtpd_rcpt_tarpitted_total {float(n)}" in text.decode()
    finally:
        for c in clients:
            c.close()
        srv.stop()


def test_tarpit_and_550_under_tcpserver(env, tmp_path):
    """The tcpserver front end, with the rules granting the variables per client."""
    cdb = rules_cdb(tmp_path, '127.0.0.1:allow,VALIDRCPTTO_TARPIT="300",'
                              'VALIDRCPTTO_REPLY="550"\n')
    port = free_port()
    proc = subprocess.Popen([need("tcpserver"), "-R", "-H", "-l", "mx", "-x", str(cdb),
                             "127.0.0.1", str(port), script("validrcptto-smtpd")], env=env,
                            stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        c = Client(port)
        mail(c)
        first, t1 = timed(c, "RCPT TO:<nobody@example.com>")
        second, t2 = timed(c, "RCPT TO:<nobody2@example.com>")
        assert (first, second) == (NOMAILBOX, NOMAILBOX) and t1 >= 0.3 and t2 >= 0.6
        assert c.cmd("RCPT TO:<joe@example.com>") == b"250 ok\r\n"
        c.close()
    finally:
        proc.terminate()
        proc.wait(10)


def policyd_answer(port: int, rcpt: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"request=smtpd_access_policy\nprotocol_state=RCPT\nrecipient=" + rcpt +
                     b"\n\n")
        return sock.recv(300)


@pytest.mark.parametrize("reply, extra, expected", [
    ("550", (), b"action=550 5.1.1 sorry, no mailbox here by that name\n\n"),
    ("", (), b"action=REJECT 5.1.1 not in my validrcptto list\n\n"),
    ("550", ("--reject-action", "REJECT mine"), b"action=REJECT mine\n\n")])
def test_policyd_reject_action_follows_validrcptto_reply(env, reply, extra, expected):
    port = free_port()
    proc = subprocess.Popen([script("validrcptto-policyd"), "--listen", f"127.0.0.1:{port}",
                             *extra], env={**env, "VALIDRCPTTO_REPLY": reply},
                            stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc)
        assert policyd_answer(port, b"nobody@example.com") == expected
        assert policyd_answer(port, b"joe@example.com") == b"action=DUNNO\n\n"
    finally:
        proc.terminate()
        proc.wait(10)
    bad = subprocess.run([script("validrcptto-policyd"), "--listen", "127.0.0.1:1"],
                         env={**env, "VALIDRCPTTO_REPLY": "551"}, capture_output=True,
                         text=True, timeout=30)
    assert bad.returncode == 2 and "expected 550 or 553, got '551'" in bad.stderr


def harvest_session(srv: Server, source: str, n: int) -> bytes:
    """A session from ``source`` that asks for ``n`` unknown recipients; the last reply."""
    c = srv.connect(source)
    try:
        mail(c)
        reply = b""
        for i in range(n):
            reply = c.cmd(f"RCPT TO:<nobody{i}@example.com>")
            if reply.startswith(b"421 "):
                break
        return reply
    finally:
        c.close()


def greeting(srv: Server, source: str) -> bytes:
    c = srv.connect(source)
    try:
        return c.reply()
    finally:
        c.close()


def test_a_harvester_that_reconnects_is_held_back_across_workers_and_their_deaths(env,
                                                                                 tmp_path):
    """--harvest-limit 5 with VALIDRCPTTO_LIMIT=3: the client hung up on after three
    unknown recipients comes back, is refused twice more, and from then on its new
    sessions get 421 at the greeting, whichever of the two workers takes them, also
    after one is killed; another address is served; a RELAYCLIENT client is never
    counted; the metrics say so."""
    import os
    import signal
    import urllib.request

    from helpers.smtp_client import children
    from helpers.wait import wait_for
    cdb = rules_cdb(tmp_path, '127.0.0.4:allow,RELAYCLIENT=""\n:allow\n')
    mport = free_port()
    srv = Server({**env, "VALIDRCPTTO_LIMIT": "3"}, "--workers", "2", "--harvest-limit", "5",
                 "--harvest-window", "600", "--rules", str(cdb), "--metrics",
                 f"127.0.0.1:{mport}")
    toomany = b"421 too many invalid addresses, goodbye (#4.3.0)\r\n"
    try:
        assert harvest_session(srv, "127.0.0.2", 5) == toomany          # 3: hung up on
        assert greeting(srv, "127.0.0.2").startswith(b"220 ")
        assert harvest_session(srv, "127.0.0.2", 2) == NOTVALID          # 5 in all
        time.sleep(0.3)                                                  # (counted at its end)
        for _ in range(6):                        # the kernel spreads them over the workers
            assert greeting(srv, "127.0.0.2") == toomany
        assert greeting(srv, "127.0.0.3").startswith(b"220 ")
        assert harvest_session(srv, "127.0.0.4", 8) == b"250 ok\r\n"     # relayed, never held
        assert greeting(srv, "127.0.0.4").startswith(b"220 ")
        workers = [p for p, _ in children(srv.proc.pid)]
        os.kill(workers[0], signal.SIGKILL)
        wait_for(lambda: len(children(srv.proc.pid)) >= 3 and workers[0] not in
                 [p for p, _ in children(srv.proc.pid)], 10, "the worker replaced")
        time.sleep(0.6)
        for _ in range(6):
            assert greeting(srv, "127.0.0.2") == toomany
        assert srv.log().count("holding back 127.0.0.2: 5 or more recipients refused within "
                               "600s: 421 until that has passed") == 1
        text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read()
        assert b"validrcptto_smtpd_harvesters_held_total 1.0" in text, text
        refused = [line for line in text.splitlines()
                   if line.startswith(b'validrcptto_smtpd_connections_refused_total{reason="'
                                      b'harvest"}')]
        assert refused and float(refused[0].split()[-1]) >= 12, text
    finally:
        assert srv.stop() == 0


def test_the_harvest_table_is_bounded_and_forgets_after_its_window():
    from updater.serving.anvil import Harvest

    class Small(Harvest):
        SLOTS, WAYS = 16, 4
    h = Small(limit=2, window=600.0, workers=1)
    assert h.refused("192.0.2.1", 1, 1000.0) is False
    assert h.refused("192.0.2.1", 1, 1001.0) is True and h.held("192.0.2.1", 1001.0)
    assert h.refused("192.0.2.1", 5, 1002.0) is False          # (held once, counted once)
    assert not h.held("192.0.2.1", 1600.0)                       # the window has passed
    assert not h.held("192.0.2.9", 1001.0)
    # 100 addresses through 16 slots: the table never grows, the latest are kept
    for i in range(100):
        h.refused(f"198.51.100.{i}", 2, 2000.0 + i)
    assert len(h.table) == 4 * 16
    # the model: each bucket keeps the 4 addresses last seen among those hashing to it
    buckets: dict[int, list[str]] = {}
    for i in range(100):
        ip = f"198.51.100.{i}"
        buckets.setdefault(int(Small.key(ip)) % 4, []).append(ip)
    kept = {ip for ips in buckets.values() for ip in ips[-4:]}
    assert {f"198.51.100.{i}" for i in range(100) if h.held(f"198.51.100.{i}", 2100.0)} == kept
