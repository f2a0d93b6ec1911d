"""Addresses from LDAP / Active Directory (driver: ldap3), for the domains named in
the LDAP domains file (``control/validrcptto.ldapdomains``: one domain per line).

This is what a qmail front-end MX for Exchange needs: every ``mail`` value and every
``smtp:`` proxyAddress (either case; ``X400:``, ``SIP:``... are not mail addresses) of
mail-enabled users, groups, contacts and public folders, read with a paged search.
Addresses outside the LDAP domains are ignored.  Any failure (server down, bind
refused, time-out, a search error) fails the build; the bind password comes from a
file and is never logged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import SourceError
from ..qmail import lower_ascii, read_text
from . import Found

if TYPE_CHECKING:
    from ..config import Settings


def addresses(values: dict[str, list[Any]], attrs: list[str]) -> list[str]:
    """The mail addresses in one entry's attributes (pure)."""
    out = []
    for attr in attrs:
        for value in values.get(attr, []) or []:
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            value = str(value).strip()
            if attr.lower() == "proxyaddresses":
                if value[:5].lower() != "smtp:":
                    continue
                value = value[5:]
            if "@" in value:
                out.append(lower_ascii(value))
    return out


def ldap_entries(settings: Settings, domains: list[str]) -> list[Found]:
    import ldap3
    from ldap3.core.exceptions import LDAPException, LDAPOperationResult
    where = f"ldap {settings.ldap_uri}"
    password = ""
    if settings.ldap_password_file:
        password = (read_text(settings.ldap_password_file, required=True) or "").strip("\r\n")
    attrs = [a.strip() for a in settings.ldap_attrs.split(",") if a.strip()]
    wanted = set(domains)
    keys: list[str] = []
    step = "connect"
    try:
        timeout = max(1, int(settings.ldap_timeout + 0.999))   # ldap3 packs whole seconds
        uri = settings.ldap_uri.rstrip("/")           # ldap3 wants no path: ldap://host:port
        server = ldap3.Server(uri, connect_timeout=timeout,
                              get_info=ldap3.NONE)
        conn = ldap3.Connection(server, user=settings.ldap_bind_dn or None,
                                password=password or None, receive_timeout=timeout,
                                raise_exceptions=True, auto_bind=ldap3.AUTO_BIND_NONE)
        conn.open()
        if settings.ldap_starttls:
            step = "starttls"
            conn.start_tls()
        step = "bind"
        conn.bind()
        step = "search"
        cookie = None
        while True:
            conn.search(settings.ldap_base, settings.ldap_filter, search_scope=ldap3.SUBTREE,
                        attributes=attrs, paged_size=settings.ldap_page_size, paged_cookie=cookie)
            for entry in conn.response:
                if entry.get("type") != "searchResEntry":
                    continue
                for address in addresses(entry.get("attributes", {}), attrs):
                    if address.rpartition("@")[2] in wanted:
                        keys.append(address)
            controls = conn.result.get("controls", {})
            cookie = controls.get("1.2.840.113556.1.4.319", {}).get("value", {}).get("cookie")
            if not cookie:
                break
        conn.unbind()
    except LDAPOperationResult as err:
        detail = f": {err.message}" if err.message else ""
        raise SourceError(f"{step} failed: {err.description} ({err.result}){detail}",
                          where) from None
    except LDAPException as err:
        raise SourceError(f"{step} failed: {type(err).__name__}: {err}", where) from None
    except OSError as err:
        raise SourceError(f"{step} failed: {err.strerror or err}", where) from None
    return [Found(f"{where} base {settings.ldap_base}", keys)]
