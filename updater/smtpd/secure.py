"""STARTTLS and SMTP AUTH for both front ends: the TLS context, and the checkpassword
interface (cr.yp.to/checkpwd/interface.html).

TLS: the certificate and key in one PEM file, ``control/servercert.pem`` as the qmail
TLS patches have it, or ``TLS_CERT`` (and ``TLS_KEY`` for a separate key); TLS 1.2 or
newer with the ssl module's defaults; ``DISABLETLS`` turns it off.  A certificate that
cannot be loaded: no STARTTLS, one log line.

AUTH: ``CHECKPASSWORD`` is the program and its arguments (shell words).  It gets
``user\\0password\\0timestamp\\0`` on fd 3 and one more argument, ``true``, that it runs
when the password is right: exit 0 = ok, 1 = wrong, anything else (111) = temporary.
It is killed after ``CHECKPASSWORD_TIMEOUT`` seconds (default 10): a temporary failure.
"""

from __future__ import annotations

import os
import select
import shlex
import signal
import time
from collections.abc import Callable, Mapping

TYPE_CHECKING = False          # (typing is not imported: start-up counts here)
if TYPE_CHECKING:
    import ssl

TRUE = "/bin/true" if os.path.exists("/bin/true") else "/usr/bin/true"


def tls_context(qmail_dir: str, env: Mapping[str, str],
                log: Callable[[str], None]) -> ssl.SSLContext | None:
    """An SSLContext for STARTTLS, or None (not configured, disabled, or unusable)."""
    if env.get("DISABLETLS") is not None:
        return None
    cert = env.get("TLS_CERT") or os.path.join(qmail_dir, "control", "servercert.pem")
    key = env.get("TLS_KEY") or cert
    if not env.get("TLS_CERT") and not os.path.exists(cert):
        return None                                  # not configured: no STARTTLS, quietly
    import ssl
    try:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as err:
        log(f"TLS: cannot load the certificate {cert}: "
            f"{getattr(err, 'strerror', None) or err}; STARTTLS is not offered")
        return None
    return ctx


def checkpassword_argv(env: Mapping[str, str]) -> list[str] | None:
    text = env.get("CHECKPASSWORD") or ""
    try:
        argv = shlex.split(text)
    except ValueError:
        argv = text.split()
    if argv and "/" not in argv[0]:                # posix_spawn takes a path: find it now
        import shutil
        argv[0] = shutil.which(argv[0], path=env.get("PATH")) or argv[0]
    return argv or None


def timeout_of(env: Mapping[str, str]) -> float:
    try:
        return max(0.1, float(env.get("CHECKPASSWORD_TIMEOUT") or 10))
    except ValueError:
        return 10.0


def spawn(argv: list[str], user: bytes, password: bytes,
          env: dict[str, str] | None = None) -> int | None:
    """Start the checkpassword program with the credentials on fd 3; its pid.  ``env``
    is the session's environment (the tcpserver front end's own: os.environ)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        data = user + b"\0" + password + b"\0" + str(int(time.time())).encode() + b"\0"
        os.write(w, data[:60000])                   # fits the pipe: never blocks
    finally:
        os.close(w)
    try:
        return os.posix_spawn(argv[0], argv + [TRUE], os.environ if env is None else env,
                              file_actions=[
                                  (os.POSIX_SPAWN_DUP2, r, 3),
                                  (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                                  (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0)])
    except OSError:
        return None
    finally:
        os.close(r)


def _code(status: int) -> int | None:
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else None


def check(argv: list[str], user: bytes, password: bytes, timeout: float) -> int | None:
    """Blocking: for the one-process-per-connection front end.  None: killed after
    ``timeout``, crashed, or not started (a temporary failure)."""
    pid = spawn(argv, user, password)
    if pid is None:
        return None
    deadline = time.monotonic() + timeout
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        pidfd = -1                                      # old kernel: poll
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return _code(status)
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if pidfd != -1:
                select.select([pidfd], [], [], left)
            else:
                time.sleep(min(0.01, left))
    finally:
        if pidfd != -1:
            os.close(pidfd)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    return None


async def check_async(argv: list[str], user: bytes, password: bytes, timeout: float,
                      env: dict[str, str]) -> int | None:
    """From the event loop: the program runs while other sessions go on.  It is owned
    until reaped: killed after ``timeout``, and killed and reaped if the session ends
    (its task cancelled) while it runs."""
    from ..serving.child import Child
    pid = spawn(argv, user, password, env)
    if pid is None:
        return None
    child = Child(pid)
    try:
        if not await child.wait(timeout):
            return None
        return child.exit_code()
    finally:
        child.kill()                                    # a no-op once reaped
