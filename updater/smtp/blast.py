"""The DATA phase: the message from 354 to qmail-queue's verdict (``Message``, a
sub-machine the session drives), and qmail-smtpd's blast() as a decoder over whole
runs of lines (``DataDecoder``, pure).

The message ends at CRLF.CRLF; dot-stuffing is undone, CRLF turned into LF (other CRs
kept), and a bare LF is fatal; Received and Delivered-To header fields are counted on
the raw stream (for the hop limit).  Whole runs of complete lines go through bytes
methods, so the cost per byte is C's, whatever the line lengths.
"""

from __future__ import annotations

import re
from typing import Any

from ..limits import MAXHOPS
from .events import QueueAbort, QueueClose, QueueData, Reply
from .replies import R_GO_AHEAD, R_HOPS, R_SIZE, R_STRAYLF, qq_reply, queued

# blast()'s states
IN_LINE = 0           # inside a line
LINE_START = 1        # at the start of a line
DOT = 2               # after a leading dot
DOT_CR = 3            # after a leading dot and a CR
CR = 4                # after a CR inside a line

# Inside a run of complete lines (no bare LF, no terminator), a leading dot is removed
# unless a CR follows it (blast() keeps ".\r" when no LF comes next).
_UNSTUFF = re.compile(rb"\n\.(?!\r)")

Step = tuple[int, "bool | None"]      # (next position, end: True / False / None = go on)


class DataDecoder:
    """One message's decoder: ``feed`` it the client's bytes as they come."""

    def __init__(self) -> None:
        self.state = LINE_START
        self.hops = 0
        self.in_header = True
        self.head = b""          # first bytes (up to 9) of the current raw line

    def feed(self, data: bytes) -> tuple[list[bytes], int, bool | None]:
        """Returns (output pieces, bytes consumed, end): end is True after the
        terminating line, False on a bare LF (the session must die), None when more
        input is needed (everything was consumed)."""
        out: list[bytes] = []
        i, n = 0, len(data)
        end: bool | None = None
        steps = (self._in_line, self._line_start, self._dot, self._dot_cr, self._in_line)
        while i < n and end is None:
            i, end = steps[self.state](data, i, n, out)
        if self.in_header and self.hops < MAXHOPS:
            self._count(data[:i] if end is not False else data[:n])
        return out, i, end

    def _line_start(self, data: bytes, i: int, n: int, out: list[bytes]) -> Step:
        c = data[i]
        if c == 10:
            return i, False
        if c == 46 and (n - i < 3 or data[i + 1:i + 3] == b"\r\n"):
            self.state = DOT                                   # maybe the terminator
            return i + 1, None
        last = data.rfind(b"\n", i)
        if last != -1:
            stop = data.find(b"\n.\r\n", i, last + 1)         # the terminator's LF
            if stop == -1:
                stop = last
            run = data[i:stop + 1]
            if run.count(b"\n") != run.count(b"\r\n"):
                # a bare LF: emit the lines before its line, which then fails
                k = data.find(b"\n", i)
                while data[k - 1] == 13:
                    k = data.find(b"\n", k + 1)
                stop = data.rfind(b"\n", i, k)
                run = data[i:stop + 1] if stop != -1 else b""
            if run:
                if c == 46 or b"\n." in run:
                    run = b"\n" + run
                    run = (_UNSTUFF.sub(b"\n", run) if b"\n.\r" in run
                           else run.replace(b"\n.", b"\n"))[1:]
                out.append(run.replace(b"\r\n", b"\n"))
                return stop + 1, None
        if c == 46:
            self.state = DOT
            return i + 1, None
        self.state = IN_LINE
        return i, None

    def _dot(self, data: bytes, i: int, n: int, out: list[bytes]) -> Step:
        c = data[i]
        if c == 10:
            return i, False
        if c == 13:
            self.state = DOT_CR
            return i + 1, None
        self.state = IN_LINE                                   # the dot is dropped
        return i, None

    def _dot_cr(self, data: bytes, i: int, n: int, out: list[bytes]) -> Step:
        c = data[i]
        if c == 10:
            return i + 1, True
        out.append(b".\r")
        if c == 13:
            self.state = CR
        else:
            out.append(bytes((c,)))
            self.state = IN_LINE
        return i + 1, None

    def _in_line(self, data: bytes, i: int, n: int, out: list[bytes]) -> Step:
        k = data.find(b"\n", i)
        pending = b"\r" if self.state == CR else b""
        if k == -1:
            chunk = data[i:]
            if chunk.endswith(b"\r"):
                out.append(pending + chunk[:-1])
                self.state = CR
            else:
                out.append(pending + chunk)
                self.state = IN_LINE
            return n, None
        if k == i:
            if self.state != CR:
                return i, False
            out.append(b"\n")
        else:
            if data[k - 1] != 13:
                return i, False
            out.append(pending + data[i:k - 1] + b"\n")
        self.state = LINE_START
        return k + 1, None

    def _count(self, raw: bytes) -> None:
        """Count on complete raw lines only (case-insensitively, with bytes.count); keep
        the first bytes of the partial line for the next call."""
        text = self.head + raw
        last = text.rfind(b"\n")
        self.head = text[last + 1:last + 10]
        if last == -1:
            return
        low = b"\n" + text[:last + 1].lower()         # every line now follows a LF
        blank = low.find(b"\n\r\n")
        if blank != -1:
            low = low[:blank + 1]
            self.in_header = False
        self.hops += low.count(b"\nreceived") + low.count(b"\ndelivered")


# --------------------------------------------------------------------------- the message

class Message:
    """The DATA sub-machine: one message from 354 to qmail-queue's verdict.  It returns
    its events and says where it ended; only the session assigns the session's state."""

    def __init__(self, qp: int, envelope: bytes, limit: int):
        self.qp = qp
        self.envelope = envelope         # F<sender>\0T<rcpt>\0...\0, as qmail-queue reads it
        self.limit = limit               # DATABYTES (0: none)
        self.decoder = DataDecoder()
        self.size = 0

    @staticmethod
    def begin(received: bytes) -> list[Any]:
        """qmail-queue is running: 354, and the Received line goes first."""
        return [Reply(R_GO_AHEAD), QueueData(received)]

    def absorb(self, buf: bytes) -> tuple[list[Any], int, bool | None]:
        """Feed the client's bytes to the decoder; the message goes on to qmail-queue
        up to DATABYTES.  Returns (events, bytes used, end): end True once the message
        is complete (the events close the queue, with no envelope when it must fail),
        False on a bare LF (the events abort it; the session must hang up)."""
        ev: list[Any] = []
        pieces, used, end = self.decoder.feed(buf)
        limit = self.limit
        for piece in pieces:
            if not piece:
                continue
            before = self.size
            self.size += len(piece)
            if limit and self.size > limit:
                if before < limit:
                    ev.append(QueueData(piece[:limit - before]))
            else:
                ev.append(QueueData(piece))
        if end is False:
            ev += [QueueAbort(), Reply(R_STRAYLF)]
        elif end:
            ev.append(QueueClose(None if self.failed else self.envelope))
        return ev, used, end

    @property
    def failed(self) -> bool:
        """Too many hops, or over DATABYTES: refused whatever qmail-queue says."""
        return self.decoder.hops >= MAXHOPS or bool(self.limit) and self.size > self.limit

    def finish(self, status: int | None, write_failed: bool, now: float) -> tuple[bytes, str]:
        """qmail-queue's exit status: (the reply to the message, what it counts as)."""
        reply = qq_reply(status, write_failed or self.failed)
        if reply is None:
            reply = queued(now, self.qp)
        elif self.decoder.hops >= MAXHOPS:
            reply = R_HOPS
        elif self.failed:
            reply = R_SIZE
        counted = "message.queued" if reply.startswith(b"250") else \
            "message.rejected" if reply.startswith(b"5") else "message.tempfail"
        return reply, counted
