"""The SMTP protocol core: qmail-smtpd with the validrcptto.cdb check as an I/O-free
state machine (``session``) with its vocabulary and pure pieces.  No sockets, processes
or files here: the front ends that carry the events out are in ``updater.smtpd``."""
