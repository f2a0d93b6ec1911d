"""The events of the SMTP protocol core (``session.Session``), and its contract.

``Session.receive_data(bytes)`` takes what the client sent and returns events for the
driver to carry out, in order:

- ``Reply(data)``       write these bytes to the client;
- ``Log(text)``         one log line (already escaped), without the ``PROG[PID]: `` prefix;
- ``QueueOpen()``       start qmail-queue, then call ``queue_opened(qp)`` (its pid) or
                        ``queue_opened(None)`` when it could not be started;
- ``QueueData(data)``   write these message bytes to qmail-queue's fd 0;
- ``QueueClose(envelope)``  close fd 0; write ``envelope`` to fd 1 (``None``: write
                        nothing, the message failed) and close it; wait for the exit, then
                        call ``queue_closed(status, write_failed)``;
- ``QueueAbort()``      the message is abandoned: close both pipes, reap qmail-queue;
- ``StartTls()``        do the TLS handshake, then call ``tls_started()`` (or close the
                        connection when it fails);
- ``CheckPassword(user, password)``  run the checkpassword program, then call
                        ``auth_result(its exit code, or None when it hung or failed)``;
- ``Close()``           flush the replies so far and close the connection.

A driver carries out every event, answering QueueOpen, QueueClose, StartTls and
CheckPassword with their callback, before it feeds the session more input; a callback
in any other state raises ``ProtocolError`` (as h11's ``LocalProtocolError`` does).

A driver feeds one read at a time and carries out every event before it reads again, so
the session holds at most one read plus one partial command line (4 KiB).  After SMTP_BATCH
command lines a call stops with ``pending`` true until the driver calls ``proceed()``,
so a client that pipelines without reading gets at most about SMTP_BATCH replies ahead.  The
controls, the lookups, the clocks and the queue come from outside; ``check_timeout()``
turns a passed ``deadline`` into qmail's ``451 timeout``.

Plain slotted classes: the tcpserver front end builds these once per connection, and
NamedTuple classes cost milliseconds to create.
"""

from __future__ import annotations

import enum

TYPE_CHECKING = False          # (typing is not imported: start-up counts here)
if TYPE_CHECKING:
    from typing import Any


class ProtocolError(Exception):
    """A driver called a session callback in a state that does not expect it."""


class _Record:
    __slots__: tuple[str, ...] = ()

    def __init__(self, *args: Any, **kw: Any):
        for name, value in zip(self.__slots__, args):
            setattr(self, name, value)
        for name in self.__slots__[len(args):]:
            setattr(self, name, kw.pop(name) if name in kw else self._defaults[name])
        if kw:
            raise TypeError(f"unknown fields {sorted(kw)}")

    _defaults: dict[str, Any] = {}

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and \
            all(getattr(self, n) == getattr(other, n) for n in self.__slots__)

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"{type(self).__name__}({fields})"

    def _replace(self, **kw: Any) -> Any:
        return type(self)(**{n: kw.get(n, getattr(self, n)) for n in self.__slots__})


Event = _Record                 # what Session's methods return a list of


class Reply(_Record):
    __slots__ = ("data",)
    data: bytes


class Pause(_Record):
    """Wait this long before carrying out the events after it (the tarpit: the reply
    to a refused RCPT); the session takes no input meanwhile."""
    __slots__ = ("seconds",)
    seconds: float


class Log(_Record):
    __slots__ = ("text",)
    text: str


class QueueOpen(_Record):
    __slots__ = ()


class QueueData(_Record):
    __slots__ = ("data",)
    data: bytes


class QueueClose(_Record):
    __slots__ = ("envelope",)
    envelope: bytes | None


class QueueAbort(_Record):
    __slots__ = ()


class Close(_Record):
    __slots__ = ()


class StartTls(_Record):
    """Start the TLS handshake now, then call ``tls_started()`` (or close on failure)."""
    __slots__ = ()


class CheckPassword(_Record):
    """Run the checkpassword program; then ``auth_result(exit code or None)``."""
    __slots__ = ("user", "password")
    user: bytes
    password: bytes

    def __repr__(self) -> str:                    # never the password, not even in a repr
        return f"CheckPassword(user={self.user!r}, password=...)"


# --------------------------------------------------------------------------- states

class State(enum.Enum):
    COMMAND = "reading commands"
    AUTH = "reading an AUTH response"
    DATA = "reading the message"
    QUEUE_OPENING = "waiting for queue_opened()"
    QUEUE_CLOSING = "waiting for queue_closed()"
    CHECKING_PASSWORD = "waiting for auth_result()"
    TLS_STARTING = "waiting for tls_started()"
    DONE = "closed"


(COMMAND, AUTH, DATA, QUEUE_OPENING, QUEUE_CLOSING, CHECKING_PASSWORD, TLS_STARTING,
 DONE) = State
_READING_LINES = (COMMAND, AUTH)
_READING = (COMMAND, DATA, AUTH)

# which driver callback is legal in which state (any other call raises ProtocolError)
CALLBACKS = {"queue_opened": QUEUE_OPENING, "queue_closed": QUEUE_CLOSING,
             "auth_result": CHECKING_PASSWORD, "tls_started": TLS_STARTING}
