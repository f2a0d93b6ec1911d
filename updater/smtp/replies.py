"""Every reply qmail-smtpd (netqmail 1.06, the validrcptto patch, the STARTTLS and AUTH
patches' texts) gives, byte for byte, and qmail_close()'s verdict on qmail-queue's exit
code, and the one funnel every RCPT goes through (``Refusal`` / ``Acceptance``: the
reply and the counter it moves, so the metric table is built from them)."""

from __future__ import annotations

from enum import Enum

R_OK = b"250 ok\r\n"
R_FLUSHED = b"250 flushed\r\n"
R_VRFY = b"252 send some mail, i'll try my best\r\n"
R_GO_AHEAD = b"354 go ahead\r\n"
R_CONTROLS = b"421 unable to read controls (#4.3.0)\r\n"
R_SHUTDOWN = b"421 service shutting down, closing connection (#4.3.2)\r\n"

R_TIMEOUT = b"451 timeout (#4.4.2)\r\n"
R_STRAYLF = b"451 See http://pobox.com/~djb/docs/smtplf.html.\r\n"
R_MAILFIRST = b"503 MAIL first (#5.5.1)\r\n"
R_RCPTFIRST = b"503 RCPT first (#5.5.1)\r\n"
R_SYNTAX = b"555 syntax error (#5.5.4)\r\n"
R_BMF = b"553 sorry, your envelope sender is in my badmailfrom list (#5.7.1)\r\n"
R_NOGATEWAY = b"553 sorry, that domain isn't in my list of allowed rcpthosts (#5.7.1)\r\n"
R_NOTVALID = b"553 sorry, this recipient is not in my validrcptto list (#5.7.1)\r\n"
# VALIDRCPTTO_REPLY=550: qmail's own words for an unknown mailbox (qmail-lspawn's bounce)
R_NOMAILBOX = b"550 sorry, no mailbox here by that name (#5.1.1)\r\n"
R_TOOMANY = b"421 too many invalid addresses, goodbye (#4.3.0)\r\n"
R_MAXRCPT = b"452 too many recipients (#4.5.3)\r\n"
R_UNIMPL = b"502 unimplemented (#5.5.1)\r\n"
R_TOOLONG = b"500 line too long (#5.5.2)\r\n"
R_QQT = b"451 qqt failure (#4.3.0)\r\n"
R_HOPS = b"554 too many hops, this message is looping (#5.4.6)\r\n"
R_SIZE = b"552 sorry, that message size exceeds my databytes limit (#5.3.4)\r\n"
R_HELP = b"214 netqmail home page: http://qmail.org/netqmail\r\n"
R_TLS_READY = b"220 ready for tls\r\n"
R_TLS_AGAIN = b"454 TLS already active (#4.7.0)\r\n"
R_TLS_PIPELINED = b"501 nothing may follow STARTTLS before the handshake (#5.5.1)\r\n"
R_AUTH_OK = b"235 ok, go ahead (#2.0.0)\r\n"
R_AUTH_BAD = b"535 authorization failed (#5.7.0)\r\n"
R_AUTH_TEMP = b"454 temporary authentication failure (#4.3.0)\r\n"
R_AUTH_MALFORMED = b"501 malformed auth input (#5.5.4)\r\n"
R_AUTH_CANCELLED = b"501 auth exchange cancelled (#5.0.0)\r\n"
R_AUTH_TYPE = b"504 auth type unimplemented (#5.5.1)\r\n"
R_AUTH_AGAIN = b"503 you're already authenticated (#5.5.0)\r\n"
R_AUTH_INMAIL = b"503 no auth during mail transaction (#5.5.0)\r\n"
R_AUTH_NEEDTLS = b"538 encryption required for requested authentication mechanism (#5.7.11)\r\n"
R_AUTH_TOOMANY = b"421 too many authentication failures, closing connection (#4.7.0)\r\n"


def greeting(name: bytes) -> bytes:
    return b"220 " + name + b" ESMTP\r\n"


def helo(name: bytes) -> bytes:
    return b"250 " + name + b"\r\n"


def goodbye(name: bytes) -> bytes:
    return b"221 " + name + b"\r\n"


def queued(now: float, qp: int) -> bytes:
    return b"250 ok %d qp %d\r\n" % (int(now), qp)


class Refusal(Enum):
    """Every way a RCPT is refused: the reason its counter is named by
    (``rcpt.rejected.REASON``) and its reply."""
    VALIDRCPTTO = ("validrcptto", R_NOTVALID)
    NOMAILBOX = ("validrcptto", R_NOMAILBOX)         # (VALIDRCPTTO_REPLY=550)
    RCPTHOSTS = ("rcpthosts", R_NOGATEWAY)
    BADMAILFROM = ("badmailfrom", R_BMF)
    SYNTAX = ("syntax", R_SYNTAX)
    MAILFIRST = ("syntax", R_MAILFIRST)
    MAXRCPT = ("maxrcpt", R_MAXRCPT)

    @property
    def reason(self) -> str:
        return str(self.value[0])

    @property
    def reply(self) -> bytes:
        return bytes(self.value[1])

    @property
    def counter(self) -> str:
        return "rcpt.rejected." + self.reason


class Acceptance(Enum):
    """Every way a RCPT is accepted (``rcpt.accepted.REASON``; the reply is R_OK)."""
    VALIDRCPTTO = "validrcptto"
    RCPTHOSTS = "rcpthosts"          # (no validrcptto.cdb configured: rcpthosts decides)
    RELAYCLIENT = "relayclient"
    AUTH = "auth"

    @property
    def counter(self) -> str:
        return "rcpt.accepted." + str(self.value)


# every name a session counts (``Session.counts``): the funnel's, and these
EVENTS = ("tls", "bytes", "rcpt.tarpitted", "auth.ok", "auth.failed", "auth.tempfail",
          "hangup.invalid_limit", "hangup.auth_failures",
          "message.queued", "message.rejected", "message.tempfail")
COUNTED = frozenset(EVENTS) | {r.counter for r in Refusal} | {a.counter for a in Acceptance}


def qq_reply(status: int | None, flagerr: bool = False) -> bytes | None:
    """qmail_close()'s verdict on qmail-queue's exit code as the reply line; None means
    the message was accepted.  ``status`` None: killed by a signal."""
    if status is None:
        return b"451 qq crashed (#4.3.0)\r\n"
    if status == 0 and not flagerr:
        return None
    text = _QQ.get(status)
    if text is None:
        text = "Dqq permanent problem (#5.3.0)" if 11 <= status <= 40 \
            else "Zqq temporary problem (#4.3.0)"
    return (b"554 " if text[0] == "D" else b"451 ") + text[1:].encode() + b"\r\n"


_QQ = {11: "Denvelope address too long for qq (#5.1.3)",
       31: "Dmail server permanently rejected message (#5.3.0)",
       51: "Zqq out of memory (#4.3.0)", 52: "Zqq timeout (#4.3.0)",
       53: "Zqq write error or disk full (#4.3.0)", 0: "Zqq read error (#4.3.0)",
       54: "Zqq read error (#4.3.0)", 55: "Zqq unable to read configuration (#4.3.0)",
       56: "Zqq trouble making network connection (#4.3.0)",
       61: "Zqq trouble in home directory (#4.3.0)",
       71: "Zmail server temporarily rejected message (#4.3.0)",
       72: "Zconnection to mail server timed out (#4.4.1)",
       73: "Zconnection to mail server rejected (#4.4.1)",
       74: "Zcommunication with mail server failed (#4.4.2)",
       81: "Zqq internal bug (#4.3.0)", 91: "Zqq internal bug (#4.3.0)",
       120: "Zunable to exec qq (#4.3.0)"}
_QQ[115] = _QQ[11]                                    # compatibility
for _code in range(62, 67):
    _QQ[_code] = "Zqq trouble creating files in queue (#4.3.0)"


def ehlo(greeting: bytes, starttls: bool, auth: bool) -> bytes:
    """The EHLO reply: the greeting, PIPELINING, 8BITMIME, and STARTTLS / AUTH when
    they are offered (both AUTH lines, as the qmail AUTH patches write them)."""
    lines = [greeting, b"PIPELINING", b"8BITMIME"]
    if starttls:
        lines.append(b"STARTTLS")
    if auth:
        lines += [b"AUTH LOGIN PLAIN", b"AUTH=LOGIN PLAIN"]
    return b"".join(b"250-" + x + b"\r\n" for x in lines[:-1]) + b"250 " + lines[-1] + b"\r\n"
