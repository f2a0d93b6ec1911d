"""What qmail-smtpd reads before it greets: its control files (``controlfiles``), the
environment, and this host's IPv4 addresses; ``SessionSetup`` is its setup() for one
connection, shared by both front ends."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..checker import CdbGetter, unusable
from ..serving.controlfiles import ControlError, morercpthosts_path, readfile, readint, readline
from ..smtp.context import (
    DEFAULT_TIMEOUT,
    Controls,
    Lookup,
    peer_from_env,
    policy_from_env,
    scan_ulong,
)
from ..smtp.session import Session

READERS: dict[str, Callable[[str], Any]] = {
    "me": readline, "smtpgreeting": readline, "localiphost": readline,
    "timeoutsmtpd": lambda path: readint(path, DEFAULT_TIMEOUT), "rcpthosts": readfile,
    "badmailfrom": readfile, "databytes": lambda path: readint(path, 0)}


def read_file(qmail_dir: str, name: str) -> Any:
    """One control file as qmail-smtpd reads it (``READERS``); ControlError if it cannot."""
    return READERS[name](os.path.join(qmail_dir, "control", name))


def read_controls(qmail_dir: str, env: Mapping[str, str],
                  files: Callable[[str], Any] | None = None) -> Controls:
    """qmail-smtpd's setup(); raises ControlError where it would die_control().
    ``files(name)``: each file's value (``read_file``; a long-running server hands in
    each file's own last good copy)."""
    control = os.path.join(qmail_dir, "control")
    get = files or (lambda name: read_file(qmail_dir, name))
    me = get("me")
    greeting = get("smtpgreeting")
    if greeting is None:
        greeting = me
    if greeting is None:
        raise ControlError(f"{control}/me: missing (and no smtpgreeting)")
    liphost = get("localiphost")
    if liphost is None:
        liphost = me
    timeout = get("timeoutsmtpd") & 0xFFFFFFFF
    if timeout >= 1 << 31:
        timeout -= 1 << 32                      # C: int
    if timeout <= 0:
        timeout = 1
    rcpthosts = get("rcpthosts")
    bmf = get("badmailfrom")
    databytes = with_databytes(get("databytes"), env)
    return Controls(
        greeting=greeting, liphost=liphost,
        rcpthosts=None if rcpthosts is None else frozenset(h.lower() for h in rcpthosts),
        badmailfrom=None if bmf is None else frozenset(b.lower() for b in bmf),
        databytes=databytes, timeout=timeout)


def _log(text: str) -> None:
    import sys
    sys.stderr.write(f"validrcptto-smtpd[{os.getpid()}]: {text}\n")


def with_databytes(value: int, env: Mapping[str, str]) -> int:
    """control/databytes overridden by $DATABYTES, as the C unsigned int qmail keeps
    (all ones means "no limit" there, so it is one less)."""
    if env.get("DATABYTES") is not None:
        value = scan_ulong(env["DATABYTES"])
    value &= 0xFFFFFFFF
    return value - 1 if value == 0xFFFFFFFF else value


def open_session(controls: Controls, env: Mapping[str, str], validrcptto: Lookup | None,
                 more: Lookup | None, ipme: Callable[[tuple[int, int, int, int]], bool],
                 tls: bool, auth: bool) -> Session:
    """One connection's session, the same for both front ends: the controls (with
    DATABYTES applied), the peer and policy from the environment, the lookups, the
    clocks."""
    if env.get("DATABYTES") is not None:
        controls = controls._replace(databytes=with_databytes(controls.databytes, env))
    return Session(controls, peer_from_env(env), policy_from_env(env, tls=tls, auth=auth),
                   validrcptto=validrcptto, morercpthosts=more, ipme=ipme,
                   clock=time.time, monotonic=time.monotonic)


def queue_program(env: Mapping[str, str], qmail_dir: str) -> str:
    """qmail-queue, or $QMAILQUEUE (the qmail-qfilter convention)."""
    return env.get("QMAILQUEUE") or os.path.join(qmail_dir, "bin", "qmail-queue")


class SessionSetup:
    """qmail-smtpd's setup() for one connection, shared by both front ends: the
    controls, the cdbs (validrcptto and morercpthosts, opened once), the session and the
    queue program.  Raises ControlError (``421 unable to read controls``) with nothing
    left open; ``close()`` releases the cdbs."""

    def __init__(self, qmail_dir: str, env: Mapping[str, str],
                 ipme: Callable[[tuple[int, int, int, int]], bool]):
        self.getters: list[CdbGetter] = []
        cdb = more = None
        try:
            controls = read_controls(qmail_dir, env)
            if env.get("VALIDRCPTTO_CDB"):
                cdb = self._open(env["VALIDRCPTTO_CDB"], need_records=True)
            if controls.rcpthosts is not None:
                try:
                    more = self._open(morercpthosts_path(qmail_dir), need_records=False)
                except FileNotFoundError:
                    more = None
        except OSError as err:
            self.close()
            where = f"{err.filename}: " if err.filename else ""
            raise ControlError(f"{where}{err.strerror or err}") from None
        except ControlError:
            self.close()
            raise
        self.controls = controls
        self.tls = None
        self.checkpassword = None
        if env.get("CHECKPASSWORD") or env.get("TLS_CERT") or os.path.exists(
                os.path.join(qmail_dir, "control", "servercert.pem")):
            from .secure import checkpassword_argv, tls_context
            self.checkpassword = checkpassword_argv(env)
            self.tls = tls_context(qmail_dir, env, _log)
        self.session = open_session(controls, env, cdb, more, ipme, tls=self.tls is not None,
                                    auth=self.checkpassword is not None)
        self.queue_program = queue_program(env, qmail_dir)

    def _open(self, path: str, need_records: bool) -> CdbGetter:
        """A cdb that is whole (a broken one: 421, never "not found")."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            why = unusable(fd, need_records)
        except OSError:
            os.close(fd)
            raise
        if why is not None:
            os.close(fd)
            raise ControlError(f"{path}: {why}")
        getter = CdbGetter(fd)
        self.getters.append(getter)
        return getter

    def close(self) -> None:
        for getter in self.getters:
            getter.close()
        self.getters = []


def local_ipv4() -> frozenset[tuple[int, int, int, int]]:
    """ipme_init(): 0.0.0.0 and the IPv4 address of every interface that is up."""
    import array
    import fcntl
    import socket
    import struct
    SIOCGIFCONF, SIOCGIFFLAGS, IFF_UP = 0x8912, 0x8913, 0x1
    ips = {(0, 0, 0, 0)}
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        size = 40                                           # struct ifreq on Linux
        n = 128
        while True:
            buf = array.array("B", b"\0" * (size * n))
            addr, _ = buf.buffer_info()
            req = struct.pack("iL", len(buf), addr)
            got = struct.unpack("iL", fcntl.ioctl(s.fileno(), SIOCGIFCONF, req))[0]
            if got < len(buf) or n > 8192:
                break
            n *= 2
        raw = buf.tobytes()[:got]
        for off in range(0, len(raw), size):
            ifr = raw[off:off + size]
            name = ifr[:16]
            family = struct.unpack_from("H", ifr, 16)[0]
            if family != socket.AF_INET:
                continue
            flags = struct.unpack_from("H", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS,
                                                        name + b"\0" * 24), 16)[0]
            if flags & IFF_UP:
                a, b, c, d = ifr[20:24]
                ips.add((a, b, c, d))
    finally:
        s.close()
    return frozenset(ips)


class IpMe:
    """``ipme(ip) -> bool`` for the session; the interfaces are read on first use."""

    def __init__(self) -> None:
        self._ips: frozenset[tuple[int, int, int, int]] | None = None

    def __call__(self, ip: tuple[int, int, int, int]) -> bool:
        if self._ips is None:
            try:
                self._ips = local_ipv4()
            except OSError:
                self._ips = frozenset({(0, 0, 0, 0), (127, 0, 0, 1)})
        return ip in self._ips
