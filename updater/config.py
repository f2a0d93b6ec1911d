"""One frozen settings object: defaults <- environment (a daemontools envdir) <- CLI flags.

Every setting is declared once in ``OPTIONS``; the CLI builds its flags from that table
and the README's settings table lists the same names.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable, Mapping

from .errors import ConfigError
from .targets import parse_targets


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "yes", "true", "on"):
        return True
    if value in ("", "0", "no", "false", "off"):
        return False
    raise ValueError(f"expected 1/0, yes/no, true/false, got {text!r}")


def _float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise ValueError(f"must not be negative, got {text!r}")
    return value


def _int(text: str) -> int:
    value = int(text, 10)
    if value < 0:
        raise ValueError(f"must not be negative, got {text!r}")
    return value


def _mode(text: str) -> int:
    return int(text, 8)


def _str(text: str) -> str:
    return text


@dataclass(frozen=True)
class Opt:
    name: str            # attribute of Settings
    env: str             # environment variable (envdir file name)
    parse: Callable[[str], Any]
    default: Any         # None: derived from other settings in Settings.resolve()
    help: str
    flag: str = ""       # CLI flag; "" means --name-with-dashes
    group: str = "generate"

    @property
    def cli(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


OPTIONS: tuple[Opt, ...] = (
    # where qmail lives and what the generator reads
    Opt("qmail_dir", "QMAIL_DIR", _str, "/var/qmail", "qmail's home (control/, users/, alias/)"),
    Opt("vpopmail_dir", "VPOPMAIL_DIR", _str, None,
        "vpopmail's home (default: ~vpopmail from passwd, else /home/vpopmail)"),
    Opt("passwd", "UPDATER_PASSWD", _str, "",
        "read accounts from this passwd-format file instead of the system database"),
    Opt("uid_min", "UPDATER_UID_MIN", _int, 500, "lowest uid of a mail account"),
    Opt("uid_max", "UPDATER_UID_MAX", _int, 65000, "highest uid of a mail account"),
    Opt("max_file_size", "UPDATER_MAX_FILE_SIZE", _int, 1 << 30,
        "largest file the generator reads (bytes): a bigger one fails the build"),
    Opt("qmail_ext", "UPDATER_QMAIL_EXT", _bool, False,
        "vpopmail built with --enable-qmail-ext: add user-default for every vpopmail user"),
    Opt("vuserinfo", "UPDATER_VUSERINFO", _bool, False,
        "when a domain's vpasswd files are unreadable, ask VPOPMAIL_DIR/bin/vuserinfo -n -D"),
    Opt("include", "UPDATER_INCLUDE", _str, None,
        "site file of addresses always accepted (default QMAIL_DIR/control/validrcptto.include)"),
    Opt("exclude", "UPDATER_EXCLUDE", _str, None,
        "site file of addresses/@domains always rejected "
        "(default QMAIL_DIR/control/validrcptto.exclude)"),
    # directory sources
    Opt("mysql", "UPDATER_MYSQL", _bool, False,
        "read vpopmail users and valiases from MySQL/MariaDB instead of vpasswd files",
        group="directory"),
    Opt("mysql_config", "UPDATER_MYSQL_CONFIG", _str, None,
        "vpopmail's MySQL settings, host|port|user|password|database "
        "(default VPOPMAIL_DIR/etc/vpopmail.mysql)", group="directory"),
    Opt("mysql_host", "UPDATER_MYSQL_HOST", _str, "", "override the host", group="directory"),
    Opt("mysql_port", "UPDATER_MYSQL_PORT", _int, 0, "override the port", group="directory"),
    Opt("mysql_socket", "UPDATER_MYSQL_SOCKET", _str, "", "connect by this Unix socket",
        group="directory"),
    Opt("mysql_user", "UPDATER_MYSQL_USER", _str, "", "override the user", group="directory"),
    Opt("mysql_password_file", "UPDATER_MYSQL_PASSWORD_FILE", _str, "",
        "override the password: read it from this file", group="directory"),
    Opt("mysql_database", "UPDATER_MYSQL_DATABASE", _str, "", "override the database",
        group="directory"),
    Opt("mysql_layout", "UPDATER_MYSQL_LAYOUT", _str, "auto",
        "auto, single (table vpopmail) or per-domain (one table per domain)", group="directory"),
    Opt("mysql_valias", "UPDATER_MYSQL_VALIAS", _str, "auto",
        "read the valias table: auto (if it exists; a denied table fails the build), "
        "yes (required) or no", group="directory"),
    Opt("mysql_timeout", "UPDATER_MYSQL_TIMEOUT", _float, 30.0,
        "seconds for connecting and for each MySQL read or write", group="directory"),
    Opt("ldap_uri", "UPDATER_LDAP_URI", _str, "",
        "LDAP / Active Directory server, ldap://host or ldaps://host (empty: off)",
        group="directory"),
    Opt("ldap_starttls", "UPDATER_LDAP_STARTTLS", _bool, False, "use StartTLS on ldap://",
        group="directory"),
    Opt("ldap_bind_dn", "UPDATER_LDAP_BIND_DN", _str, "", "bind DN (empty: anonymous)",
        group="directory"),
    Opt("ldap_password_file", "UPDATER_LDAP_PASSWORD_FILE", _str, "",
        "file holding the bind password", group="directory"),
    Opt("ldap_base", "UPDATER_LDAP_BASE", _str, "", "search base DN", group="directory"),
    Opt("ldap_filter", "UPDATER_LDAP_FILTER", _str,
        "(&(|(objectClass=user)(objectClass=group)(objectClass=contact)"
        "(objectClass=publicFolder))(|(mail=*)(proxyAddresses=*)))",
        "search filter (default: AD's mail-enabled users, groups, contacts, public folders)",
        group="directory"),
    Opt("ldap_attrs", "UPDATER_LDAP_ATTRS", _str, "mail,proxyAddresses",
        "attributes holding addresses (proxyAddresses: only smtp: values)", group="directory"),
    Opt("ldap_page_size", "UPDATER_LDAP_PAGE_SIZE", _int, 500,
        "paged search page size (AD returns at most 1000 per page)", group="directory"),
    Opt("ldap_timeout", "UPDATER_LDAP_TIMEOUT", _float, 30.0,
        "seconds for connecting and for each LDAP operation", group="directory"),
    Opt("ldap_domains", "UPDATER_LDAP_DOMAINS", _str, None,
        "file naming the domains listed from LDAP "
        "(default QMAIL_DIR/control/validrcptto.ldapdomains)", group="directory"),
    # install
    Opt("cdb", "VALIDRCPTTO_CDB", _str, None,
        "validrcptto.cdb: the list that is installed, checked and published "
        "(default QMAIL_DIR/control/validrcptto.cdb)", group="install"),
    Opt("max_shrink", "UPDATER_MAX_SHRINK", _float, 20.0,
        "refuse a list that shrinks by more than this percentage (0 = no limit)", group="install"),
    Opt("lock_timeout", "UPDATER_LOCK_TIMEOUT", _float, 60.0,
        "seconds to wait for another build's lock before giving up", group="install"),
    # daemon
    Opt("fifo", "UPDATER_FIFO", _str, None,
        "trigger FIFO (default QMAIL_DIR/control/validrcptto.trigger)", group="daemon"),
    Opt("fifo_mode", "UPDATER_FIFO_MODE", _mode, 0o620,
        "octal mode of the trigger FIFO (set whenever the daemon opens it)", group="daemon"),
    Opt("fifo_group", "UPDATER_FIFO_GROUP", _str, "",
        "group of the trigger FIFO, whose members (vpopmail's onchange hook) may write it "
        "(default: the vpopmail account's group, else vchkpw, else the daemon's own; a "
        "named group that does not exist: a warning, and the daemon's own)", group="daemon"),
    Opt("min_interval", "UPDATER_MIN_INTERVAL", _float, 30.0,
        "seconds between two builds triggered through the FIFO (file changes: no floor)",
        group="daemon"),
    Opt("quiet", "UPDATER_QUIET", _float, 2.0,
        "seconds without a new request before a build starts", group="daemon"),
    Opt("max_delay", "UPDATER_MAX_DELAY", _float, 30.0,
        "seconds after the first pending request when a build starts anyway", group="daemon"),
    Opt("incremental", "UPDATER_INCREMENTAL", _bool, True,
        "redo only the domains a request names or whose files changed (0: every build "
        "is full)", group="daemon"),
    Opt("target_quiet", "UPDATER_TARGET_QUIET", _float, 0.05,
        "quiet period of a request naming a mailbox or alias being added (vpopmail's "
        "add_user, valias_insert, ...); removals wait UPDATER_QUIET", group="daemon"),
    Opt("target_interval", "UPDATER_TARGET_INTERVAL", _float, 0.5,
        "seconds from the end of an incremental build to the next (at least half the "
        "last one's duration): bursts coalesce, the daemon is never busy more than two "
        "thirds of the time", group="daemon"),
    Opt("interval", "UPDATER_INTERVAL", _float, 3600.0,
        "seconds between safety-net full builds (0 = never)", group="daemon"),
    Opt("retry_min", "UPDATER_RETRY_MIN", _float, 10.0,
        "first retry delay after a failed build, doubling", group="daemon"),
    Opt("retry_max", "UPDATER_RETRY_MAX", _float, 600.0,
        "longest retry delay after failed builds", group="daemon"),
    Opt("status", "UPDATER_STATUS", _str, None,
        "JSON status file (default QMAIL_DIR/control/validrcptto.status)", group="daemon"),
    Opt("prom_file", "UPDATER_PROM_FILE", _str, "",
        "also write a node-exporter textfile here", group="daemon"),
    Opt("poll", "UPDATER_POLL", _float, 0.0,
        "watch files by polling every N seconds instead of inotify (0 = inotify)",
        group="daemon"),
    # publish to the other MX hosts
    Opt("publish", "UPDATER_PUBLISH", _str, "",
        "push each installed cdb to these targets: [user@]host:/path (ssh) or "
        "rsync://host[:port]/module/path, separated by spaces or commas", group="publish"),
    Opt("publish_timeout", "UPDATER_PUBLISH_TIMEOUT", _float, 30.0,
        "seconds for connecting and for each rsync read or write (a push is killed after "
        "twice this)", group="publish"),
    Opt("rsync", "UPDATER_RSYNC", _str, "rsync", "the rsync program", group="publish"),
    Opt("ssh_identity", "UPDATER_SSH_IDENTITY", _str, "",
        "ssh private key for the ssh targets (default: ssh's own)", group="publish"),
    Opt("ssh_known_hosts", "UPDATER_SSH_KNOWN_HOSTS", _str, "",
        "known_hosts file with the targets' host keys (default: ssh's own); unknown hosts "
        "are refused, never asked about", group="publish"),
    Opt("ssh_port", "UPDATER_SSH_PORT", _int, 0, "ssh port (0: ssh's default)",
        group="publish"),
    Opt("rsync_password_file", "UPDATER_RSYNC_PASSWORD_FILE", _str, "",
        "password file for rsync:// targets that need one", group="publish"),
)

_BY_NAME = {o.name: o for o in OPTIONS}


@dataclass(frozen=True)
class Settings:
    qmail_dir: str = "/var/qmail"
    vpopmail_dir: str | None = None
    passwd: str = ""
    uid_min: int = 500
    uid_max: int = 65000
    max_file_size: int = 1 << 30
    qmail_ext: bool = False
    vuserinfo: bool = False
    include: str = ""
    exclude: str = ""
    mysql: bool = False
    mysql_config: str | None = None
    mysql_host: str = ""
    mysql_port: int = 0
    mysql_socket: str = ""
    mysql_user: str = ""
    mysql_password_file: str = ""
    mysql_database: str = ""
    mysql_layout: str = "auto"
    mysql_valias: str = "auto"
    mysql_timeout: float = 30.0
    ldap_uri: str = ""
    ldap_starttls: bool = False
    ldap_bind_dn: str = ""
    ldap_password_file: str = ""
    ldap_base: str = ""
    ldap_filter: str = ("(&(|(objectClass=user)(objectClass=group)(objectClass=contact)"
                        "(objectClass=publicFolder))(|(mail=*)(proxyAddresses=*)))")
    ldap_attrs: str = "mail,proxyAddresses"
    ldap_page_size: int = 500
    ldap_timeout: float = 30.0
    ldap_domains: str = ""
    cdb: str = ""
    max_shrink: float = 20.0
    lock_timeout: float = 60.0
    fifo: str = ""
    fifo_mode: int = 0o620
    fifo_group: str = ""
    min_interval: float = 30.0
    quiet: float = 2.0
    max_delay: float = 30.0
    incremental: bool = True
    target_quiet: float = 0.05
    target_interval: float = 0.5
    interval: float = 3600.0
    retry_min: float = 10.0
    retry_max: float = 600.0
    status: str = ""
    prom_file: str = ""
    poll: float = 0.0
    publish: str = ""
    publish_timeout: float = 30.0
    rsync: str = "rsync"
    ssh_identity: str = ""
    ssh_known_hosts: str = ""
    ssh_port: int = 0
    rsync_password_file: str = ""
    force: bool = False

    def control(self, name: str) -> str:
        return os.path.join(self.qmail_dir, "control", name)

    def resolve(self) -> Settings:
        """Fill the defaults that depend on other settings."""
        derived: dict[str, Any] = {}
        if not self.include:
            derived["include"] = self.control("validrcptto.include")
        if not self.exclude:
            derived["exclude"] = self.control("validrcptto.exclude")
        if not self.cdb:
            derived["cdb"] = self.control("validrcptto.cdb")
        if not self.ldap_domains:
            derived["ldap_domains"] = self.control("validrcptto.ldapdomains")
        if self.mysql_layout not in ("auto", "single", "per-domain"):
            raise ConfigError(f"UPDATER_MYSQL_LAYOUT: expected auto, single or per-domain, "
                              f"got {self.mysql_layout!r}")
        if self.mysql_valias not in ("auto", "yes", "no"):
            raise ConfigError(f"UPDATER_MYSQL_VALIAS: expected auto, yes or no, "
                              f"got {self.mysql_valias!r}")
        if self.mysql_timeout <= 0:
            raise ConfigError(f"UPDATER_MYSQL_TIMEOUT: must be positive, got {self.mysql_timeout}")
        if not self.fifo:
            derived["fifo"] = self.control("validrcptto.trigger")
        if not self.status:
            derived["status"] = self.control("validrcptto.status")
        if self.publish:
            parse_targets(self.publish)                 # a malformed target: exit 2
        if self.publish_timeout <= 0:
            raise ConfigError(f"UPDATER_PUBLISH_TIMEOUT: must be positive, got "
                              f"{self.publish_timeout}")
        if self.uid_min > self.uid_max:
            raise ConfigError(f"uid range is empty: {self.uid_min} > {self.uid_max}")
        return dataclasses.replace(self, **derived) if derived else self


def shown_default(opt: Opt) -> str:
    """The default as --help and the README show it ("" when the help text says it)."""
    d = opt.default
    if d is None or d == "":
        return ""
    if opt.parse is _bool:
        return "on" if d else "off"
    if opt.parse is _mode:
        return f"{d:o}"
    if isinstance(d, float):
        return f"{d:g}"
    return str(d)


def add_arguments(parser: argparse.ArgumentParser, groups: tuple[str, ...],
                  names: tuple[str, ...] = ()) -> None:
    """Add a flag for every option of the given groups and of ``names`` (values are
    parsed later); each help ends with its environment variable and default."""
    for opt in OPTIONS:
        if opt.group not in groups and opt.name not in names:
            continue
        default = shown_default(opt)
        text = f"{opt.help} [${opt.env}" + (f"; default {default}]" if default else "]")
        if opt.parse is _bool:
            parser.add_argument(opt.cli, dest=opt.name, action="store_const", const="1",
                                default=None, help=text)
        else:
            parser.add_argument(opt.cli, dest=opt.name, metavar=opt.name.upper(),
                                default=None, help=text)


def load(args: argparse.Namespace | None = None,
         environ: Mapping[str, str] | None = None) -> Settings:
    """defaults <- environment <- flags, parsed and resolved."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        raw, origin = None, None
        if opt.env in environ:
            raw, origin = environ[opt.env], f"${opt.env}"
            if raw == "" and opt.default is None:
                raw = None   # an empty envdir file means "use the default"
        flag_value = getattr(args, opt.name, None) if args is not None else None
        if flag_value is not None:
            raw, origin = flag_value, opt.cli
        if raw is None:
            continue
        try:
            values[opt.name] = opt.parse(raw.strip() if opt.parse is not _str else raw)
        except ValueError as err:
            raise ConfigError(f"{origin}: {err}") from None
    if args is not None and getattr(args, "force", False):
        values["force"] = True
    return Settings(**values).resolve()


def option(name: str) -> Opt:
    return _BY_NAME[name]
