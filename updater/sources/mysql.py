"""vpopmail users and valiases from MySQL/MariaDB (driver: pymysql).

Connection settings come from vpopmail's own ``~vpopmail/etc/vpopmail.mysql``
(``host|port|user|password|database``; the first non-comment line is the one vpopmail
reads with), each overridable by a setting.  The password is never logged.

Layouts: vpopmail's default keeps every domain in one table ``vpopmail`` (``pw_name``,
``pw_domain``, ...); the other keeps one table per domain, named by the domain with
``.`` and ``-`` replaced by ``_``.  ``auto`` picks ``single`` when a ``vpopmail`` table
exists.  Aliases come from the ``valias`` table (``alias``, ``domain``, ``valias_line``)
when it exists.  One query per table, streamed with a server-side cursor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import SourceError
from ..qmail import lower_ascii, read_text


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


def table_for(domain: str) -> str:
    """vpopmail's per-domain table name."""
    return domain.replace(".", "_").replace("-", "_")


def connection(settings) -> Conn:
    path = settings.mysql_config or os.path.join(settings.vpopmail_dir or "/home/vpopmail",
                                                 "etc", "vpopmail.mysql")
    text = read_text(path)
    base = parse_vpopmail_mysql(text, path) if text is not None else Conn("localhost", 3306, "")
    password = base.password
    if settings.mysql_password_file:
        password = (read_text(settings.mysql_password_file, required=True) or "").strip("\r\n")
    conn = Conn(settings.mysql_host or base.host, settings.mysql_port or base.port,
                settings.mysql_user or base.user, password,
                settings.mysql_database or base.database, settings.mysql_socket)
    if not conn.user:
        raise SourceError("no MySQL user: set UPDATER_MYSQL_USER or write vpopmail.mysql", path)
    return conn


class MysqlUsers:
    """All vpopmail users and valiases, fetched once per build, then served per domain."""

    def __init__(self, settings, timeout: float = 30.0):
        self.conn = connection(settings)
        self.layout = settings.mysql_layout
        self.timeout = timeout
        self._single: dict[str, list[str]] | None = None
        self._db = None
        self.aliases: dict[str, list[str]] | None = None

    def _connect(self):
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
            tables = {row[0] for row in self._query("SHOW TABLES")}
            if self.layout == "auto":
                self.layout = "single" if "vpopmail" in tables else "per-domain"
            self._tables = tables
        return self._db

    def _query(self, sql: str, args=()):
        import pymysql
        import pymysql.cursors
        try:
            with self._db.cursor(pymysql.cursors.SSCursor) as cur:
                cur.execute(sql, args)
                yield from cur
        except pymysql.MySQLError as err:
            raise SourceError(f"query failed: {_reason(err)}", self.conn.where()) from None

    def users(self, domain: str) -> tuple[str, list[str]]:
        self._connect()
        where = self.conn.where()
        if self.layout == "single":
            if self._single is None:
                found: dict[str, list[str]] = {}
                for name, dom in self._query("SELECT pw_name, pw_domain FROM vpopmail"):
                    found.setdefault(lower_ascii(dom), []).append(name)
                self._single = found
            return f"{where} table vpopmail", self._single.get(domain, [])
        table = table_for(domain)
        if table not in self._tables:
            raise SourceError(f"no table {table} for {domain}", where)
        return (f"{where} table {table}",
                [row[0] for row in self._query(f"SELECT pw_name FROM `{table}`")])

    def valiases(self, domain: str) -> list[str]:
        self._connect()
        if self.aliases is None:
            found: dict[str, list[str]] = {}
            if "valias" in self._tables:
                for alias, dom in self._query("SELECT DISTINCT alias, domain FROM valias"):
                    found.setdefault(lower_ascii(dom), []).append(alias)
            self.aliases = found
        return self.aliases.get(domain, [])

    def close(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            except Exception:
                pass
            self._db = None


def _reason(err) -> str:
    args = getattr(err, "args", ())
    if len(args) >= 2:
        return f"({args[0]}) {args[1]}"
    return str(err)
