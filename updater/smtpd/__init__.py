"""validrcptto-smtpd: the SMTP protocol core carried out on real connections, under
tcpserver (``stdio``) or as a long-running server the Postfix way (``master``,
``worker``, ``connection``), with qmail-smtpd's set-up, qmail-queue, TLS and AUTH."""
