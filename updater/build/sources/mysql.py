"""vpopmail users and valiases from MySQL/MariaDB (driver: pymysql).

Connection settings come from vpopmail's own ``~vpopmail/etc/vpopmail.mysql``
(``host|port|user|password|database``; the first non-comment line is the one vpopmail
reads with), each overridable by a setting.  The password is never logged.

Layouts: vpopmail's default keeps every domain in one table ``vpopmail`` (``pw_name``,
``pw_domain``, ...); the other keeps one table per domain, named by the domain with
``.`` and ``-`` replaced by ``_``.  ``auto`` picks ``single`` when a ``vpopmail`` table
exists.  Aliases come from the ``valias`` table (``alias``, ``domain``, ``valias_line``)
per ``UPDATER_MYSQL_VALIAS``: ``auto`` reads it when it exists and fails the build when
the server denies it (a table the user may not read is invisible to SHOW TABLES, so
"no aliases" and "cannot see the aliases" look alike there: each table is probed with a
query instead, and only "doesn't exist" (1146) means absent); ``yes`` requires it; ``no``
skips it with a warning.  One query per table, streamed with a server-side cursor.

``localhost`` (or an empty host) means the server's Unix socket, as in vpopmail and
every libmysqlclient program: ``UPDATER_MYSQL_SOCKET``, else ``$MYSQL_UNIX_PORT``, else
``socket=`` in the [client] groups of the MariaDB/MySQL option files, else
``/run/mysqld/mysqld.sock``.  ``127.0.0.1`` is TCP.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ...errors import SourceError
from ..qmail import lower_ascii, read_text
from . import Notes

if TYPE_CHECKING:                 # (config imports nothing of ours; sources stay below it)
    from ...config import Settings


# vmoduser -b sets BOUNCE_MAIL (0x10) in pw_gid: vdelivermail bounces the account's mail
UNLOCKED = "(COALESCE(pw_gid, 0) & 16) = 0"


@dataclass(frozen=True)
class Conn:
    host: str
    port: int
    user: str
    password: str = ""
    database: str = "vpopmail"
    socket: str = ""

    def where(self) -> str:
        return f"mysql {self.socket or f'{self.host}:{self.port}'}/{self.database}"


def parse_vpopmail_mysql(text: str, path: str) -> Conn:
    """The first non-comment line of vpopmail.mysql: host|port|user|password|database."""
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split("|")
        if len(fields) < 5:
            raise SourceError("expected host|port|user|password|database", path, number)
        host, port, user, password, database = fields[:5]
        try:
            port_n = int(port or 0)
        except ValueError:
            raise SourceError(f"port is not a number: {port!r}", path, number) from None
        return Conn(host or "localhost", port_n or 3306, user, password, database or "vpopmail")
    raise SourceError("no connection line", path)


OPTION_FILES = ("/etc/my.cnf", "/etc/mysql/my.cnf", "~/.my.cnf")
CLIENT_GROUPS = ("client", "client-server", "client-mariadb", "mysql")
DEFAULT_SOCKET = "/run/mysqld/mysqld.sock"
NO_SUCH_TABLE = 1146
DENIED = (1044, 1142, 1143)


def option_socket(files: tuple[str, ...] = OPTION_FILES,
                  env: Mapping[str, str] = os.environ) -> str:
    """The client library's default socket: $MYSQL_UNIX_PORT, else the last ``socket=``
    in a client group of the option files (following !include and !includedir), else
    Debian's compiled-in path."""
    if env.get("MYSQL_UNIX_PORT"):
        return str(env["MYSQL_UNIX_PORT"])
    found = [DEFAULT_SOCKET]

    def read(path: str, depth: int) -> None:
        try:
            text = read_text(os.path.expanduser(path))
        except SourceError:
            return
        if text is None or depth > 4:
            return
        group = ""
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("!includedir"):
                d = line[len("!includedir"):].strip()
                try:
                    names = sorted(n for n in os.listdir(d) if n.endswith(".cnf"))
                except OSError:
                    names = []
                for n in names:
                    read(os.path.join(d, n), depth + 1)
            elif line.startswith("!include"):
                read(line[len("!include"):].strip(), depth + 1)
            elif line.startswith("[") and line.endswith("]"):
                group = line[1:-1].strip().lower()
            elif group in CLIENT_GROUPS and "=" in line:
                key, value = (x.strip() for x in line.split("=", 1))
                if key.replace("_", "-").lower() == "socket" and value:
                    found.append(value.strip("\"'"))

    for f in files:
        read(f, 0)
    return found[-1]


def table_for(domain: str) -> str:
    """vpopmail's per-domain table name."""
    return domain.replace(".", "_").replace("-", "_")


def connection(settings: Settings) -> Conn:
    path = settings.mysql_config or os.path.join(settings.vpopmail_dir or "/home/vpopmail",
                                                 "etc", "vpopmail.mysql")
    text = read_text(path)
    base = parse_vpopmail_mysql(text, path) if text is not None else Conn("localhost", 3306, "")
    password = base.password
    if settings.mysql_password_file:
        password = (read_text(settings.mysql_password_file, required=True) or "").strip("\r\n")
    host = settings.mysql_host or base.host
    sock = settings.mysql_socket
    if not sock and host in ("", "localhost"):
        sock = option_socket()                  # libmysqlclient: localhost is the socket
    conn = Conn(host or "localhost", settings.mysql_port or base.port,
                settings.mysql_user or base.user, password,
                settings.mysql_database or base.database, sock)
    if not conn.user:
        raise SourceError("no MySQL user: set UPDATER_MYSQL_USER or write vpopmail.mysql", path)
    return conn


Rows = dict[str, "frozenset[str] | None"]     # domain -> addresses to read again (None: all)


@dataclass
class MysqlCache:
    """What the database gave, kept by the daemon between builds: each domain's users
    and valiases from the full build.  Before an incremental build ``refresh`` names
    what to ask again: the rows a request names, by primary key (``pw_name,
    pw_domain``; ``alias, domain``), or a whole domain (``WHERE pw_domain = ?``, its
    own table in the per-domain layout); the rest is served from memory."""
    users: dict[str, list[str]] = field(default_factory=dict)
    complete: bool = False              # the single layout's whole table was read
    aliases: dict[str, list[str]] | None = None
    refresh_users: Rows = field(default_factory=dict)
    refresh_aliases: Rows = field(default_factory=dict)
    valias_absent: bool = False         # (auto) the server has no valias table
    queries: int = 0                    # asked of the server (tests and benchmarks)

    def ask(self, rows: Rows) -> None:
        """What the next build must read again."""
        self.refresh_users, self.refresh_aliases = dict(rows), dict(rows)


class MysqlUsers:
    """All vpopmail users and valiases, fetched once per build (or kept in a
    ``MysqlCache`` between the daemon's builds), then served per domain."""

    def __init__(self, settings: Settings, notes: Notes | None = None,
                 cache: MysqlCache | None = None):
        self.conn = connection(settings)
        self.layout = settings.mysql_layout
        self.valias = settings.mysql_valias
        self.timeout = settings.mysql_timeout
        self.notes = notes
        self.cache = cache if cache is not None else MysqlCache()
        self._single: dict[str, list[str]] | None = \
            self.cache.users if self.cache.complete else None
        self._db: Any = None
        self._broken: SourceError | None = None   # the server failed: every domain at once
        self.aliases: dict[str, list[str]] | None = self.cache.aliases

    def _connect(self) -> Any:
        """The connection; once it failed, the same error for every later domain of this
        build (one connect timeout, not one per domain)."""
        if self._broken is not None:
            raise self._broken
        try:
            return self._open()
        except SourceError as err:
            self._broken = err
            raise

    def _open(self) -> Any:
        if self._db is None:
            import pymysql
            c = self.conn
            try:
                self._db = pymysql.connect(
                    host=c.host, port=c.port, user=c.user, password=c.password,
                    database=c.database, unix_socket=c.socket or None, charset="utf8mb4",
                    connect_timeout=self.timeout, read_timeout=self.timeout,
                    write_timeout=self.timeout)
            except pymysql.MySQLError as err:
                raise SourceError(f"cannot connect: {_reason(err)}", c.where()) from None
            except OSError as err:
                raise SourceError(f"cannot connect: {err.strerror or err}", c.where()) from None
            if self.layout == "auto":
                self.layout = "single" if self._exists("vpopmail") else "per-domain"
        return self._db

    def _exists(self, table: str) -> bool:
        """True if the table can be read, False if the server says it does not exist;
        a denied table (or any other error) fails the build naming table and user."""
        for _ in self._query(f"SELECT 1 FROM `{table}` LIMIT 0", table=table):
            pass
        return not self._missing

    def _query(self, sql: str, args: tuple[Any, ...] = (),
               table: str | None = None) -> Iterator[Any]:
        import pymysql
        import pymysql.cursors
        self._missing = False
        self.cache.queries += 1
        try:
            with self._db.cursor(pymysql.cursors.SSCursor) as cur:
                cur.execute(sql, args)
                yield from cur
        except pymysql.MySQLError as err:
            code = err.args[0] if err.args else None
            if table is not None and code == NO_SUCH_TABLE:
                self._missing = True
                return
            if table is not None and code in DENIED:
                raise SourceError(f"table {table}: access denied for user '{self.conn.user}': "
                                  f"{_reason(err)}", self.conn.where()) from None
            raise SourceError(f"query failed: {_reason(err)}", self.conn.where()) from None

    def users(self, domain: str) -> tuple[str, list[str]]:
        self._connect()
        where = self.conn.where()
        if self.layout == "single":
            if self._single is None:
                found: dict[str, list[str]] = {}
                for name, dom in self._query(
                        f"SELECT pw_name, pw_domain FROM vpopmail WHERE {UNLOCKED}"):
                    found.setdefault(lower_ascii(dom), []).append(name)
                self._single = self.cache.users = found
                self.cache.complete = True
                self.cache.refresh_users = {}
            self._again(self._single, domain, self.cache.refresh_users,
                        "SELECT pw_name FROM vpopmail WHERE pw_domain = %s AND " + UNLOCKED,
                        "SELECT pw_name FROM vpopmail WHERE pw_name = %s AND pw_domain = %s "
                        "AND " + UNLOCKED, "vpopmail", (domain,))
            return f"{where} table vpopmail", self._single.get(domain, [])
        table = table_for(domain)
        kept = self.cache.users
        if domain in kept and self.cache.refresh_users.get(domain, ()) is not None:
            self._again(kept, domain, self.cache.refresh_users, "",
                        f"SELECT pw_name FROM `{table}` WHERE pw_name = %s AND {UNLOCKED}",
                        table, ())
            return f"{where} table {table}", kept[domain]
        self.cache.refresh_users.pop(domain, None)
        rows = [row[0] for row in self._query(
            f"SELECT pw_name FROM `{table}` WHERE {UNLOCKED}", table=table)]
        if self._missing:
            raise SourceError(f"no table {table} for {domain}", where)
        kept[domain] = rows
        return f"{where} table {table}", rows

    def _again(self, kept: dict[str, list[str]], domain: str, refresh: Rows, whole: str,
               row: str, table: str, tail: tuple[str, ...]) -> None:
        """Read again what ``refresh`` names for ``domain`` (once): the whole domain
        (``whole``), or each named address's row (``row``, by its key)."""
        if domain not in refresh:
            return
        addresses = refresh.pop(domain)
        if addresses is None:
            kept[domain] = [r[0] for r in self._query(whole, (domain,), table=table)]
            return
        names = kept.setdefault(domain, [])
        for address in sorted(addresses):
            local = address.rpartition("@")[0]
            found = [r[0] for r in self._query(row, (local, *tail), table=table)]
            names[:] = [n for n in names if lower_ascii(n) != local] + \
                [n for n in found if lower_ascii(n) == local][:1]

    def valiases(self, domain: str) -> list[str]:
        self._connect()
        if self.aliases is None:
            found: dict[str, list[str]] = {}
            if self.valias == "no":
                if self.notes is not None:
                    self.notes.warn(f"{self.conn.where()}: valias not read "
                                    "(UPDATER_MYSQL_VALIAS=no): aliases kept in the database "
                                    "are not listed")
            else:
                rows = list(self._query("SELECT DISTINCT alias, domain FROM valias",
                                        table="valias"))
                if self._missing and self.valias == "yes":
                    raise SourceError("no table valias (UPDATER_MYSQL_VALIAS=yes)",
                                      self.conn.where())
                for alias, dom in rows:
                    found.setdefault(lower_ascii(dom), []).append(alias)
                self.cache.valias_absent = self._missing
            self.aliases = self.cache.aliases = found
            self.cache.refresh_aliases = {}
        if self.valias != "no" and not self.cache.valias_absent:
            self._again(self.aliases, domain, self.cache.refresh_aliases,
                        "SELECT DISTINCT alias FROM valias WHERE domain = %s",
                        "SELECT DISTINCT alias FROM valias WHERE alias = %s AND domain = %s",
                        "valias", (domain,))
        return self.aliases.get(domain, [])

    def close(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            except Exception:
                pass
            self._db = None


def _reason(err: BaseException) -> str:
    args: tuple[Any, ...] = getattr(err, "args", ())
    if len(args) >= 2:
        return f"({args[0]}) {args[1]}"
    return str(err)
