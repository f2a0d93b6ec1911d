"""Differential tests: the same client bytes, control files and environment given to the
real netqmail 1.06 qmail-smtpd (built from ../shared/reference) and to
validrcptto-smtpd with the validrcptto check off; replies, exit code, the envelope and
the message handed to qmail-queue (Received line included) must be identical.

The only normalisations: the ``250 ok TIME qp PID`` numbers and the Received date.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.smtp_client import QUEUE, make_cdb
from helpers.tools import CI, script

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


@pytest.fixture(scope="session")
def reference(tmp_path_factory) -> tuple[str, Path]:
    """(qmail-smtpd binary, the qmail dir it was compiled for).  From
    QMAIL_SMTPD_REFERENCE + QMAIL_SMTPD_REFERENCE_DIR, else built here."""
    binary = os.environ.get("QMAIL_SMTPD_REFERENCE")
    qdir = os.environ.get("QMAIL_SMTPD_REFERENCE_DIR")
    if binary and qdir:
        return binary, Path(qdir)
    builder = REFERENCE / "build-qmail-smtpd"
    if not builder.exists() or not shutil.which("gcc") or not shutil.which("make"):
        msg = f"reference qmail-smtpd not available ({builder}, gcc, make)"
        if CI:
            pytest.fail(msg + " -- required under CI=true")
        pytest.skip(msg)
    root = tmp_path_factory.mktemp("reference")
    done = subprocess.run([str(builder), str(root / "qmail"), str(root / "bin")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return str(root / "bin/qmail-smtpd"), root / "qmail"


class Pair:
    """One qmail tree (the reference's compiled-in one), two queue directories."""

    def __init__(self, qdir: Path, binary: str):
        self.qdir, self.binary = qdir, binary
        control = qdir / "control"
        if control.exists():
            shutil.rmtree(control)
        control.mkdir(parents=True)
        (qdir / "bin").mkdir(exist_ok=True)
        self.queues = {}
        for side in ("c", "py"):
            d = qdir.parent / f"queue-{side}"
            if d.exists():
                shutil.rmtree(d)
            d.mkdir()
            self.queues[side] = d
        qq = qdir / "bin/qmail-queue"
        qq.write_text(QUEUE.replace("{python}", sys.executable).replace("{dir}", "/nonexistent"))
        qq.chmod(0o755)

    def control(self, name: str, content: str | bytes) -> None:
        path = self.qdir / "control" / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)

    def run(self, data: bytes, env: dict[str, str]) -> dict[str, tuple]:
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("TCP", "RELAYCLIENT", "DATABYTES", "VALIDRCPTTO_",
                                     "QMAIL", "MAXRCPT"))}
        out = {}
        for side, argv in (("c", [self.binary]),
                           ("py", [script("validrcptto-smtpd"), "--qmail-dir", str(self.qdir)])):
            e = dict(base, **env, QQ_DIR=str(self.queues[side]))
            done = subprocess.run(argv, input=data, env=e, capture_output=True, timeout=60,
                                  cwd=str(self.qdir))
            files = sorted(self.queues[side].iterdir())
            queued = [normalise_msg(f.read_bytes()) if f.suffix == ".msg" else f.read_bytes()
                      for f in files]
            for f in files:
                f.unlink()
            out[side] = (normalise_replies(done.stdout), done.returncode, queued)
            if side == "py":
                assert b"Traceback" not in done.stderr, done.stderr.decode()
        return out


def normalise_replies(out: bytes) -> bytes:
    return re.sub(rb"250 ok \d+ qp \d+\r\n", b"250 ok T qp P\r\n", out)


def normalise_msg(msg: bytes) -> bytes:
    return re.sub(rb"; \d{1,2} [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d -0000\n", b"; DATE\n", msg,
                  count=1)


@pytest.fixture
def pair(reference) -> Pair:
    binary, qdir = reference
    p = Pair(qdir, binary)
    p.control("me", "mx.example.com\n")
    p.control("rcpthosts", "example.com\n.example.net\nCaps.Example.ORG\n")
    return p


def same(pair: Pair, data: bytes, **env: str) -> tuple:
    got = pair.run(data, env)
    assert got["py"] == got["c"], data
    return got["c"]


# --------------------------------------------------------------------------- fixed cases

HEAD = b"HELO client\r\nMAIL FROM:<a@b.example>\r\n"


def test_ip_literal_of_this_host_becomes_localiphost(pair):
    pair.control("rcpthosts", "mx.example.com\n")
    replies, _, queued = same(pair, HEAD + b"RCPT TO:<joe@[127.0.0.1]>\r\n"
                              b"RCPT TO:<joe@[192.0.2.99]>\r\nRCPT TO:<joe@[0.0.0.0]>\r\n"
                              b"RCPT TO:<joe@[127.0.0.257]>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n")
    assert replies.count(b"250 ok\r\n") == 4          # MAIL and 3 rewritten recipients
    assert b"Tjoe@mx.example.com\0" in queued[0]
    pair.control("localiphost", "literal.example.com\n")
    pair.control("rcpthosts", "literal.example.com\n")
    same(pair, HEAD + b"RCPT TO:<joe@[127.0.0.1]>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n")


def test_nul_ends_the_command(pair):
    same(pair, b"HELO a\0b\r\nMAIL FROM:<a@b\0c>\r\nRCPT\0 TO:<joe@example.com>\r\n"
               b"RCPT TO:<joe@example.com\0>\r\nNO\0OP\r\n\0\r\nQUIT\0x\r\n")


@pytest.mark.parametrize("code", ["0", "11", "115", "25", "31", "40", "41", "51", "54", "61",
                                  "63", "71", "74", "81", "91", "99", "120"])
def test_queue_exit_codes(pair, code):
    replies, _, _ = same(pair, HEAD + b"RCPT TO:<joe@example.com>\r\nDATA\r\nhi\r\n.\r\n"
                                      b"QUIT\r\n", QQ_EXIT=code)
    if code == "115":
        assert b"554 envelope address too long for qq (#5.1.3)\r\n" in replies


def test_queue_killed_by_a_signal(pair):
    replies, _, _ = same(pair, HEAD + b"RCPT TO:<joe@example.com>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n",
                         QMAILQUEUE="/bin/sh", QQ_EXIT="0")
    # /bin/sh reading "hi" as a script fails; the point is only that both agree


def test_queue_that_reads_nothing_and_exits_0(pair, tmp_path):
    """qmail-queue closing its input at once: the writes fail, so exit 0 is not success."""
    lazy = tmp_path / "lazy-queue"
    lazy.write_text("#!/bin/sh\nexec 0<&- 1>&-\nsleep 0.3\nexit 0\n")
    lazy.chmod(0o755)
    body = b"".join(b"line %d of a message longer than a pipe buffer\r\n" % i
                    for i in range(4000))
    replies, _, _ = same(pair, HEAD + b"RCPT TO:<joe@example.com>\r\nDATA\r\n" + body
                         + b".\r\nQUIT\r\n", QMAILQUEUE=str(lazy))
    assert b"451 qq read error (#4.3.0)\r\n" in replies


def test_unexecutable_queue(pair, tmp_path):
    replies, _, _ = same(pair, HEAD + b"RCPT TO:<joe@example.com>\r\nDATA\r\nhi\r\n.\r\nQUIT\r\n",
                         QMAILQUEUE=str(tmp_path / "missing"))
    assert b"451 unable to exec qq (#4.3.0)\r\n" in replies


@pytest.mark.parametrize("env", [
    {},
    {"TCPREMOTEHOST": "Client", "TCPREMOTEIP": "192.0.2.1", "TCPLOCALHOST": "mx.local"},
    {"TCPREMOTEHOST": "ho st\u00e9(x)", "TCPREMOTEINFO": "id ent", "TCPLOCALIP": "10.0.0.1",
     "TCPREMOTEIP": "2001:db8::1"},
    {"TCPREMOTEHOST": "client", "TCPLOCALIP": "10.0.0.1", "TCPLOCALHOST": ""},
])
def test_received_line(pair, env):
    for helo in (b"HELO client", b"EHLO CLIENT", b"HELO", b"EHLO  we ird\x01[x]", b"NOOP"):
        replies, _, queued = same(pair, helo + b"\r\nMAIL FROM:<a@b>\r\n"
                                  b"RCPT TO:<joe@example.com>\r\nDATA\r\nSubject: x\r\n\r\nb\r\n"
                                  b".\r\nQUIT\r\n", **env)
        assert queued and queued[1].startswith(b"Received: from ")   # [0.env, 0.msg]


def test_badmailfrom_databytes_and_hops(pair):
    pair.control("badmailfrom", "spammer@evil.example\n@Bad.Example\n# comment\n")
    same(pair, b"MAIL FROM:<Spammer@EVIL.example>\r\nRCPT TO:<joe@example.com>\r\n"
               b"MAIL FROM:<x@bad.example>\r\nRCPT TO:<joe@example.com>\r\n"
               b"MAIL FROM:<x@good.example>\r\nRCPT TO:<joe@example.com>\r\nQUIT\r\n")
    pair.control("databytes", "100\n")
    for size in (99, 100, 101, 5000):
        same(pair, HEAD + b"RCPT TO:<joe@example.com>\r\nDATA\r\n" + b"x" * (size - 1)
             + b"\r\n.\r\nQUIT\r\n")
    same(pair, HEAD + b"RCPT TO:<joe@example.com>\r\nDATA\r\n" + b"y" * 300 + b"\r\n.\r\nQUIT\r\n",
         DATABYTES="0")
    for n in (99, 100):
        hops = b"".join(b"%s: x\r\n" % (b"Received" if i % 2 else b"dElIvErEd-To")
                        for i in range(n))
        same(pair, HEAD + b"RCPT TO:<joe@example.com>\r\nDATA\r\n" + hops + b"\r\nbody\r\n.\r\n"
             b"QUIT\r\n")
    hops = b"Subject: x\r\n\r\n" + b"Received: x\r\n" * 150
    same(pair, HEAD + b"RCPT TO:<joe@example.com>\r\nDATA\r\n" + hops + b".\r\nQUIT\r\n")


def test_timeoutsmtpd_zero_means_one_second(pair):
    pair.control("timeoutsmtpd", "0\n")
    same(pair, b"HELO x\r\n")                            # EOF: both exit 1 at once


def test_relayclient_and_morercpthosts(pair):
    make_cdb(pair.qdir / "control/morercpthosts.cdb", {b"more.example": b"", b".sub.example": b""})
    same(pair, HEAD + b"RCPT TO:<a@more.example>\r\nRCPT TO:<a@x.sub.example>\r\n"
               b"RCPT TO:<a@sub.example>\r\nRCPT TO:<a@MORE.example>\r\nRCPT TO:<a@>\r\n"
               b"RCPT TO:<nodomain>\r\nRCPT TO:<a@else.example>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n")
    same(pair, HEAD + b"RCPT TO:<a@else.example>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n",
         RELAYCLIENT="")
    same(pair, HEAD + b"RCPT TO:<a@else.example>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n",
         RELAYCLIENT="@relay.example")
    (pair.qdir / "control/rcpthosts").unlink()
    same(pair, HEAD + b"RCPT TO:<a@anything.example>\r\nDATA\r\nx\r\n.\r\nQUIT\r\n")


def test_greeting_sources(pair):
    pair.control("smtpgreeting", "greetings  from\tme \t\nsecond line\n")
    same(pair, b"EHLO x\r\nHELO y\r\nQUIT\r\n")
    (pair.qdir / "control/smtpgreeting").unlink()
    (pair.qdir / "control/me").unlink()
    same(pair, b"QUIT\r\n")                              # 421 unable to read controls


# --------------------------------------------------------------------------- generated

ADDR = st.one_of(
    st.sampled_from([b"joe@example.com", b"Joe@Example.COM", b"a@x.example.net",
                     b"a@example.net", b"u@caps.example.org", b"u@other.example", b"nobody",
                     b"", b"x@[127.0.0.1]", b"x@[10.9.8.7]", b"\"quoted user\"@example.com",
                     b"back\\>slash@example.com", b"@route,@r2:joe@example.com",
                     b"user@", b"a b@example.com", b"tab\there@example.com"]),
    st.binary(max_size=20).map(
        lambda b: b.replace(b"\n", b"").replace(b"\0", b"") + b"@example.com"),
    st.integers(890, 905).map(lambda n: b"a" * (n - 12) + b"@example.com"))

ARG_FORM = st.sampled_from([b"<%s>", b" <%s>", b"%s", b":%s", b":<%s> SIZE=10", b": %s x",
                            b":  <%s", b"<%s>>"])


@st.composite
def command(draw) -> bytes:
    kind = draw(st.sampled_from(["helo", "ehlo", "mail", "rcpt", "rcpt", "rcpt", "data",
                                 "rset", "noop", "vrfy", "help", "junk", "blank"]))
    verb_case = draw(st.sampled_from([str.upper, str.lower, str.title]))
    if kind in ("mail", "rcpt"):
        verb = verb_case(kind).encode()
        word = draw(st.sampled_from([b" FROM", b" TO", b" from", b"", b" TO "]))
        form = draw(ARG_FORM)
        arg = form.replace(b"%s", draw(ADDR)) if b"%s" in form else form
        return verb + word + arg
    if kind in ("helo", "ehlo"):
        name = draw(st.sampled_from([b"client", b"Client.Example", b"", b" spaced  name",
                                     b"b\xffyte", b"[192.0.2.1]"]))
        return verb_case(kind).encode() + (b" " + name if name is not None else b"")
    if kind == "junk":
        return draw(st.binary(max_size=30)).replace(b"\n", b"")
    if kind == "blank":
        return b""
    return verb_case(kind).encode() + draw(st.sampled_from([b"", b" x", b"  "]))


BODY_LINE = st.one_of(
    st.sampled_from([b"", b".", b"..", b"...x", b".x", b"Received: by x", b"DELIVERED-TO: y",
                     b"Subject: hi", b"\r", b"a\rb", b"trailing cr\r", b". ", b"\x00nul"]),
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")))


@st.composite
def message(draw) -> bytes:
    lines = draw(st.lists(BODY_LINE, max_size=12))
    out = b"".join(line + b"\r\n" for line in lines)
    if draw(st.integers(0, 9)) == 0:                     # now and then a bare LF
        pos = draw(st.integers(0, len(out)))
        out = out[:pos] + b"\n" + out[pos:]
    return out + b".\r\n"


@st.composite
def conversation(draw) -> bytes:
    parts = []
    for _ in range(draw(st.integers(1, 12))):
        cmd = draw(command())
        ending = draw(st.sampled_from([b"\r\n", b"\r\n", b"\n", b"\r\r\n"]))
        parts.append(cmd + ending)
        if cmd.lower().startswith(b"data"):
            parts.append(draw(message()))
    if draw(st.booleans()):
        parts.append(b"QUIT\r\n")
    return b"".join(parts)


ENVS = st.fixed_dictionaries({}, optional={
    "TCPREMOTEHOST": st.sampled_from(["client", "CLIENT.example", "we ird"]),
    "TCPREMOTEIP": st.sampled_from(["192.0.2.7", "::1"]),
    "TCPREMOTEINFO": st.sampled_from(["ident", ""]),
    "TCPLOCALHOST": st.sampled_from(["mx.local", ""]),
    "TCPLOCALIP": st.sampled_from(["10.0.0.1"]),
    "RELAYCLIENT": st.sampled_from(["", "@relay"]),
    "DATABYTES": st.sampled_from(["0", "20", "abc", "4294967296"]),
})


@settings(max_examples=int(os.environ.get("SMTP_REFERENCE_EXAMPLES", "300")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=conversation(), env=ENVS)
def test_generated_sessions_match_qmail_smtpd(pair, data, env):
    same(pair, data, **env)
