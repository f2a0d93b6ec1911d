"""What a session is set up with: the control files' values (``Controls``), the
connection's tcpserver environment (``Peer``) and the per-connection policy
(``Policy``), and the readers of those from an environment."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from ..limits import TARPIT_MAX
from .events import _Record

DEFAULT_TIMEOUT = 1200
DEFAULT_LIMIT = 10
Lookup = Callable[[bytes], "bytes | None"]   # a cdb's get(key)


def scan_ulong(text: str | bytes | None) -> int:
    """C scan_ulong: the leading ASCII digits (modulo 2**64), 0 when there are none."""
    if isinstance(text, str):
        text = text.encode("latin-1", "replace")
    digits = re.match(rb"[0-9]*", text or b"")
    found = digits.group() if digits is not None else b""
    return int(found) % (1 << 64) if found else 0


class Controls(_Record):
    """What qmail-smtpd reads at start-up (see ``controls.read_controls``):
    greeting; liphost (control/localiphost, else control/me); rcpthosts (None: the file
    does not exist) and badmailfrom, lowercased; databytes (0: no limit); timeout (s)."""
    __slots__ = ("greeting", "liphost", "rcpthosts", "badmailfrom", "databytes", "timeout")
    greeting: bytes
    liphost: bytes
    rcpthosts: frozenset[bytes] | None
    badmailfrom: frozenset[bytes] | None
    databytes: int
    timeout: int


class Peer(_Record):
    """The connection's tcpserver environment, as bytes (remoteinfo and relayclient
    None when unset)."""
    __slots__ = ("remoteip", "remotehost", "remoteinfo", "local", "relayclient")
    remoteip: bytes
    remotehost: bytes
    remoteinfo: bytes | None
    local: bytes
    relayclient: bytes | None
    _defaults = {"remoteip": b"unknown", "remotehost": b"unknown", "remoteinfo": None,
                 "local": b"unknown", "relayclient": None}


class Policy(_Record):
    """VALIDRCPTTO_LIMIT (0: none), VALIDRCPTTO_LOG, MAXRCPT (0: none); tls: STARTTLS may
    be offered (a certificate is loaded); auth: AUTH may be offered (a checkpassword
    program is set); auth_plaintext: also before STARTTLS (AUTH_PLAINTEXT);
    auth_failures: failed AUTH attempts before 421 (AUTH_MAX_FAILURES, default 3);
    reply550: VALIDRCPTTO_REPLY=550 (qmail's words for an unknown mailbox); tarpit:
    VALIDRCPTTO_TARPIT, milliseconds per refused RCPT (0: none)."""
    __slots__ = ("limit", "loglevel", "maxrcpt", "tls", "auth", "auth_plaintext",
                 "auth_failures", "reply550", "tarpit")
    limit: int
    loglevel: int
    maxrcpt: int
    tls: bool
    auth: bool
    auth_plaintext: bool
    auth_failures: int
    reply550: bool
    tarpit: int
    _defaults = {"limit": DEFAULT_LIMIT, "loglevel": 0, "maxrcpt": 0, "tls": False,
                 "auth": False, "auth_plaintext": False, "auth_failures": 3,
                 "reply550": False, "tarpit": 0}


# The per-connection environment, as qmail-smtpd and the combined TLS/AUTH patches read
# it (tcpserver and its rules set these; docs/smtpd.md and qmail-updater-environ(5)
# follow this table, and a test holds them to it).
CONNECTION_ENV: tuple[tuple[str, str], ...] = (
    ("VALIDRCPTTO_CDB", "the list; unset or empty turns the check off; set but unopenable: "
     "421 at the greeting"),
    ("VALIDRCPTTO_LIMIT", f"invalid recipients per connection before 421 and hang-up "
     f"(default {DEFAULT_LIMIT}; 0: none)"),
    ("VALIDRCPTTO_LOG", "0 (default): refusals and hang-ups; 1: also each RCPT and its "
     "verdict; 2: also the keys tried"),
    ("VALIDRCPTTO_REPLY", "550: refuse an unlisted recipient with qmail's own 550 sorry, no "
     "mailbox here by that name (#5.1.1); anything else: the patch's 553 (the default)"),
    ("VALIDRCPTTO_TARPIT", f"milliseconds: the n-th refused RCPT of a session is answered "
     f"after n times this (each wait at most {TARPIT_MAX:g} s); 0 or unset: no wait"),
    ("RELAYCLIENT", "set (even empty): no rcpthosts or validrcptto check; appended to each "
     "recipient"),
    ("TCPREMOTEIP", "the client's address (log, Received)"),
    ("TCPREMOTEHOST", "the client's name (Received)"),
    ("TCPREMOTEINFO", "the client's ident answer (Received)"),
    ("TCPLOCALHOST", "this host's name (the by of Received)"),
    ("TCPLOCALIP", "this host's address, when TCPLOCALHOST is unset"),
    ("DATABYTES", "overrides control/databytes (0: no limit)"),
    ("MAXRCPT", "accepted recipients per message, past it 452 (0: no limit)"),
    ("QMAILQUEUE", "the queue program (default QMAIL_DIR/bin/qmail-queue)"),
    ("METRICS_TEXTFILE", "tcpserver front end: add each session to this Prometheus textfile"),
    ("TLS_CERT", "the certificate (and chain); default control/servercert.pem"),
    ("TLS_KEY", "its key; default the certificate's file"),
    ("DISABLETLS", "set: no STARTTLS"),
    ("CHECKPASSWORD", "the checkpassword program and its arguments, for AUTH"),
    ("AUTH_PLAINTEXT", "non-empty and not 0: AUTH before STARTTLS too"),
    ("AUTH_MAX_FAILURES", "failed AUTH attempts per connection before 421 (default 3)"),
    ("CHECKPASSWORD_TIMEOUT", "seconds before a silent checkpassword is killed: 454 "
     "(default 10)"),
)


def peer_from_env(env: Mapping[str, str]) -> Peer:
    def b(name: str) -> bytes | None:
        v = env.get(name)
        return None if v is None else v.encode("utf-8", "surrogateescape")
    def first(*values: bytes | None) -> bytes:
        return next(v for v in values if v is not None)       # set but empty counts
    return Peer(remoteip=first(b("TCPREMOTEIP"), b"unknown"),
                remotehost=first(b("TCPREMOTEHOST"), b"unknown"),
                remoteinfo=b("TCPREMOTEINFO"),
                local=first(b("TCPLOCALHOST"), b("TCPLOCALIP"), b"unknown"),
                relayclient=b("RELAYCLIENT"))


def policy_from_env(env: Mapping[str, str], tls: bool = False, auth: bool = False) -> Policy:
    return Policy(limit=scan_ulong(env.get("VALIDRCPTTO_LIMIT", str(DEFAULT_LIMIT))),
                  loglevel=scan_ulong(env.get("VALIDRCPTTO_LOG")),
                  maxrcpt=scan_ulong(env.get("MAXRCPT")),
                  tls=tls and env.get("DISABLETLS") is None, auth=auth,
                  auth_plaintext=env.get("AUTH_PLAINTEXT", "") not in ("", "0"),
                  auth_failures=scan_ulong(env.get("AUTH_MAX_FAILURES", "3")) or 3,
                  reply550=env.get("VALIDRCPTTO_REPLY", "").strip() == "550",
                  tarpit=scan_ulong(env.get("VALIDRCPTTO_TARPIT")))
