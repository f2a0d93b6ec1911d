"""validrcptto-policyd against a real Postfix (Debian's, on a private config and queue
directory and a high port), through swaks; and against hostile clients."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from helpers.net import free_port
from helpers.smtp_client import T1, make_cdb
from helpers.tools import CI, need, script
from helpers.wait import wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0 and not CI, reason="Postfix starts as root")

MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class Policyd:
    def __init__(self, qdir: Path, *args: str):
        self.port = free_port()
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [script("validrcptto-policyd"), "--listen", f"127.0.0.1:{self.port}",
             "--qmail-dir", str(qdir), "--verbose", "2", *args],
            stderr=subprocess.PIPE, text=True)
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True).start()
        deadline = time.monotonic() + 15
        while not any("listening on" in x for x in self.lines):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.lines
            time.sleep(0.02)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(15)


class Postfix:
    """A private Postfix instance: its own config, queue and data directories."""

    def __init__(self, root: Path, restrictions: str, extra: str = ""):
        self.root, self.port = root, free_port()
        conf, queue, data = root / "conf", root / "queue", root / "data"
        for d in (conf, queue, data):
            d.mkdir(parents=True)
        for p in [root, *root.parents]:              # postfix's daemons read the config
            if p in (Path("/tmp"), Path("/")):
                break
            p.chmod(p.stat().st_mode | 0o711)
        shutil.chown(data, "postfix")
        (conf / "main.cf").write_text(f"""\
compatibility_level = 3.6
queue_directory = {queue}
data_directory = {data}
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
myhostname = relay.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks =
relay_domains = example.com, example.net, catchall.org, blockdom.net, other.test
smtpd_recipient_restrictions = {restrictions}
access_map_reject_code = 550
{extra}""")
        (conf / "master.cf").write_text(MASTER_CF.format(port=self.port))
        self.conf = conf
        done = subprocess.run(["script", "-qc", f"{need('postfix')} -c {conf} start",
                               "/dev/null"], capture_output=True, text=True, timeout=60)
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, done.stdout + self.log()
                time.sleep(0.1)

    def log(self) -> str:
        try:
            return (self.root / "maillog").read_text()
        except OSError:
            return ""

    def rcpt(self, address: str) -> str:
        """Postfix's reply to RCPT TO:<address>, through swaks."""
        done = subprocess.run([need("swaks"), "--server", "127.0.0.1", "--port", str(self.port),
                               "--from", "a@b.example", "--to", address, "--quit-after", "RCPT",
                               "--timeout", "20"], capture_output=True, text=True, timeout=60)
        lines = done.stdout.splitlines()
        i = max(n for n, x in enumerate(lines) if x.startswith(" -> RCPT TO:"))
        return lines[i + 1][4:]

    def stop(self) -> None:
        subprocess.run(["script", "-qc", f"{need('postfix')} -c {self.conf} stop", "/dev/null"],
                       capture_output=True, timeout=60)


def test_postfix_check_policy_service(qdir, tmp_path):
    pd = Policyd(qdir)
    pf = Postfix(tmp_path / "pf", "reject_unauth_destination, "
                 f"check_policy_service inet:127.0.0.1:{pd.port}, permit")
    try:
        assert pf.rcpt("joe@example.com").startswith("250 ")
        assert pf.rcpt("nobody@example.com") == (
            "550 5.1.1 <nobody@example.com>: Recipient address rejected: not in my "
            "validrcptto list")
        assert pf.rcpt("joe-list-x-y@example.com").startswith("250 ")    # a -default key
        assert pf.rcpt("neg-a@example.com").startswith("550 5.1.1 ")       # a '-' value
        assert pf.rcpt("Blocked@CatchAll.org").startswith("550 5.1.1 ")
        assert pf.rcpt("anyone@catchall.org").startswith("250 ")          # @domain
        assert pf.rcpt("x@other.test").startswith("250 ")     # not in rcpthosts: Postfix's
        assert pf.rcpt("x@elsewhere.test").startswith("454 4.7.1")       # own rules decide
        assert any("policy: reject nobody@example.com (no key)" in x for x in pd.lines)
        odd_forms(pf, qdir)
    finally:
        pf.stop()
        assert pd.stop() == 0


def test_postfix_relay_recipient_maps_socketmap(qdir, tmp_path):
    pd = Policyd(qdir)
    pf = Postfix(tmp_path / "pf", "reject_unauth_destination, permit",
                 f"relay_recipient_maps = socketmap:inet:127.0.0.1:{pd.port}:validrcptto\n")
    try:
        assert pf.rcpt("joe@example.com").startswith("250 ")
        assert pf.rcpt("joe-list-x@example.com").startswith("250 ")
        unknown = "550 5.1.1 <{}>: Recipient address rejected: User unknown in relay " \
                  "recipient table"
        assert pf.rcpt("nobody@example.com") == unknown.format("nobody@example.com")
        # Postfix falls back to @catchall.org when the address is not found: a '-'
        # refusal under a catch-all must stay a refusal
        assert pf.rcpt("blocked@catchall.org") == unknown.format("blocked@catchall.org")
        assert pf.rcpt("neg-a@example.com") == unknown.format("neg-a@example.com")
        assert pf.rcpt("someone@catchall.org").startswith("250 ")
        assert any("socketmap: reject blocked@catchall.org" in x for x in pd.lines)
        odd_forms(pf, qdir)
    finally:
        pf.stop()
        assert pd.stop() == 0


def odd_forms(pf: Postfix, qdir: Path) -> None:
    """Trailing dots, case and the like: Postfix routes ``nobody@example.com.`` as
    ``nobody@example.com``, so the answer must be the one `qmail-updater check` gives
    for the plain address (a trailing dot must not be a way past the list)."""
    cdb = str(qdir / "control/validrcptto.cdb")
    for odd, plain in [("nobody@example.com.", "nobody@example.com"),
                       ("Nobody@EXAMPLE.com.", "nobody@example.com"),
                       ("joe@example.com.", "joe@example.com"),
                       ("joe@Example.COM.", "joe@example.com"),
                       ("blocked@catchall.org.", "blocked@catchall.org"),
                       ("anyone@catchall.org.", "anyone@catchall.org")]:
        listed = subprocess.run([script("qmail-updater"), "check", "--cdb", cdb, plain],
                                capture_output=True).returncode == 0
        got = pf.rcpt(odd)
        assert got.startswith("250 ") == listed and (listed or got.startswith("5")), \
            (odd, got)


def policy(sock: socket.socket, recipient: bytes) -> bytes:
    sock.sendall(b"request=smtpd_access_policy\nprotocol_state=RCPT\nrecipient=" +
                 recipient + b"\n\n")
    buf = b""
    while not buf.endswith(b"\n\n"):
        chunk = sock.recv(4096)
        assert chunk, buf
        buf += chunk
    return buf


def socketmap(sock: socket.socket, key: bytes) -> bytes:
    payload = b"validrcptto " + key
    sock.sendall(b"%d:%s," % (len(payload), payload))
    buf = b""
    while not buf.endswith(b","):
        chunk = sock.recv(4096)
        assert chunk, buf
        buf += chunk
    return buf


def test_the_cdb_replaced_during_a_burst(qdir, tmp_path):
    """1,000 requests on one connection of each protocol; the cdb is replaced (rename)
    after the 500th: no error, and the very next request has the new answer."""
    pd = Policyd(qdir)
    cdb = qdir / "control/validrcptto.cdb"
    try:
        for ask, yes, no in ((policy, b"action=DUNNO\n\n", b"action=REJECT"),
                             (socketmap, b"8:OK valid,", b"9:NOTFOUND ,")):
            make_cdb(cdb, T1)
            with socket.create_connection(("127.0.0.1", pd.port), timeout=10) as s:
                for i in range(1000):
                    if i == 500:
                        make_cdb(cdb, {**T1, b"new@example.com": b""})  # tmp + rename
                    got = ask(s, b"new@example.com")
                    assert got.startswith(yes if i >= 500 else no), (i, got)
                    assert ask(s, b"joe@example.com").startswith(yes)
        assert pd.proc.poll() is None
        assert not any("Traceback" in x or "unavailable" in x for x in pd.lines)
        cdb.unlink()                                 # unreadable: defer / TEMP
        with socket.create_connection(("127.0.0.1", pd.port), timeout=10) as s:
            assert policy(s, b"joe@example.com").startswith(b"action=DEFER_IF_PERMIT ")
        with socket.create_connection(("127.0.0.1", pd.port), timeout=10) as s:
            assert socketmap(s, b"joe@example.com").split(b":", 1)[1].startswith(b"TEMP ")
    finally:
        assert pd.stop() == 0


BROKEN = {"empty": lambda whole: b"", "truncated": lambda whole: whole[:-3],
          "garbage": lambda whole: bytes(range(256)) * 16, "header": lambda whole: whole[:2048],
          "no-records": None}


@pytest.mark.parametrize("broken", sorted(BROKEN))
def test_a_cdb_that_was_never_whole_defers(qdir, broken):
    """Started on an empty, truncated or garbage cdb, or one with no records (which
    the installer never writes): a listed address is deferred (DEFER_IF_PERMIT / TEMP),
    never refused; a whole cdb renamed in later answers at once; a cdb of no records
    written mid-run is unavailable again."""
    cdb = qdir / "control/validrcptto.cdb"
    whole = cdb.read_bytes()
    if BROKEN[broken] is None:
        make_cdb(cdb, {})
    else:
        cdb.write_bytes(BROKEN[broken](whole))
    pd = Policyd(qdir)
    try:
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", pd.port), timeout=10) as s:
                assert policy(s, b"joe@example.com").startswith(b"action=DEFER_IF_PERMIT ")
                assert policy(s, b"x@not-ours.test") == b"action=DUNNO\n\n"
            with socket.create_connection(("127.0.0.1", pd.port), timeout=10) as s:
                assert socketmap(s, b"joe@example.com").split(b":", 1)[1].startswith(b"TEMP ")
        make_cdb(cdb, T1)
        with socket.create_connection(("127.0.0.1", pd.port), timeout=10) as s:
            assert policy(s, b"joe@example.com") == b"action=DUNNO\n\n"
            assert policy(s, b"nobody@example.com").startswith(b"action=REJECT")
            make_cdb(cdb, {})
            assert policy(s, b"joe@example.com").startswith(b"action=DEFER_IF_PERMIT ")
            assert policy(s, b"nobody@example.com").startswith(b"action=DEFER_IF_PERMIT ")
        assert pd.proc.poll() is None
    finally:
        assert pd.stop() == 0


def test_rcpthosts_changes_are_seen_without_a_signal(qdir):
    """A domain added to rcpthosts is ours within a second, with no SIGHUP; a list
    caught mid-write (no final newline yet) keeps the last good copy."""
    (qdir / "control/rcpthosts").write_text("example.com\n")
    make_cdb(qdir / "control/validrcptto.cdb", {**T1, b"joe@new.example": b""})
    pd = Policyd(qdir)
    try:
        with socket.create_connection(("127.0.0.1", pd.port), timeout=10) as s:
            assert policy(s, b"nobody@new.example") == b"action=DUNNO\n\n"       # not ours
            (qdir / "control/rcpthosts").write_text("example.com\nnew.example\n")
            wait_for(lambda: policy(s, b"nobody@new.example").startswith(b"action=REJECT"),
                     5, "the new domain")
            assert policy(s, b"joe@new.example") == b"action=DUNNO\n\n"
            hosts = qdir / "control/rcpthosts"

            def young(log: str) -> bool:            # the file kept being written
                os.utime(hosts)
                return policy(s, b"nobody@new.example").startswith(b"action=REJECT") and \
                    any("rcpthosts" in x and log in x for x in pd.lines)
            with open(hosts, "r+") as f:            # `cat new > rcpthosts`, step one: never
                f.truncate(0)                       # DUNNO for an unknown mailbox of ours
            wait_for(lambda: young("being written (emptied just now)"), 5, "the emptied file")
            hosts.write_text("exam")                # caught mid-write
            wait_for(lambda: young("being written (no final newline"), 5, "the torn file")
            assert sum("being written" in x for x in pd.lines) == 2
            os.utime(hosts, (time.time() + 60, time.time() + 60))   # from the future: taken
            wait_for(lambda: policy(s, b"nobody@new.example") == b"action=DUNNO\n\n", 5,
                     "a list whose mtime is in the future")
    finally:
        assert pd.stop() == 0


@pytest.mark.parametrize("bad", [b"a" * (1 << 20), b"5:validrcptto joe@example.com,",
                                 b"\x00\xff\xfe binary\n\n", b"12345678901:x,",
                                 b"recipient\n\n"],
                         ids=["1MB", "netstring-length", "binary", "huge-length", "no-equals"])
def test_bad_input_gets_one_error_and_a_closed_connection(qdir, bad):
    pd = Policyd(qdir)
    try:
        with socket.create_connection(("127.0.0.1", pd.port), timeout=10) as s:
            try:
                s.sendall(bad)
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass                                 # closed while we were still sending
            try:
                assert s.recv(100) == b""
            except ConnectionResetError:
                pass
        deadline = time.monotonic() + 5
        while not any("closing" in x for x in pd.lines):
            assert time.monotonic() < deadline, pd.lines
            time.sleep(0.02)
        errors = [x for x in pd.lines if "closing" in x]
        assert len(errors) == 1 and re.search(r"\d+ 127\.0\.0\.1:\d+: ", errors[0]), errors
        with socket.create_connection(("127.0.0.1", pd.port), timeout=10) as s:
            assert policy(s, b"joe@example.com") == b"action=DUNNO\n\n"   # unharmed
    finally:
        assert pd.stop() == 0


def test_shipped_service_dir_under_svscan(qdir, tmp_path):
    svscan, svc = need("svscan"), need("svc")
    need("envdir")
    need("multilog")
    from helpers.tools import BIN
    services = tmp_path / "services"
    svcdir = services / "validrcptto-policyd"
    shutil.copytree(Path(__file__).resolve().parent.parent / "service/validrcptto-policyd",
                    svcdir)
    port = free_port()
    for name, value in dict(LISTEN=f"127.0.0.1:{port}", QMAIL_DIR=qdir, POLICYD_USER="",
                            PATH=f"{BIN}:/usr/bin:/bin").items():
        (svcdir / "env" / name).write_text(f"{value}\n")
    scan = subprocess.Popen([svscan, str(services)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                    assert policy(s, b"nobody@example.com").startswith(b"action=REJECT 5.1.1 ")
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        subprocess.run([svc, "-h", str(svcdir)], check=True)
        current = svcdir / "log/main/current"
        deadline = time.monotonic() + 10
        while "SIGHUP: re-reading" not in (current.read_text() if current.exists() else ""):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert "policy: reject nobody@example.com" in current.read_text()
    finally:
        subprocess.run([svc, "-dx", str(svcdir), str(svcdir / "log")])
        os.killpg(scan.pid, signal.SIGTERM)
        scan.wait(10)


def test_metrics_endpoint_counts_every_answer(qdir):
    import urllib.request
    mport = free_port()
    pd = Policyd(qdir, "--metrics", f"127.0.0.1:{mport}")
    try:
        with socket.create_connection(("127.0.0.1", pd.port), timeout=10) as s:
            policy(s, b"joe@example.com")
            policy(s, b"nobody@example.com")
            policy(s, b"x@notours.test")
        with socket.create_connection(("127.0.0.1", pd.port), timeout=10) as s:
            socketmap(s, b"nobody@example.com")
        with socket.create_connection(("127.0.0.1", pd.port), timeout=10) as s:
            s.sendall(b"\x00\xff\n\n")
            s.recv(10)
        time.sleep(0.3)
        text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) \
            .read().decode()
        got = dict(line.rsplit(" ", 1) for line in text.splitlines()
                   if line and not line.startswith("#"))
        assert got['validrcptto_policyd_requests_total{protocol="policy",result="accept"}'] \
            == "1.0"
        assert got['validrcptto_policyd_requests_total{protocol="policy",result="reject"}'] \
            == "1.0"
        assert got['validrcptto_policyd_requests_total{protocol="policy",result="not_ours"}'] \
            == "1.0"
        assert got['validrcptto_policyd_requests_total{protocol="socketmap",result="reject"}'] \
            == "1.0"
        assert got["validrcptto_policyd_bad_requests_total"] == "1.0"
        assert got["validrcptto_cdb_entries"] == "11.0"
    finally:
        assert pd.stop() == 0
