"""qmail-updater: keep qmail's validrcptto.cdb current and enforce it at SMTP time.

The data path, top to bottom: ``sources`` -> ``generate`` -> ``install`` -> ``daemon``
(its timing: ``schedule``) -> ``publish``; ``checker`` -> ``smtp`` (the protocol core,
pure) -> ``serving`` (what both servers share) -> ``smtpd`` (validrcptto-smtpd's front
ends) and ``postfix`` (validrcptto-policyd); ``cli`` ties the commands together.
"""

__version__ = "0.1.0"
