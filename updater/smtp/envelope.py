"""One SMTP transaction's envelope, from MAIL to the end of DATA (pure data): the
session holds one after MAIL (qmail's ``seenmail``), so a reset is one assignment."""

from __future__ import annotations


class Envelope:
    """One transaction, from MAIL to the end of DATA: a reset is one assignment."""
    __slots__ = ("mailfrom", "flagbarf", "rcptto", "nrcpt")

    def __init__(self, mailfrom: bytes, flagbarf: bool):
        self.mailfrom = mailfrom
        self.flagbarf = flagbarf               # badmailfrom matched: every RCPT refused
        self.rcptto = bytearray()              # "Taddr\0" ..., as qmail-queue wants
        self.nrcpt = 0

    def queue_envelope(self) -> bytes:
        return b"F" + self.mailfrom + b"\0" + bytes(self.rcptto) + b"\0"
