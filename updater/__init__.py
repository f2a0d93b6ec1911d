"""qmail-updater: keep qmail's validrcptto.cdb current and enforce it at SMTP time.

The data path, top to bottom: ``sources`` -> ``generate`` -> ``install`` -> ``daemon``;
``checker`` -> ``smtp.session`` (the protocol) -> ``smtp.stdio`` / ``smtp.master`` (front
ends); ``cli`` ties the commands together.
"""

__version__ = "0.1.0"
