"""qmail-updater: keep qmail's validrcptto.cdb current and enforce it at SMTP time.

The data path, top to bottom: ``build`` (``sources`` -> ``generate``) -> ``install``
-> ``publish`` -> ``daemon`` (its rules: ``daemon.rules``); ``checker`` -> ``smtp`` (the
protocol core, pure) -> ``serving`` (what both servers share) -> ``smtpd``
(validrcptto-smtpd's front ends) and ``postfix`` (validrcptto-policyd); ``cli`` ties the
commands together.  docs/design.md draws the layers; tests/test_layout.py holds them.
"""

__version__ = "0.1.0"
