"""One frozen settings object: defaults <- environment (a daemontools envdir) <- CLI flags.

Every setting is declared once, as a field of ``Settings`` (``setting``: its variable,
help, group, parser, bounds, choices); ``OPTIONS`` is read from those fields, the CLI
builds its flags and --help from it, and a test holds the README table and the shipped
env/ directory to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import declare
from .declare import Opt, _bool, _mode, declared, qmail_home, setting, shown_default
from .errors import ConfigError
from .targets import parse_targets


@dataclass(frozen=True)
class Settings:
    """Every setting of qmail-updater, each declared once: its field is its name, type
    and default; ``setting`` adds its environment variable, help, group, parser and
    bounds.  ``OPTIONS`` (argparse, --help, the README table, the env/ dirs) follows."""
    # where qmail lives and what the generator reads
    qmail_dir: str = qmail_home("qmail's home (control/, users/, alias/)")
    vpopmail_dir: str | None = setting(
        None, env="VPOPMAIL_DIR",
        help="vpopmail's home (default: ~vpopmail from passwd, else /home/vpopmail)")
    passwd: str = setting(
        "", env="UPDATER_PASSWD",
        help="read accounts from this passwd-format file instead of the system database")
    uid_min: int = setting(
        500, env="UPDATER_UID_MIN",
        help="lowest uid of a mail account")
    uid_max: int = setting(
        65000, env="UPDATER_UID_MAX",
        help="highest uid of a mail account")
    max_file_size: int = setting(
        1 << 30, env="UPDATER_MAX_FILE_SIZE",
        help="largest file the generator reads (bytes): a bigger one fails the build")
    qmail_ext: bool = setting(
        False, env="UPDATER_QMAIL_EXT",
        help="vpopmail built with --enable-qmail-ext: add user-default for every vpopmail user")
    vuserinfo: bool = setting(
        False, env="UPDATER_VUSERINFO",
        help="when a domain's vpasswd files are unreadable, ask VPOPMAIL_DIR/bin/vuserinfo -n -D")
    include: str = setting(
        "", env="UPDATER_INCLUDE", derived=True,
        help="site file of addresses always accepted "
        "(default QMAIL_DIR/control/validrcptto.include)")
    exclude: str = setting(
        "", env="UPDATER_EXCLUDE", derived=True,
        help="site file of addresses/@domains always rejected "
        "(default QMAIL_DIR/control/validrcptto.exclude)")
    # directory sources
    mysql: bool = setting(
        False, env="UPDATER_MYSQL", group="directory",
        help="read vpopmail users and valiases from MySQL/MariaDB instead of vpasswd files")
    mysql_config: str | None = setting(
        None, env="UPDATER_MYSQL_CONFIG", group="directory",
        help="vpopmail's MySQL settings, host|port|user|password|database "
        "(default VPOPMAIL_DIR/etc/vpopmail.mysql)")
    mysql_host: str = setting(
        "", env="UPDATER_MYSQL_HOST", group="directory",
        help="override the host")
    mysql_port: int = setting(
        0, env="UPDATER_MYSQL_PORT", group="directory",
        help="override the port")
    mysql_socket: str = setting(
        "", env="UPDATER_MYSQL_SOCKET", group="directory",
        help="connect by this Unix socket")
    mysql_user: str = setting(
        "", env="UPDATER_MYSQL_USER", group="directory",
        help="override the user")
    mysql_password_file: str = setting(
        "", env="UPDATER_MYSQL_PASSWORD_FILE", group="directory",
        help="override the password: read it from this file")
    mysql_database: str = setting(
        "", env="UPDATER_MYSQL_DATABASE", group="directory",
        help="override the database")
    mysql_layout: str = setting(
        "auto", env="UPDATER_MYSQL_LAYOUT", group="directory",
        choices=("auto", "single", "per-domain"),
        help="auto, single (table vpopmail) or per-domain (one table per domain)")
    mysql_valias: str = setting(
        "auto", env="UPDATER_MYSQL_VALIAS", group="directory", choices=("auto", "yes", "no"),
        help="read the valias table: auto (if it exists; a denied table fails the build), "
        "yes (required) or no")
    mysql_timeout: float = setting(
        30.0, env="UPDATER_MYSQL_TIMEOUT", group="directory", positive=True,
        help="seconds for connecting and for each MySQL read or write")
    ldap_uri: str = setting(
        "", env="UPDATER_LDAP_URI", group="directory",
        help="LDAP / Active Directory server, ldap://host or ldaps://host; several, blanks "
        "or commas between them: the first that answers, the last one used first (empty: "
        "off)")
    ldap_starttls: bool = setting(
        False, env="UPDATER_LDAP_STARTTLS", group="directory",
        help="use StartTLS on ldap://")
    ldap_ca_file: str = setting(
        "", env="UPDATER_LDAP_CA_FILE", group="directory",
        help="CA certificates (PEM) the directory's TLS certificate must chain to "
        "(empty: the system's store); the host name is checked too")
    ldap_insecure: bool = setting(
        False, env="UPDATER_LDAP_INSECURE", group="directory",
        help="do not verify the directory's TLS certificate (a warning at every full "
        "build: a man in the middle gets the bind password)")
    ldap_bind_dn: str = setting(
        "", env="UPDATER_LDAP_BIND_DN", group="directory",
        help="bind DN (empty: anonymous)")
    ldap_password_file: str = setting(
        "", env="UPDATER_LDAP_PASSWORD_FILE", group="directory",
        help="file holding the bind password")
    ldap_base: str = setting(
        "", env="UPDATER_LDAP_BASE", group="directory",
        help="search base DN")
    ldap_filter: str = setting(
        "(&(|(objectClass=user)(objectClass=group)(objectClass=contact)"
        "(objectClass=publicFolder))(|(mail=*)(proxyAddresses=*)))",
        env="UPDATER_LDAP_FILTER", group="directory",
        help="search filter (default: AD's mail-enabled users, groups, contacts, public folders)")
    ldap_attrs: str = setting(
        "mail,proxyAddresses", env="UPDATER_LDAP_ATTRS", group="directory",
        help="attributes holding addresses (proxyAddresses: only smtp: values)")
    ldap_addresses: str = setting(
        "proxy-first", env="UPDATER_LDAP_ADDRESSES", group="directory",
        choices=("proxy-first", "proxy", "all"),
        help="which addresses an entry gives: proxy-first (Exchange's rule: an entry with "
        "proxyAddresses is reached by their smtp: values alone, one without by its other "
        "attributes), proxy (smtp: proxyAddresses only: Exchange recipients only), all "
        "(every attribute's addresses)")
    ldap_page_size: int = setting(
        500, env="UPDATER_LDAP_PAGE_SIZE", group="directory",
        help="paged search page size (AD returns at most 1000 per page)")
    ldap_timeout: float = setting(
        30.0, env="UPDATER_LDAP_TIMEOUT", group="directory",
        help="seconds for connecting and for each LDAP operation")
    ldap_poll: float = setting(
        10.0, env="UPDATER_LDAP_POLL", group="directory",
        help="the daemon asks the directory for entries changed since its last poll this "
        "often (seconds; 0: only the safety net)")
    ldap_stamp: str = setting(
        "modifyTimestamp", env="UPDATER_LDAP_STAMP", group="directory",
        help="the change stamp the daemon's polls ask by (generalized time; Active "
        "Directory: whenChanged, as its modifyTimeStamp cannot be searched by)")
    ldap_full: float = setting(
        600.0, env="UPDATER_LDAP_FULL", group="directory", positive=True,
        help="seconds between the daemon's full reads of the directory (the safety net "
        "for what the polls and sweeps did not see)")
    ldap_sweep: float = setting(
        60.0, env="UPDATER_LDAP_SWEEP", group="directory",
        help="seconds between the polls that also list every entry's identity alone, so "
        "an entry deleted from a directory without tombstones (OpenLDAP) goes within "
        "this, not at the next full read (0: only the full reads)")
    ldap_domains: str = setting(
        "", env="UPDATER_LDAP_DOMAINS", derived=True, group="directory",
        help="file naming the domains listed from LDAP "
        "(default QMAIL_DIR/control/validrcptto.ldapdomains)")
    # install
    cdb: str = setting(
        "", env="VALIDRCPTTO_CDB", derived=True, group="install",
        help="validrcptto.cdb: the list that is installed, checked and published "
        "(default QMAIL_DIR/control/validrcptto.cdb)")
    max_shrink: float = setting(
        20.0, env="UPDATER_MAX_SHRINK", group="install",
        help="hold a domain whose new list refuses more than this percentage of the "
        "addresses it accepted within the hour (0 = no limit)")
    lock_timeout: float = setting(
        60.0, env="UPDATER_LOCK_TIMEOUT", group="install",
        help="seconds to wait for another build's lock before giving up")
    # daemon
    fifo: str = setting(
        "", env="UPDATER_FIFO", derived=True, group="daemon",
        help="trigger FIFO (default QMAIL_DIR/control/validrcptto.trigger)")
    fifo_mode: int = setting(
        0o620, env="UPDATER_FIFO_MODE", parse=_mode, group="daemon",
        help="octal mode of the trigger FIFO (set whenever the daemon opens it)")
    fifo_group: str = setting(
        "", env="UPDATER_FIFO_GROUP", group="daemon",
        help="group of the trigger FIFO, whose members (vpopmail's onchange hook) may write it "
        "(default: the vpopmail account's group, else vchkpw, else the daemon's own; a "
        "named group that does not exist: a warning, and the daemon's own)")
    min_interval: float = setting(
        30.0, env="UPDATER_MIN_INTERVAL", group="daemon",
        help="seconds between two builds triggered through the FIFO (file changes: no floor)")
    quiet: float = setting(
        2.0, env="UPDATER_QUIET", group="daemon",
        help="seconds without a new request before a build starts")
    max_delay: float = setting(
        30.0, env="UPDATER_MAX_DELAY", group="daemon",
        help="seconds after the first pending request when a build starts anyway")
    incremental: bool = setting(
        True, env="UPDATER_INCREMENTAL", group="daemon",
        help="redo only the domains a request names or whose files changed (0: every build "
        "is full)")
    target_quiet: float = setting(
        0.05, env="UPDATER_TARGET_QUIET", group="daemon",
        help="quiet period of a request naming a mailbox or alias being added (vpopmail's "
        "add_user, valias_insert, ...); removals wait UPDATER_QUIET")
    target_interval: float = setting(
        0.5, env="UPDATER_TARGET_INTERVAL", group="daemon",
        help="seconds from the end of an incremental build to the next (at least half the "
        "last one's duration): bursts coalesce, the daemon is never busy more than two "
        "thirds of the time")
    interval: float = setting(
        3600.0, env="UPDATER_INTERVAL", group="daemon",
        help="seconds between safety-net full builds (0 = never)")
    retry_min: float = setting(
        10.0, env="UPDATER_RETRY_MIN", group="daemon",
        help="first retry delay after a failed build, doubling")
    retry_max: float = setting(
        600.0, env="UPDATER_RETRY_MAX", group="daemon",
        help="longest retry delay after failed builds")
    status: str = setting(
        "", env="UPDATER_STATUS", derived=True, group="daemon",
        help="JSON status file (default QMAIL_DIR/control/validrcptto.status)")
    prom_file: str = setting(
        "", env="UPDATER_PROM_FILE", group="daemon",
        help="also write a node-exporter textfile here")
    poll: float = setting(
        0.0, env="UPDATER_POLL", group="daemon",
        help="watch files by polling every N seconds instead of inotify (0 = inotify)")
    # publish to the other MX hosts
    publish: str = setting(
        "", env="UPDATER_PUBLISH", group="publish",
        help="push each installed cdb to these targets: [user@]host:/path (ssh) or "
        "rsync://host[:port]/module/path, separated by spaces or commas")
    publish_timeout: float = setting(
        30.0, env="UPDATER_PUBLISH_TIMEOUT", group="publish", positive=True,
        help="seconds for connecting and for each rsync read or write (a push is killed after "
        "twice this)")
    rsync: str = setting(
        "rsync", env="UPDATER_RSYNC", group="publish",
        help="the rsync program")
    ssh_identity: str = setting(
        "", env="UPDATER_SSH_IDENTITY", group="publish",
        help="ssh private key for the ssh targets (default: ssh's own)")
    ssh_known_hosts: str = setting(
        "", env="UPDATER_SSH_KNOWN_HOSTS", group="publish",
        help="known_hosts file with the targets' host keys (default: ssh's own); unknown hosts "
        "are refused, never asked about")
    ssh_port: int = setting(
        0, env="UPDATER_SSH_PORT", group="publish",
        help="ssh port (0: ssh's default)")
    rsync_password_file: str = setting(
        "", env="UPDATER_RSYNC_PASSWORD_FILE", group="publish",
        help="password file for rsync:// targets that need one")
    force: bool = False              # --force of build/run: the gate is skipped

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
        if not self.fifo:
            derived["fifo"] = self.control("validrcptto.trigger")
        if not self.status:
            derived["status"] = self.control("validrcptto.status")
        if self.publish:
            parse_targets(self.publish)                 # a malformed target: exit 2
        if self.uid_min > self.uid_max:
            raise ConfigError(f"uid range is empty: {self.uid_min} > {self.uid_max}")
        return dataclasses.replace(self, **derived) if derived else self


OPTIONS = declared(Settings)
_BY_NAME = {o.name: o for o in OPTIONS}


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
    """defaults <- environment <- flags (``declare.load``), then resolved."""
    settings = declare.load(Settings, args, os.environ if environ is None else environ)
    if args is not None and getattr(args, "force", False):
        settings = dataclasses.replace(settings, force=True)
    return settings.resolve()


def option(name: str) -> Opt:
    return _BY_NAME[name]
