"""validrcptto.cdb for Postfix: the policy delegation and socketmap protocols
(``protocol``, pure) and their server, validrcptto-policyd (``policyd``)."""
