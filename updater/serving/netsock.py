"""One way to open a listening TCP socket, for every server here (SMTP, policy, metrics).
A leaf module: it imports nothing of ours."""

from __future__ import annotations

import socket


def listen_tcp(host: str, port: int, backlog: int, reuse_port: bool = False,
               blocking: bool = False) -> socket.socket:
    """Bound and listening; ``::`` takes IPv6 and IPv4 alike, ``::1`` IPv6 only."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(blocking)
    except BaseException:
        sock.close()
        raise
    return sock
