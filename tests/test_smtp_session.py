"""The SMTP protocol core alone: no sockets, no processes, a fake clock.  The DATA decoder
is compared with a byte-at-a-time model of qmail-smtpd's blast() written here."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from updater import limits
from updater.smtp import blast
from updater.smtp import context as P
from updater.smtp import events as E
from updater.smtp import replies as R
from updater.smtp import session as S

CONTROLS = P.Controls(greeting=b"mx.example.com", liphost=b"mx.example.com",
                      rcpthosts=frozenset({b"example.com"}), badmailfrom=None, databytes=0,
                      timeout=60)
CDB = {b"joe@example.com": b"", b"bob-default@example.com": b"", b"neg@example.com": b"-"}


class Clock:
    def __init__(self):
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def make(policy=P.Policy(), controls=CONTROLS, **peer):
    clock = Clock()
    s = S.Session(controls, P.Peer(**peer), policy, validrcptto=CDB.get, clock=clock,
                  monotonic=clock)
    return s, clock


def replies(events) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, E.Reply))


# --------------------------------------------------------------------------- a model of blast()

def blast_model(stream: bytes):  # noqa: C901 (the C code's shape, on purpose)
    """qmail-smtpd.c blast(), one byte at a time: (message, hops, 'end'|'stray'|'more')."""
    out = bytearray()
    state, hops, inheader, pos = 1, 0, True, 0
    mx = my = mz = True
    for ch in stream:
        c = bytes((ch,))
        if inheader:
            if pos < 9:
                if c.lower() != b"delivered"[pos:pos + 1]:
                    mz = False
                if mz and pos == 8:
                    hops += 1
                if pos < 8:
                    if c.lower() != b"received"[pos:pos + 1]:
                        mx = False
                    if mx and pos == 7:
                        hops += 1
                if pos < 2:
                    if c != b"\r\n"[pos:pos + 1]:
                        my = False
                    if my and pos == 1:
                        inheader = False
                pos += 1
            if c == b"\n":
                pos, mx, my, mz = 0, True, True, True
        if state == 0:
            if c == b"\n":
                return bytes(out), hops, "stray"
            if c == b"\r":
                state = 4
                continue
        elif state == 1:
            if c == b"\n":
                return bytes(out), hops, "stray"
            if c == b".":
                state = 2
                continue
            if c == b"\r":
                state = 4
                continue
            state = 0
        elif state == 2:
            if c == b"\n":
                return bytes(out), hops, "stray"
            if c == b"\r":
                state = 3
                continue
            state = 0
        elif state == 3:
            if c == b"\n":
                return bytes(out), hops, "end"
            out += b".\r"
            if c == b"\r":
                state = 4
                continue
            state = 0
        elif state == 4:
            if c == b"\n":
                state = 1
            elif c != b"\r":
                out += b"\r"
                state = 0
        out += c
    return bytes(out), hops, "more"


def decode(stream: bytes, cuts: list[int]):
    d = blast.DataDecoder()
    out = []
    pieces = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
    for piece in pieces:
        buf = piece
        while buf:
            got, used, end = d.feed(buf)
            out += got
            if end is not None:
                return b"".join(out), min(d.hops, 100), "end" if end else "stray"
            buf = buf[used:]
    return b"".join(out), min(d.hops, 100), "more"


ATOMS = st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"..", b"\r\n.\r\n", b".\r", b"x",
                         b"Received: y", b"DELIVERED-to", b"\r\n\r\n", b"rEcEiVeD", b"\x00",
                         b"abc def", b"\r\r\n", b".\r\r\n", b".\rX"])


@settings(max_examples=2000, deadline=None)
@given(st.lists(ATOMS, max_size=40), st.lists(st.integers(0, 400), max_size=6))
def test_decoder_is_blast(atoms, cuts):
    stream = b"".join(atoms)
    cuts = sorted({c for c in cuts if 0 < c < len(stream)})
    want_msg, want_hops, want_end = blast_model(stream)
    got_msg, got_hops, got_end = decode(stream, cuts)
    assert got_end == want_end
    if want_end == "end":
        assert got_msg == want_msg
        assert got_hops == min(want_hops, 100)
    elif want_end == "more":
        # everything emitted so far is a prefix of what blast() would have put
        assert want_msg.startswith(got_msg)


def test_decoder_keeps_up_with_long_headers_in_small_pieces():
    stream = b"".join(b"Received: from host%d by relay\r\n" % i for i in range(120)) + \
        b"\r\nbody\r\n.\r\n"
    _, hops, end = decode(stream, list(range(7, len(stream), 7)))
    assert (hops, end) == (100, "end")


# --------------------------------------------------------------------------- the session

def test_pipelined_commands_get_replies_in_order():
    s, _ = make()
    ev = s.start() + s.receive_data(b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<joe@example.com>\r\n"
                                    b"RCPT TO:<nobody@example.com>\r\nRCPT TO:<x@elsewhere>\r\n"
                                    b"NOOP\r\nQU")
    assert replies(ev) == (b"220 mx.example.com ESMTP\r\n250-mx.example.com\r\n"
                           b"250-PIPELINING\r\n250 8BITMIME\r\n250 ok\r\n250 ok\r\n" + R.R_NOTVALID
                           + R.R_NOGATEWAY + b"250 ok\r\n")
    ev = s.receive_data(b"IT\r\nNOOP\r\n")
    assert replies(ev) == b"221 mx.example.com\r\n" and isinstance(ev[-1], E.Close)
    assert s.closed and s.quit


def test_limit_sequence_counts_per_connection():
    s, _ = make(P.Policy(limit=3))
    s.start()
    ev = s.receive_data(b"MAIL FROM:<a@b>\r\nRCPT TO:<x@example.com>\r\n"
                        b"RCPT TO:<joe@example.com>\r\n"
                        b"RSET\r\nHELO y\r\nMAIL FROM:<a@b>\r\nRCPT TO:<neg@example.com>\r\n"
                        b"RCPT TO:<y@elsewhere.org>\r\nRCPT TO:<z@example.com>\r\nNOOP\r\n")
    assert replies(ev) == (b"250 ok\r\n" + R.R_NOTVALID + b"250 ok\r\n250 flushed\r\n"
                           b"250 mx.example.com\r\n250 ok\r\n" + R.R_NOTVALID + R.R_NOGATEWAY
                           + R.R_TOOMANY)
    assert [e.text for e in ev if isinstance(e, E.Log)][-1] == \
        "validrcptto [unknown] excessive violations, hanging up"
    assert isinstance(ev[-1], E.Close) and s.closed and not s.quit


def test_data_states_and_queue_events():
    s, clock = make(remoteip=b"192.0.2.9")
    s.start()
    ev = s.receive_data(b"DATA\r\nMAIL FROM:<a@b>\r\nDATA\r\nRCPT TO:<joe@example.com>\r\n"
                        b"DATA\r\nSubject: x\r\n\r\n..dot\r\n.\r\nNOOP\r\n")
    assert replies(ev) == R.R_MAILFIRST + b"250 ok\r\n" + R.R_RCPTFIRST + b"250 ok\r\n"
    assert isinstance(ev[-1], E.QueueOpen)
    ev = s.queue_opened(4242)
    assert replies(ev) == b"354 go ahead\r\n"
    data = b"".join(e.data for e in ev if isinstance(e, E.QueueData))
    assert data == (b"Received: from unknown (192.0.2.9)\n  by unknown with SMTP; "
                    b"12 Jan 1970 13:46:40 -0000\nSubject: x\n\n.dot\n")
    assert ev[-1] == E.QueueClose(b"Fa@b\0Tjoe@example.com\0\0")
    clock.now += 5
    ev = s.queue_closed(0)
    assert replies(ev) == b"250 ok 1000005 qp 4242\r\n250 ok\r\n"     # then the NOOP


def test_queue_failures():
    s, _ = make()
    s.start()
    s.receive_data(b"MAIL FROM:<a@b>\r\nRCPT TO:<joe@example.com>\r\nDATA\r\n")
    assert replies(s.queue_opened(None)) == R.R_QQT
    assert replies(s.receive_data(b"DATA\r\n")) == R.R_MAILFIRST      # as qmail: seenmail = 0
    s.receive_data(b"MAIL FROM:<a@b>\r\nRCPT TO:<joe@example.com>\r\nDATA\r\n")
    s.queue_opened(1)
    s.receive_data(b"x\r\n.\r\n")
    assert replies(s.queue_closed(0, write_failed=True)) == b"451 qq read error (#4.3.0)\r\n"


def test_databytes_stops_forwarding():
    s, _ = make(controls=CONTROLS._replace(databytes=10))
    s.start()
    s.receive_data(b"MAIL FROM:<a@b>\r\nRCPT TO:<joe@example.com>\r\nDATA\r\n")
    ev = s.queue_opened(1)
    ev += s.receive_data(b"0123456789abcdef\r\n" * 1000 + b".\r\n")
    body = b"".join(e.data for e in ev[2:] if isinstance(e, E.QueueData))
    assert body == b"0123456789" and ev[-1] == E.QueueClose(None)
    assert replies(s.queue_closed(91)) == R.R_SIZE


def test_bare_lf_in_data_kills_the_session():
    s, _ = make()
    s.start()
    s.receive_data(b"MAIL FROM:<a@b>\r\nRCPT TO:<joe@example.com>\r\nDATA\r\n")
    s.queue_opened(1)
    ev = s.receive_data(b"fine\r\nbare\nQUIT\r\n")
    assert [type(e) for e in ev][-3:] == [E.QueueAbort, E.Reply, E.Close]
    assert replies(ev) == R.R_STRAYLF and s.closed


def test_timeouts_follow_the_clock():
    s, clock = make()
    s.start()
    clock.now += 59
    assert s.check_timeout() == []
    s.receive_data(b"NOOP\r\n")                    # input moves the deadline
    clock.now += 59
    assert s.check_timeout() == []
    clock.now += 2
    assert s.check_timeout() == [E.Reply(R.R_TIMEOUT), E.Close()]
    s, clock = make()
    s.receive_data(b"MAIL FROM:<a@b>\r\nRCPT TO:<joe@example.com>\r\nDATA\r\n")
    s.queue_opened(1)
    clock.now += 61
    assert s.check_timeout() == [E.QueueAbort(), E.Reply(R.R_TIMEOUT), E.Close()]


def test_overlong_line_and_input_bound():
    s, _ = make()
    ev = s.receive_data(b"X" * 5000)
    assert ev == [] and len(s.buf) == 0           # discarded, not buffered
    ev = s.receive_data(b"Y" * 100000 + b"\r\nNOOP\r\n")
    assert replies(ev) == R.R_TOOLONG + b"250 ok\r\n"


def test_maxrcpt_and_small_memory_per_recipient():
    s, _ = make(P.Policy(maxrcpt=3), relayclient=b"")
    s.receive_data(b"MAIL FROM:<a@b>\r\n" + b"RCPT TO:<r@x>\r\n" * 5)
    assert replies(s.receive_data(b"NOOP\r\n")) == b"250 ok\r\n"
    assert s.env.nrcpt == 3 and bytes(s.env.rcptto) == b"Tr@x\0" * 3
    s, _ = make(relayclient=b"")
    s.receive_data(b"MAIL FROM:<a@b>\r\n" + b"RCPT TO:<someone@catchall.example>\r\n" * 200000)
    while s.pending:
        s.proceed()
    assert s.env.nrcpt == 200000 and len(s.env.rcptto) == 200000 * 26


def test_log_lines_per_rcpt_are_capped():
    s, _ = make(P.Policy(loglevel=2))
    ev = s.receive_data(b"MAIL FROM:<a@b>\r\nRCPT TO:<" + b"-" * 880 + b"@example.com>\r\n")
    logs = [e.text for e in ev if isinstance(e, E.Log)]
    assert len(logs) == 1 + limits.TRY_LOG_MAX + 1 + 1   # RCPT TO, tries, "more", not found
    assert logs[-2].endswith("more keys not logged)")
    assert replies(ev).endswith(R.R_NOTVALID)


def test_log_escapes_client_bytes():
    s, _ = make(P.Policy(loglevel=1))
    ev = s.receive_data(b"MAIL FROM:<a@b>\r\nRCPT TO:<x\x1b[2J\r@example.com>\r\n")
    for e in ev:
        if isinstance(e, E.Log):
            assert all(32 <= ord(c) < 127 for c in e.text), e.text


def test_replies_come_in_batches_a_driver_can_pace():
    """A client that pipelines thousands of commands without reading gets at most
    BATCH replies per call; the rest waits in the session (bounded by one read) until
    the driver asks for it with proceed()."""
    s, _ = make()
    flood = b"HELP\r\n" * 1000 + b"\n" * 1000 + b"NOOP\r\n"
    got = [s.receive_data(flood)]
    while s.pending:
        assert len(got[-1]) == limits.SMTP_BATCH
        got.append(s.proceed())
    out = b"".join(replies(ev) for ev in got)
    assert out == R.R_HELP * 1000 + R.R_UNIMPL * 1000 + b"250 ok\r\n"
    assert not s.pending and s.proceed() == []
    assert replies(s.receive_data(b"NOOP\r\n")) == b"250 ok\r\n"


def test_a_driver_callback_is_legal_only_in_the_state_that_waits_for_it():
    """h11's LocalProtocolError, here ProtocolError: a queue, TLS or AUTH answer the
    session did not ask for is a driver bug, never a silent state change."""
    import pytest
    s, _ = make(policy=P.Policy(tls=True))
    s.start()
    for call in (lambda: s.queue_opened(123), lambda: s.queue_closed(0),
                 lambda: s.auth_result(0), lambda: s.tls_started()):
        with pytest.raises(E.ProtocolError, match="while reading commands"):
            call()
    ev = s.receive_data(b"HELO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<joe@example.com>\r\nDATA\r\n")
    assert isinstance(ev[-1], E.QueueOpen) and s.mode is E.State.QUEUE_OPENING
    with pytest.raises(E.ProtocolError, match=r"queue_closed\(\) while waiting for "
                       r"queue_opened\(\)"):
        s.queue_closed(0)
    assert replies(s.queue_opened(42)).startswith(b"354 ")
    with pytest.raises(E.ProtocolError):
        s.queue_opened(43)
    s.receive_data(b".\r\n")
    assert s.mode is E.State.QUEUE_CLOSING
    assert replies(s.queue_closed(0)).startswith(b"250 ok ")
    assert replies(s.receive_data(b"STARTTLS\r\n")) == R.R_TLS_READY
    assert s.mode is E.State.TLS_STARTING
    s.tls_started()
    assert s.mode is E.State.COMMAND


def test_bytes_after_starttls_are_refused_before_any_event_is_emitted():
    s, _ = make(policy=P.Policy(tls=True))
    s.start()
    ev = s.receive_data(b"STARTTLS\r\nEHLO evil\r\n")
    assert ev == [E.Reply(R.R_TLS_PIPELINED)] and s.mode is E.State.COMMAND
    assert replies(s.receive_data(b"NOOP\r\n")) == b"250 ok\r\n"
