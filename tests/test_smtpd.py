"""validrcptto-smtpd: byte-exact replies on stdio, real tcpserver + smtplib + swaks,
hostile input, and the --listen server picking up a renamed-in cdb."""

from __future__ import annotations

import os
import re
import smtplib
import socket
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.net import free_port, wait_port
from helpers.smtp_client import T1, make_cdb, smtp_tree
from helpers.tools import need, script

HEAD = b"EHLO client.example\r\nMAIL FROM:<sender@example.org>\r\n"
EHLO = (b"220 mx.example.com ESMTP\r\n250-mx.example.com\r\n250-PIPELINING\r\n"
        b"250 8BITMIME\r\n250 ok\r\n")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return smtp_tree(tmp_path)


def converse(env: dict, data: bytes, timeout: float = 30, **extra: str):
    e = dict(env, **extra)
    done = subprocess.run([script("validrcptto-smtpd")], input=data, env=e,
                          capture_output=True, timeout=timeout)
    return done.stdout, done.stderr.decode(), done.returncode


def rcpts(*addresses: str) -> bytes:
    return b"".join(b"RCPT TO:<%s>\r\n" % a.encode() for a in addresses)


# --------------------------------------------------------------------------- replies

def test_conversation_replies_are_qmails(env):
    out, _, rc = converse(env, b"HELO c\r\nNOOP\r\nVRFY x\r\nRCPT TO:<joe@example.com>\r\n"
                          b"DATA\r\nMAIL FROM:<a@b>\r\nDATA\r\nRSET\r\nXYZZY\r\n"
                          b"MAIL FROM:<" + b"x" * 901 + b">\r\nQUIT\r\n")
    assert out == (b"220 mx.example.com ESMTP\r\n250 mx.example.com\r\n250 ok\r\n"
                   b"252 send some mail, i'll try my best\r\n503 MAIL first (#5.5.1)\r\n"
                   b"503 MAIL first (#5.5.1)\r\n250 ok\r\n503 RCPT first (#5.5.1)\r\n"
                   b"250 flushed\r\n502 unimplemented (#5.5.1)\r\n555 syntax error (#5.5.4)\r\n"
                   b"221 mx.example.com\r\n")
    assert rc == 0


def test_smtpgreeting_and_no_size(env, tmp_path):
    (tmp_path / "qmail/control/smtpgreeting").write_text("greetings.example hello\n")
    (tmp_path / "qmail/control/databytes").write_text("1000\n")
    out, _, _ = converse(env, b"EHLO c\r\nQUIT\r\n")
    assert out == (b"220 greetings.example hello ESMTP\r\n250-greetings.example hello\r\n"
                   b"250-PIPELINING\r\n250 8BITMIME\r\n"
                   b"221 greetings.example hello\r\n")


@pytest.mark.parametrize("address,reply", [
    ("Joe@Example.COM", b"250 ok"), ("joe-list-foo-bar@example.com", b"250 ok"),
    ("joe-list@example.com", b"553 sorry, this recipient is not in my validrcptto list (#5.7.1)"),
    ("bob@example.com", b"553 sorry, this recipient is not in my validrcptto list (#5.7.1)"),
    ("anyone@catchall.org", b"250 ok"), ("Postmaster", b"250 ok"), ("x@example.net", b"250 ok"),
    ("Blocked@CatchAll.org", b"553 sorry, this recipient is not in my validrcptto list (#5.7.1)"),
    ("neg-a@catchall.org", b"250 ok"),
    ("y@blockdom.net", b"553 sorry, this recipient is not in my validrcptto list (#5.7.1)"),
    ("foo@sub.catchall.org", b"553 sorry, this recipient is not in my validrcptto list (#5.7.1)"),
    ("", b"553 sorry, this recipient is not in my validrcptto list (#5.7.1)"),
    ("joe@elsewhere.example",
     b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)"),
])
def test_rcpt_vectors(env, address, reply):
    out, _, _ = converse(env, HEAD + rcpts(address) + b"QUIT\r\n")
    assert out == EHLO + reply + b"\r\n221 mx.example.com\r\n"


def test_limit_sequence_and_rcpthosts_not_counted(env):
    out, err, _ = converse(env, HEAD + rcpts("no1@example.com", "joe@example.com",
                           "far@elsewhere.example", "no2@example.com", "no3@example.com",
                           "joe@example.com"), VALIDRCPTTO_LIMIT="3", TCPREMOTEIP="192.0.2.9")
    assert out == EHLO + (b"553 sorry, this recipient is not in my validrcptto list (#5.7.1)\r\n"
                          b"250 ok\r\n"
                          b"553 sorry, that domain isn't in my list of allowed rcpthosts "
                          b"(#5.7.1)\r\n"
                          b"553 sorry, this recipient is not in my validrcptto list (#5.7.1)\r\n"
                          b"421 too many invalid addresses, goodbye (#4.3.0)\r\n")
    lines = err.splitlines()
    pid = lines[0].split("[")[1].split("]")[0]
    prefix = f"validrcptto-smtpd[{pid}]: validrcptto [192.0.2.9] "
    # and one line the C patch does not write, for `qmail-updater report`: the domain only
    assert lines == [prefix + "not found: no1@example.com",
                     prefix + "not in rcpthosts: elsewhere.example",
                     prefix + "not found: no2@example.com",
                     prefix + "not found: no3@example.com",
                     prefix + "excessive violations, hanging up"]


@pytest.mark.parametrize("value,hangs_up_at", [("0", None), ("", None), ("abc", None),
                                               ("-5", None), ("10abc", 10), ("1", 1)])
def test_limit_parsing(env, value, hangs_up_at):
    out, _, _ = converse(env, HEAD + rcpts(*[f"no{i}@example.com" for i in range(12)]),
                         VALIDRCPTTO_LIMIT=value)
    replies = out.split(b"\r\n")[5:-1]
    if hangs_up_at is None:
        assert len(replies) == 12 and all(r.startswith(b"553 ") for r in replies)
    else:
        assert len(replies) == hangs_up_at and replies[-1].startswith(b"421 too many")


def test_default_limit_is_ten(env):
    out, _, _ = converse(env, HEAD + rcpts(*[f"no{i}@example.com" for i in range(15)]))
    replies = out.split(b"\r\n")[5:-1]
    assert [r[:3] for r in replies] == [b"553"] * 9 + [b"421"]


def test_log_levels(env):
    data = HEAD + rcpts("Joe@Example.COM", "Neg-A@example.com", "bad\x1b[31m@example.com")
    _, err0, _ = converse(env, data, TCPREMOTEIP="10.0.0.1")
    _, err1, _ = converse(env, data, VALIDRCPTTO_LOG="1")
    _, err2, _ = converse(env, data, VALIDRCPTTO_LOG="2")
    strip = lambda err: [line.split("] ", 2)[-1] for line in err.splitlines()]
    assert err0.splitlines()[0].endswith("validrcptto [10.0.0.1] not found: Neg-A@example.com")
    assert strip(err0) == ["not found: Neg-A@example.com", "not found: bad\\x1b[31m@example.com"]
    assert strip(err1) == [
        "RCPT TO: joe@example.com", "found: joe@example.com",
        "RCPT TO: neg-a@example.com", "reject: neg-default@example.com",
        "not found: Neg-A@example.com",
        "RCPT TO: bad\\x1b[31m@example.com", "not found: bad\\x1b[31m@example.com"]
    assert strip(err2) == [
        "RCPT TO: joe@example.com", "trying: joe@example.com", "found: joe@example.com",
        "RCPT TO: neg-a@example.com", "trying: neg-a@example.com",
        "trying: neg-default@example.com", "reject: neg-default@example.com",
        "not found: Neg-A@example.com",
        "RCPT TO: bad\\x1b[31m@example.com", "trying: bad\\x1b[31m@example.com",
        "trying: @example.com", "not found: bad\\x1b[31m@example.com"]
    assert "unknown" in converse(env, data)[1].splitlines()[0]


def test_switches(env, tmp_path):
    data = HEAD + rcpts("nobody@example.com") + b"QUIT\r\n"
    ok = EHLO + b"250 ok\r\n221 mx.example.com\r\n"
    assert converse(env, data, RELAYCLIENT="")[0] == ok
    assert converse(env, data, VALIDRCPTTO_CDB="")[0] == ok
    unset = {k: v for k, v in env.items() if k != "VALIDRCPTTO_CDB"}
    assert converse(unset, data)[0] == ok
    out, _, _ = converse(env, data, VALIDRCPTTO_CDB=str(tmp_path / "nonexistent"))
    assert out == b"421 unable to read controls (#4.3.0)\r\n"
    # a file that was never a whole cdb, or one with no records (which the installer
    # never writes), is unreadable controls, never "not in my list" (the C patch: 553)
    whole = make_cdb(tmp_path / "whole.cdb", T1).read_bytes()
    make_cdb(tmp_path / "none.cdb", {})
    for name, content in [("empty", b""), ("truncated", whole[:-1]), ("garbage", os.urandom(4096)),
                          ("header", whole[:2048]), ("none", None)]:
        path = tmp_path / f"{name}.cdb"
        if content is not None:
            path.write_bytes(content)
        out, _, _ = converse(env, data, VALIDRCPTTO_CDB=str(path))
        assert out == b"421 unable to read controls (#4.3.0)\r\n", name
    (tmp_path / "qmail/control/rcpthosts").unlink()          # no rcpthosts: all domains
    out, _, _ = converse(env, HEAD + rcpts("joe@anything.example") + b"QUIT\r\n",
                         RELAYCLIENT="")
    assert out == ok


def test_data_is_queued_with_envelope(env, tmp_path):
    msg = (b"Subject: test\r\n\r\nline one\r\n..dotted\r\n.\r\n")
    out, _, _ = converse(env, HEAD + rcpts("joe@example.com", "x@example.net") + b"DATA\r\n"
                         + msg + b"QUIT\r\n", TCPREMOTEIP="192.0.2.1", TCPLOCALHOST="mx.local")
    replies = out.split(b"\r\n")
    assert replies[7] == b"354 go ahead"
    assert replies[8].startswith(b"250 ok ") and b" qp " in replies[8]
    queued = (tmp_path / "queue/0.msg").read_bytes()
    assert queued.startswith(b"Received: from unknown (HELO client.example) (192.0.2.1)\n"
                             b"  by mx.local with SMTP; ")
    assert queued.endswith(b" -0000\nSubject: test\n\nline one\n.dotted\n")
    assert (tmp_path / "queue/0.env").read_bytes() == \
        b"Fsender@example.org\0Tjoe@example.com\0Tx@example.net\0\0"


@pytest.mark.parametrize("code,reply", [
    ("31", b"554 mail server permanently rejected message (#5.3.0)"),
    ("11", b"554 envelope address too long for qq (#5.1.3)"),
    ("25", b"554 qq permanent problem (#5.3.0)"),
    ("53", b"451 qq write error or disk full (#4.3.0)"),
    ("64", b"451 qq trouble creating files in queue (#4.3.0)"),
    ("99", b"451 qq temporary problem (#4.3.0)"),
])
def test_queue_exit_codes(env, code, reply):
    out, _, _ = converse(env, HEAD + rcpts("joe@example.com") + b"DATA\r\nhi\r\n.\r\n",
                         QQ_EXIT=code)
    assert out.split(b"\r\n")[7] == reply


def test_bare_lf_hops_and_size(env, tmp_path):
    out, _, _ = converse(env, HEAD + rcpts("joe@example.com") + b"DATA\r\nbare\nlf\r\n.\r\n"
                         b"NOOP\r\n")
    assert out.endswith(b"354 go ahead\r\n451 See http://pobox.com/~djb/docs/smtplf.html.\r\n")
    hops = b"".join(b"Received: from x%d\r\n" % i for i in range(100))
    out, _, _ = converse(env, HEAD + rcpts("joe@example.com") + b"DATA\r\n" + hops
                         + b"\r\nbody\r\n.\r\nQUIT\r\n")
    assert b"554 too many hops, this message is looping (#5.4.6)\r\n221" in out
    out, _, _ = converse(env, HEAD + rcpts("joe@example.com") + b"DATA\r\n"
                         + b"x" * 2000 + b"\r\n.\r\nQUIT\r\n", DATABYTES="1000")
    assert b"552 sorry, that message size exceeds my databytes limit (#5.3.4)\r\n221" in out
    assert not list((tmp_path / "queue").iterdir())


def test_timeout(env, tmp_path):
    (tmp_path / "qmail/control/timeoutsmtpd").write_text("1\n")
    proc = subprocess.Popen([script("validrcptto-smtpd")], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE)
    proc.stdin.write(b"HELO x\r\n")
    proc.stdin.flush()
    started = time.monotonic()
    out = proc.stdout.read()
    assert proc.wait(10) == 1 and time.monotonic() - started < 5      # qmail exits 1
    assert out == b"220 mx.example.com ESMTP\r\n250 mx.example.com\r\n451 timeout (#4.4.2)\r\n"
    proc.stdin.close()


# --------------------------------------------------------------------------- hostile input

def test_pipelined_ten_thousand_rcpts(env):
    out, _, _ = converse(env, HEAD + rcpts(*["joe@example.com"] * 10000) + b"QUIT\r\n",
                         timeout=120)
    replies = out.split(b"\r\n")[5:-1]
    assert replies == [b"250 ok"] * 10000 + [b"221 mx.example.com"]


def test_overlong_line_nul_and_8bit(env):
    out, _, _ = converse(env, b"NOOP " + b"A" * 100000 + b"\r\nNOOP\r\n"
                         b"MAIL FROM:<a\0b@c>\r\nRCPT TO:<\xff\xfe@example.com>\r\n"
                         b"RCPT TO:<joe@example.com\r\nQUIT\r\n")
    assert out == (b"220 mx.example.com ESMTP\r\n500 line too long (#5.5.2)\r\n250 ok\r\n"
                   b"250 ok\r\n553 sorry, this recipient is not in my validrcptto list "
                   b"(#5.7.1)\r\n250 ok\r\n221 mx.example.com\r\n")


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(
    st.binary(max_size=300),
    st.sampled_from([b"\r\n", b"\n", b"\r", b"\0", b"MAIL FROM:<a@b>\r\n", b"DATA\r\n",
                     b"RCPT TO:<joe@example.com>\r\n", b"RCPT TO:<x@example.com>\r\n",
                     b".\r\n", b"\xff" * 5000, b"RSET\r\n", b"EHLO \x00\r\n"])), max_size=30))
def test_hostile_input_never_crashes(env, chunks):
    out, err, rc = converse(env, b"".join(chunks))
    assert rc in (0, 1), err
    assert "Traceback" not in err
    assert out.startswith(b"220 mx.example.com ESMTP\r\n")
    for reply in out.split(b"\r\n")[:-1]:
        assert reply[:3].isdigit() and reply[3:4] in (b" ", b"-"), reply
    assert out.endswith(b"\r\n")


# --------------------------------------------------------------------------- tcpserver

@pytest.fixture
def tcpserver(env, tmp_path):
    """tcpserver on 127.0.0.1 with tcprules: 127.0.0.2 gets RELAYCLIENT."""
    tcpserver_bin, tcprules = need("tcpserver"), need("tcprules")
    rules = tmp_path / "rules.cdb"
    subprocess.run([tcprules, str(rules), str(rules) + ".tmp"], check=True,
                   input=b'127.0.0.2:allow,RELAYCLIENT=""\n:allow\n')
    port = free_port()
    proc = subprocess.Popen([tcpserver_bin, "-q", "-R", "-H", "-l", "mx.local", "-x", str(rules),
                             "127.0.0.1", str(port), script("validrcptto-smtpd")],
                            env=env, stderr=subprocess.PIPE, text=True)
    wait_port(port, proc)
    yield port
    proc.terminate()
    proc.wait(10)


def test_tcpserver_smtplib_limit_and_counter_not_reset(tcpserver):
    s = smtplib.SMTP("127.0.0.1", tcpserver, timeout=30)
    s.ehlo("client.example")
    s.mail("a@example.org")
    codes = []
    for i in range(4):
        codes.append(s.rcpt(f"no{i}@example.com")[0])
    s.rset()                                           # RSET, MAIL and EHLO do not reset it
    s.ehlo("again.example")
    s.mail("a@example.org")
    codes.append(s.rcpt("far@elsewhere.example")[0])   # rcpthosts: not counted
    for i in range(4, 9):
        codes.append(s.rcpt(f"no{i}@example.com")[0])
    assert codes == [553] * 4 + [553] + [553] * 5
    code, text = s.rcpt("no9@example.com")
    assert (code, text) == (421, b"too many invalid addresses, goodbye (#4.3.0)")
    with pytest.raises(smtplib.SMTPServerDisconnected):
        s.noop()


def test_tcpserver_delivery_with_smtplib(tcpserver, tmp_path):
    with smtplib.SMTP("127.0.0.1", tcpserver, timeout=30) as s:
        refused = s.sendmail("a@example.org", ["joe@example.com", "bob@example.com"],
                             b"Subject: hello\r\n\r\nbody\r\n")
    assert refused == {"bob@example.com": (553, b"sorry, this recipient is not in my "
                                                b"validrcptto list (#5.7.1)")}
    assert (tmp_path / "queue/0.env").read_bytes() == b"Fa@example.org\0Tjoe@example.com\0\0"
    msg = (tmp_path / "queue/0.msg").read_bytes()
    assert msg.startswith(b"Received: from unknown (HELO ")
    assert b"(127.0.0.1)\n  by mx.local with SMTP; " in msg
    assert msg.endswith(b"\nSubject: hello\n\nbody\n")


def test_tcprules_relayclient_bypass(tcpserver):
    with smtplib.SMTP("127.0.0.1", tcpserver, timeout=30, source_address=("127.0.0.2", 0)) as s:
        s.ehlo("relay.example")
        s.mail("a@example.org")
        assert s.rcpt("nobody@example.com")[0] == 250
        assert s.rcpt("anyone@elsewhere.example")[0] == 250


def test_swaks(tcpserver, tmp_path):
    swaks = need("swaks")
    done = subprocess.run([swaks, "--server", "127.0.0.1", "--port", str(tcpserver),
                           "--to", "joe@example.com", "--from", "s@example.org",
                           "--helo", "swaks.example", "--body", "from swaks"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout
    assert "<-  250 ok " in done.stdout
    assert (tmp_path / "queue/0.env").read_bytes() == b"Fs@example.org\0Tjoe@example.com\0\0"
    done = subprocess.run([swaks, "--server", "127.0.0.1", "--port", str(tcpserver),
                           "--to", "nobody@example.com", "--from", "s@example.org"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 24          # swaks: the server rejected the RCPT
    assert "<** 553 sorry, this recipient is not in my validrcptto list (#5.7.1)" in done.stdout


# --------------------------------------------------------------------------- --listen

def test_listen_mode_sees_renamed_cdb_on_next_connection(env, tmp_path):
    port = free_port()
    proc = subprocess.Popen([script("validrcptto-smtpd"), "--listen", f"127.0.0.1:{port}"],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_port(port, proc)
        first = smtplib.SMTP("127.0.0.1", port, timeout=30)
        first.ehlo("one")
        first.mail("a@example.org")
        assert first.rcpt("new@example.com")[0] == 553
        make_cdb(tmp_path / "qmail/control/validrcptto.cdb", {**T1, b"new@example.com": b""})
        assert first.rcpt("new@example.com")[0] == 553      # opened once per connection
        first.quit()
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as second:
            second.ehlo("two")
            second.mail("a@example.org")
            assert second.rcpt("new@example.com")[0] == 250
    finally:
        proc.terminate()
        proc.wait(10)


def test_listen_mode_delivers_streams_and_caps_connections(env, tmp_path):
    port = free_port()
    proc = subprocess.Popen([script("validrcptto-smtpd"), "--listen", f"127.0.0.1:{port}",
                             "--max-connections", "3"], env=env, stderr=subprocess.PIPE)
    try:
        wait_port(port, proc)
        time.sleep(0.2)                              # the probe connection has ended
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            refused = s.sendmail("a@example.org", ["joe@example.com", "bob@example.com"],
                                 b"Subject: hi\r\n\r\n.dot\r\n" + b"x" * 200000 + b"\r\n")
        assert list(refused) == ["bob@example.com"]
        assert (tmp_path / "queue/0.env").read_bytes() == b"Fa@example.org\0Tjoe@example.com\0\0"
        msg = (tmp_path / "queue/0.msg").read_bytes()
        assert msg.startswith(b"Received: from unknown (HELO ") and b"\n..dot\n" not in msg
        assert msg.endswith(b"\n\n.dot\n" + b"x" * 200000 + b"\n")
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        for c in idle:
            assert c.recv(100).startswith(b"220 ")
        extra = socket.create_connection(("127.0.0.1", port))
        assert extra.recv(100) == b"421 too many connections, try again later (#4.3.2)\r\n"
        for c in idle + [extra]:
            c.close()
        time.sleep(0.3)
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:   # room again
            assert s.noop()[0] == 250
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    assert b"Traceback" not in proc.stderr.read()


# --------------------------------------------------------------------------- bounds

def _server_on_socket(env, **extra):
    """validrcptto-smtpd with fd 0 and 1 on one end of a socketpair, as under tcpserver."""
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen([script("validrcptto-smtpd")], stdin=theirs, stdout=theirs,
                            stderr=subprocess.PIPE, env=dict(env, **extra))
    theirs.close()
    return ours, proc


def test_client_that_never_reads_is_dropped_after_the_write_timeout(env, tmp_path):
    (tmp_path / "qmail/control/timeoutsmtpd").write_text("2\n")
    sock, proc = _server_on_socket(env)
    sock.setblocking(False)
    started = time.monotonic()
    sent = 0
    chunk = b"NOOP\r\n" * 10000
    while proc.poll() is None and time.monotonic() - started < 30:
        try:
            sent += sock.send(chunk)
        except BlockingIOError:
            time.sleep(0.05)
        except OSError:
            break
    rc = proc.wait(10)
    elapsed = time.monotonic() - started
    sock.close()
    assert rc == 1 and 2 <= elapsed < 15, (rc, elapsed)
    assert sent > 100_000              # it did read for a while, then writes stalled
    assert b"Traceback" not in proc.stderr.read()


def test_one_gigabyte_message_is_streamed_not_spooled(env, tmp_path):
    """DATABYTES unset: 1 GB goes through qmail-queue's pipe as it arrives; no file is
    created and the server stays small."""
    qq = tmp_path / "counting-queue"
    qq.write_text("#!/bin/sh\nwc -c > \"$QQ_DIR/size\"\ncat 0<&1 > \"$QQ_DIR/env\"\nexit 0\n")
    qq.chmod(0o755)
    spool = tmp_path / "tmp"
    spool.mkdir()
    sock, proc = _server_on_socket(env, QMAILQUEUE=str(qq), QQ_DIR=str(tmp_path),
                                   TMPDIR=str(spool), RELAYCLIENT="")
    f = sock.makefile("rwb", buffering=0)
    sock.sendall(b"HELO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<joe@example.com>\r\nDATA\r\n")
    line = b"x" * 1022 + b"\r\n"
    block = line * 1024                                  # 1 MiB
    for _ in range(1024):
        sock.sendall(block)
    sock.sendall(b".\r\n")
    got = b""
    while b"250 ok " not in got and b"\r\n4" not in got and b"\r\n5" not in got:
        more = sock.recv(4096)
        assert more, got
        got += more
    status = Path(f"/proc/{proc.pid}/status").read_text()
    hwm_kb = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))
    sock.sendall(b"QUIT\r\n")
    f.close()
    sock.close()
    proc.wait(30)
    assert b"250 ok " in got, got
    received = 0                                        # our Received line on top
    assert int((tmp_path / "size").read_text()) - 1023 * 1024 * 1024 > received
    assert list(spool.iterdir()) == []
    assert hwm_kb < 50 * 1024, f"peak RSS {hwm_kb} kB"
