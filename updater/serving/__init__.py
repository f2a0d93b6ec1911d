"""The serving machinery both servers share (validrcptto-smtpd --listen and
validrcptto-policyd): listening sockets, privileges, connection limits, cdb snapshots,
watched control files, owned child processes, metrics, options, the log."""
