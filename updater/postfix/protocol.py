"""Postfix's two lookup protocols over validrcptto.cdb, I/O-free (bytes in, bytes out).

``Conversation.receive_data(bytes)`` returns the bytes to send back and whether the
connection must be closed; the lookups come in as a function.  One connection speaks
one protocol, told apart by its first byte: a netstring (socketmap) starts with a
digit, a policy request (``name=value`` lines) with a letter.

- **Policy delegation** (SMTPD_POLICY_README): ``name=value`` lines up to an empty line,
  answered with ``action=...`` and an empty line; the connection is reused.  Only
  ``protocol_state=RCPT`` is decided; every other state, and a recipient whose domain
  is not ours (rcpthosts), gets ``DUNNO`` so that Postfix's own rules go on.
- **socketmap** (Postfix 2.10+): a netstring ``NAME KEY`` answered with a netstring
  ``OK valid``, ``NOTFOUND `` or ``TEMP reason``.  Postfix falls back from
  ``user@domain`` to ``@domain`` when a lookup finds nothing, so a key that is only
  ``@domain`` always answers NOTFOUND: the answer for the whole address already took
  the domain's catch-all into account.

Bounded: a request over POLICY_MAX_REQUEST bytes, a netstring with a bad length, a line with
no ``=``, a NUL or anything that is not text closes the connection (one error logged by
the driver).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..limits import POLICY_BATCH, POLICY_MAX_ATTRIBUTES, POLICY_MAX_REQUEST


@dataclass(frozen=True)
class Answer:
    """A decision: ``accepted`` None means "not ours to decide" (DUNNO)."""
    accepted: bool | None
    address: bytes
    key: bytes | None = None          # the cdb key that decided
    unavailable: str = ""             # why the cdb could not be read


@dataclass(frozen=True)
class PolicySettings:
    # Postfix writes "550 5.1.1 <ADDRESS>: Recipient address rejected: " before the text
    reject: str = "REJECT 5.1.1 not in my validrcptto list"
    unavailable: str = "DEFER_IF_PERMIT 4.3.0 recipient list temporarily unavailable"
    map_name: bytes = b"validrcptto"


# VALIDRCPTTO_REPLY=550 (when no --reject-action is given): qmail's own words, as
# validrcptto-smtpd then answers
NOMAILBOX_ACTION = "550 5.1.1 sorry, no mailbox here by that name"


Decide = Callable[[bytes], Answer]     # address -> Answer (the checker over the cdb)


@dataclass
class Reply:
    data: bytes
    answer: Answer | None             # for the log line
    close: bool = False
    error: str = ""                   # why the connection is closed


class Conversation:
    """One client connection."""

    def __init__(self, decide: Decide, settings: PolicySettings = PolicySettings()):
        self.decide, self.s = decide, settings
        self.buf = b""
        self.kind: str | None = None            # "policy" or "socketmap"
        self.closed = False
        self.more = False                       # whole requests wait for proceed()

    def receive_data(self, data: bytes) -> list[Reply]:
        """The answers to at most POLICY_BATCH requests of what came so far; when more
        whole requests wait (``more``), the driver calls ``proceed()`` for the next
        batch once the client reads its answers (a pipelining client cannot make one
        call do unbounded work, nor the output grow without bound)."""
        if self.closed:
            return []
        self.buf += data
        if self.kind is None and self.buf:
            self.kind = "socketmap" if self.buf[:1].isdigit() else "policy"
        out: list[Reply] = []
        self.more = False
        while not self.closed:
            if len(out) >= POLICY_BATCH:
                self.more = True
                return out
            reply = self._policy() if self.kind == "policy" else self._socketmap()
            if reply is None:
                break
            out.append(reply)
            if reply.close:
                self.closed = True
                self.buf = b""
        if not self.closed and len(self.buf) > POLICY_MAX_REQUEST:
            out.append(self._fail(f"request larger than {POLICY_MAX_REQUEST} bytes"))
        return out

    def proceed(self) -> list[Reply]:
        """The next batch of answers to requests already received."""
        return self.receive_data(b"")

    @property
    def partial(self) -> bool:
        """Part of a request has come and not the rest (the request deadline runs)."""
        return bool(self.buf) and not self.more and not self.closed

    def _fail(self, why: str) -> Reply:
        self.closed = True
        self.buf = b""
        return Reply(b"", None, True, why)

    # ---- policy delegation
    def _policy(self) -> Reply | None:
        end = self.buf.find(b"\n\n")
        if end == -1:
            if self.buf == b"\n":                 # an empty request
                return self._fail("empty policy request")
            return None
        block, self.buf = self.buf[:end + 1], self.buf[end + 2:]
        if len(block) > POLICY_MAX_REQUEST:
            return self._fail(f"request larger than {POLICY_MAX_REQUEST} bytes")
        attrs: dict[bytes, bytes] = {}
        lines = block.split(b"\n")[:-1]
        if len(lines) > POLICY_MAX_ATTRIBUTES:
            return self._fail(f"more than {POLICY_MAX_ATTRIBUTES} attributes")
        for line in lines:
            name, eq, value = line.partition(b"=")
            if not eq or not name or b"\0" in line or not _text(name):
                return self._fail("malformed policy request line")
            attrs[name] = value
        if attrs.get(b"protocol_state", b"").upper() != b"RCPT" or b"recipient" not in attrs:
            return Reply(b"action=DUNNO\n\n", None)
        answer = self.decide(canonical(attrs[b"recipient"]))
        if answer.unavailable:
            action = self.s.unavailable
        elif answer.accepted is False:
            action = self.s.reject.replace(
                "{address}", answer.address.decode("utf-8", "backslashreplace"))
        else:
            action = "DUNNO"
        return Reply(b"action=" + action.encode("utf-8", "backslashreplace") + b"\n\n", answer)

    # ---- socketmap
    def _socketmap(self) -> Reply | None:
        if not self.buf:
            return None
        colon = self.buf.find(b":", 0, 8)
        if colon == -1:
            if len(self.buf) >= 8 or not self.buf.isdigit():
                return self._fail("malformed netstring length")
            return None
        digits = self.buf[:colon]
        if not digits.isdigit() or (len(digits) > 1 and digits[:1] == b"0"):
            return self._fail("malformed netstring length")
        size = int(digits)
        if size > POLICY_MAX_REQUEST:
            return self._fail(f"netstring longer than {POLICY_MAX_REQUEST} bytes")
        start = colon + 1
        if len(self.buf) < start + size + 1:
            return None
        if self.buf[start + size:start + size + 1] != b",":
            return self._fail("netstring without its comma")
        payload, self.buf = self.buf[start:start + size], self.buf[start + size + 1:]
        name, sp, key = payload.partition(b" ")
        if not sp or not key or b"\0" in payload:
            return self._fail("malformed socketmap request")
        if name != self.s.map_name:
            return Reply(netstring(b"PERM unknown map " + name[:64]), None)
        if key.startswith(b"@"):                  # Postfix's fallback: see the docstring
            return Reply(netstring(b"NOTFOUND "), Answer(False, key))
        answer = self.decide(canonical(key))
        if answer.unavailable:
            return Reply(netstring(b"TEMP " + answer.unavailable.encode()[:200]), answer)
        if answer.accepted is False or answer.accepted is None:
            return Reply(netstring(b"NOTFOUND "), answer)
        return Reply(netstring(b"OK valid"), answer)


def canonical(address: bytes) -> bytes:
    """The recipient as Postfix routes it: the trailing dots of its domain dropped
    (``user@example.net.`` is delivered as ``user@example.net``, so it must be judged
    as that, or a trailing dot would be a way past the list), and ``<...>`` around it
    removed.  Case is the checker's business (ASCII only, as qmail-smtpd)."""
    if address.startswith(b"<") and address.endswith(b">"):
        address = address[1:-1]
    at = address.rfind(b"@")
    if at >= 0 and address.endswith(b"."):
        address = address[:at + 1] + address[at + 1:].rstrip(b".")
    return address


def netstring(data: bytes) -> bytes:
    return b"%d:%s," % (len(data), data)


def _text(name: bytes) -> bool:
    return all(33 <= b < 127 for b in name)
