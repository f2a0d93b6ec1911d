"""Every bound and timing promise of qmail-updater, named once, with why (as qmail-send.c
keeps its timing promises in one commented block).  Each module imports its own from
here; a test that changes one patches the name in the module that uses it.  What an
admin may change is a setting instead (config.py, serving/options.py).

A leaf module: it imports nothing."""

from __future__ import annotations

# ---- files: what is read or written at a time, and when the cdb is written whole
FILE_CHUNK = 1 << 20          # bytes per write of a replaced file and per compare of two
COPY_CHUNK = 1 << 30          # bytes per copy_file_range call (the kernel copies, not us)
STRETCH_LIMIT = 1 << 22       # bytes of changed records the diff parses in Python; past
                              # this it streams the live file once instead
MAX_GARBAGE = 0.10            # share of the cdb in records no lookup reaches (left by
                              # incremental installs) past which the next one compacts
MAX_REBUILT = (0.25, 100_000)  # hash-table slots an incremental install would place again
                               # (share of all, and how many) past which writing the
                               # sorted file in C is faster than placing them in Python
MAX_ENV = 1 << 20             # bytes read of one /proc/PID/environ or one envdir file
DOTQMAIL_HEAD = 1 << 20       # bytes of a .qmail file read to see what it delivers to
REPORT_LINE_MAX = 8192        # a multilog line longer than this is skipped and counted
REPORT_CHUNK = 1 << 16        # bytes read of a log file at a time: memory stays bounded
REPORT_MAX_DOMAINS = 100_000  # refused domains `report` tells apart; the rest are one

# ---- the sanity gate
GATE_WINDOW = 3600.0          # seconds: a domain is judged against its largest list of
                              # the last hour, so losses spread over builds add up
MIN_LOSS = 2                  # fewer addresses lost than this never count as a shrink

# ---- the rebuild daemon: its requests and its timing
INCREMENTAL_MAX_DOMAINS = 200  # domains to redo past which (and past half of all) a
                               # build is full: it is cheaper than that many redone
SPLICE_LIMIT = 64             # added + removed keys inserted in place; more: one merge
MAX_FIFO_LINES = 1000         # lines of one FIFO read looked at (the rest: dropped; a
                              # full build covers whatever they named)
MAX_ROWS = 64                 # addresses asked again per domain; more: the whole domain
MAX_WORDS = 64                # words of an onchange line looked at
MAX_DOMAIN = 253              # a domain name's longest (RFC 1035): longer is no request
MAX_LOCAL = 64                # a local part's longest (RFC 5321)
LIVE_CHECK = 0.25             # seconds between looks at the live cdb and its .sources
STATUS_EVERY = 1.0            # seconds: the pending count is written at most this often
HEARTBEAT = 30.0              # seconds: the status file is rewritten at least this often (a
                              # file older than 3 of them is a stopped daemon's)
MAX_REASONS = 20              # reasons kept per kind of request (the log names 3 and a
                              # count)
DAEMON_IDLE = 60.0            # seconds: the longest wait for an event when nothing is due
SPACE_RETRY = 1.0             # seconds between tries while the disk is full (a statvfs)
SPACE_LOG = 60                # ... of which every 60th is logged (and the first)
FUTURE_MARGIN = 300.0         # seconds a directory's clock may run ahead of ours before
                              # a stamp is taken for one from the future

# ---- SMTP sessions (validrcptto-smtpd)
MAXHOPS = 100                 # Received/Delivered-To lines past which a message loops
                              # (qmail-smtpd's own bound)
COMMAND_LINE_MAX = 4096       # qmail-smtpd has no cap; a longer line gets R_TOOLONG
TARPIT_MAX = 30.0             # seconds: the longest a tarpitted reply waits
TRY_LOG_MAX = 10              # "trying:" lines per RCPT at VALIDRCPTTO_LOG=2
SMTP_BATCH = 256              # command lines per call (each reply is < 1 KiB)
HOLD_MAX = 65536              # client bytes held while the session cannot take them
STDIO_READ_SIZE = 65536       # bytes per read under tcpserver

# ---- the long-running servers' machinery
LISTEN_BACKLOG = 1024         # the kernel's queue of connections not accepted yet
RESTART_PAUSE = 0.5           # seconds before a dead worker is replaced
SERVING_SWEEP = 0.5           # seconds between sweeps of both servers' connections (read
                              # deadlines, idle and trickling clients: the timeouts are
                              # whole seconds, so half a second of slack)
OWED_WAIT = 30.0              # after the grace period: seconds for replies owed after a
                              # message (qmail-queue's answer)
RULES_LOG_EVERY = 60.0        # seconds between the lines about connections the rules drop
CONTROL_READ_MAX = 4 << 20    # bytes of a control file read: no file qmail-smtpd reads
                              # is anywhere near this
CONTROL_RECHECK = 0.5         # seconds between looks at a server's control files
CONTROL_SETTLE = 1.0          # seconds: a list without its last newline, younger than
                              # this, is being written
TEXTFILE_LOCK_WAIT = 0.5      # seconds a session waits for the textfile's lock, at most
MAX_SCRAPES = 4               # /metrics connections served at once
SCRAPE_TIMEOUT = 5.0          # seconds for each read and write of one

# ---- Postfix's policy and socketmap protocols (validrcptto-policyd)
POLICY_MAX_REQUEST = 65536    # bytes of one request: Postfix's are a few hundred
POLICY_MAX_ATTRIBUTES = 100   # attributes of one request (Postfix sends about 30)
POLICY_BATCH = 64             # requests answered per call; the rest wait for proceed()
WRITE_HIGH = 64 * 1024        # answers unsent past this: stop reading from the client
POLICYD_LOG_RATE = 100        # decision lines a second; past that, one summary line
