"""The connection to the directory: TLS verified by default, the servers of
``UPDATER_LDAP_URI`` tried in order (the one that answered last first), the bind, and
which domain controller answered (its rootDSE ``dsServiceName``; the URI where the
directory has none), since Active Directory's change stamps are each DC's own."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...errors import SourceError
from ..qmail import read_text

if TYPE_CHECKING:
    from ...config import Settings


@dataclass(frozen=True)
class Server:
    """The server a session reached: its URI and its identity (AD: the DC's NTDS
    Settings DN, which stays when its address changes; elsewhere the URI)."""
    uri: str
    dc: str


def uris(settings: Settings) -> list[str]:
    """The servers, in the order given (blanks or commas between them)."""
    return [u for u in re.split(r"[\s,]+", settings.ldap_uri) if u]


def tls_for(settings: Settings) -> Any:
    """ldaps:// and StartTLS verify the server's certificate by default (ldap3's own
    default verifies nothing): against ``UPDATER_LDAP_CA_FILE`` or the system's CA
    store, and the host name of the URI against the certificate's names; a failure is a
    connect (or starttls) error naming the server, and the domains keep their lists.
    ``UPDATER_LDAP_INSECURE`` turns it off, with a warning."""
    import ssl

    import ldap3
    if settings.ldap_insecure:
        return ldap3.Tls(validate=ssl.CERT_NONE)
    return ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=settings.ldap_ca_file or None)


def bound(settings: Settings, uri: str, password: str) -> Any:
    """A connection to ``uri``, opened, StartTLS'd if asked, bound; SourceError naming
    the server and the step that failed (never the password)."""
    import ldap3
    from ldap3.core.exceptions import LDAPException
    where, step = f"ldap {uri}", "connect"
    try:
        timeout = max(1, int(settings.ldap_timeout + 0.999))   # ldap3 packs whole seconds
        server = ldap3.Server(uri.rstrip("/"), connect_timeout=timeout,   # (no path)
                              get_info=ldap3.NONE, tls=tls_for(settings))
        conn = ldap3.Connection(server, user=settings.ldap_bind_dn or None,
                                password=password or None, receive_timeout=timeout,
                                raise_exceptions=True, auto_bind=ldap3.AUTO_BIND_NONE)
        conn.open()
        if settings.ldap_starttls:
            step = "starttls"
            conn.start_tls()
        step = "bind"
        conn.bind()
        return conn
    except (LDAPException, OSError) as err:
        raise failed(step, err, where) from None


def failed(step: str, err: Exception, where: str) -> SourceError:
    """One line for an LDAP step that failed: the step, ldap3's words (the result code
    and the server's message), never the password."""
    from ldap3.core.exceptions import LDAPException, LDAPOperationResult
    if isinstance(err, LDAPOperationResult):
        detail = f": {err.message}" if err.message else ""
        return SourceError(f"{step} failed: {err.description} ({err.result}){detail}", where)
    if isinstance(err, LDAPException):          # (ldap3's socket errors are OSErrors too)
        return SourceError(f"{step} failed: {type(err).__name__}: {err}", where)
    return SourceError(f"{step} failed: {getattr(err, 'strerror', None) or err}", where)


def identity(conn: Any, uri: str) -> str:
    """The DC's ``dsServiceName`` from the rootDSE, or ``uri``."""
    import ldap3
    conn.search("", "(objectClass=*)", search_scope=ldap3.BASE, attributes=["dsServiceName"])
    for entry in conn.response or []:
        value = (entry.get("attributes") or {}).get("dsServiceName")
        if isinstance(value, list):
            value = value[0] if value else None
        if value:
            return str(value).lower()
    return uri


@contextlib.contextmanager
def session(settings: Settings, prefer: str = "") -> Iterator[tuple[Any, list[str], Server]]:
    """A bound connection to the first server that answers (``prefer``, the one the
    last read used, first), the address attributes, and which server it is; every
    failure a SourceError naming the server and the step (one per server tried)."""
    from ldap3.core.exceptions import LDAPException
    password = ""
    if settings.ldap_password_file:
        password = (read_text(settings.ldap_password_file, required=True) or "").strip("\r\n")
    attrs = [a.strip() for a in settings.ldap_attrs.split(",") if a.strip()]
    order = uris(settings)
    if prefer in order:
        order = [prefer] + [u for u in order if u != prefer]
    failures: list[str] = []
    for uri in order:
        try:
            conn = bound(settings, uri, password)
        except SourceError as err:
            failures.append(str(err))
            continue
        where = f"ldap {uri}"
        try:
            server = Server(uri, identity(conn, uri))
            yield conn, attrs, server
            conn.unbind()
        except (LDAPException, OSError) as err:
            raise failed("search", err, where) from None
        return
    raise SourceError("; ".join(failures) or f"ldap {settings.ldap_uri}: no server given")
