"""Directory sources against real servers started here on 127.0.0.1: MariaDB (vpopmail's
MySQL layouts) and OpenLDAP slapd with Microsoft's AD user schema (mail, proxyAddresses)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.net import free_port
from helpers.tools import need, script
from helpers.tree import Tree, found, keys_of

PASSWORD = "Sekrit-Pw-42"


def wait_until(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


# --------------------------------------------------------------------------- MariaDB

class MariaDB:
    def __init__(self, root: Path):
        self.root = root
        self.datadir = root / "data"
        self.socket = root / "mysqld.sock"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self, networking: bool = True) -> None:
        install, server = need("mariadb-install-db"), need("mariadbd")
        if not self.datadir.exists():
            subprocess.run([install, "--no-defaults", f"--datadir={self.datadir}",
                            "--auth-root-authentication-method=normal", "--skip-test-db",
                            "--user=root"], check=True, capture_output=True, timeout=120)
        self.proc = subprocess.Popen(
            [server, "--no-defaults", f"--datadir={self.datadir}", f"--socket={self.socket}",
             *([f"--port={self.port}", "--bind-address=127.0.0.1"] if networking
               else ["--skip-networking"]), "--user=root",
             f"--pid-file={self.root / 'mysqld.pid'}", f"--log-error={self.root / 'error.log'}",
             "--skip-log-bin", "--innodb-buffer-pool-size=16M"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: self.sql("SELECT 1", check=False).returncode == 0, 60, "mariadbd")

    def sql(self, statements: str, check: bool = True) -> subprocess.CompletedProcess:
        client = shutil.which("mariadb") or need("mysql")
        return subprocess.run([client, "--no-defaults", "-S", str(self.socket), "-uroot"],
                              input=statements, text=True, capture_output=True, check=check,
                              timeout=60)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(60)
            self.proc = None


@pytest.fixture(scope="module")
def mariadb(tmp_path_factory):
    db = MariaDB(tmp_path_factory.mktemp("mariadb"))
    db.start()
    db.sql(f"""
CREATE DATABASE vpopmail;
CREATE DATABASE vpopsplit;
CREATE USER 'vpop'@'%' IDENTIFIED BY '{PASSWORD}';
GRANT SELECT ON vpopmail.* TO 'vpop'@'%';
GRANT SELECT ON vpopsplit.* TO 'vpop'@'%';
USE vpopmail;
CREATE TABLE vpopmail (pw_name char(32) not null, pw_domain varchar(96) not null,
  pw_passwd varchar(128), pw_uid int, pw_gid int, pw_gecos varchar(48), pw_dir varchar(160),
  pw_shell varchar(20), pw_clear_passwd varchar(128), primary key (pw_name, pw_domain));
INSERT INTO vpopmail (pw_name, pw_domain, pw_passwd, pw_dir, pw_shell) VALUES
  ('ann', 'one.example', 'x', '/d/ann', 'NOQUOTA'),
  ('Bob', 'one.example', 'x', '/d/bob', 'NOQUOTA'),
  ('cat', 'two-b.example', 'x', '/d/cat', 'NOQUOTA'), ('dan', 'elsewhere.example', 'x', '/d', '');
-- vmoduser -b: BOUNCE_MAIL (0x10) in pw_gid; vdelivermail bounces these accounts' mail
INSERT INTO vpopmail (pw_name, pw_domain, pw_passwd, pw_gid) VALUES
  ('locked', 'one.example', 'x', 16), ('locked2', 'two-b.example', 'x', 49);
CREATE TABLE valias (alias char(32) not null, domain varchar(96) not null,
  valias_line text not null, index (alias, domain));
INSERT INTO valias VALUES ('info', 'one.example', '&ann@one.example'),
  ('info', 'one.example', '&bob@one.example'), ('help', 'two-b.example', '&cat@two-b.example');
USE vpopsplit;
CREATE TABLE one_example (pw_name char(32) not null primary key, pw_passwd varchar(128),
  pw_gid int);
CREATE TABLE two_b_example (pw_name char(32) not null primary key, pw_passwd varchar(128),
  pw_gid int);
INSERT INTO one_example VALUES ('split1', 'x', 0), ('split2', 'x', NULL), ('splitlock', 'x', 16);
INSERT INTO two_b_example VALUES ('split3', 'x', 32), ('split4', 'x', 17);
""")
    yield db
    db.stop()


def mysql_tree(tree: Tree, db: MariaDB) -> None:
    tree.control("rcpthosts", "one.example\ntwo-b.example\n")
    tree.control("virtualdomains", "one.example:one.example\ntwo-b.example:two-b.example\n")
    tree.vpop_domain("one.example", vpasswd=False, files=(".qmail-list", ".qmail-list-default"))
    tree.vpop_domain("two-b.example", vpasswd=False)
    tree.write("home/vpopmail/etc/vpopmail.mysql",
               f"# vpopmail's own settings\n127.0.0.1|{db.port}|vpop|{PASSWORD}|vpopmail\n"
               f"127.0.0.1|{db.port}|writer|other|vpopmail\n")


# --------------------------------------------------------------------------- incremental

INC_DOMAINS = ["one.example", "two-b.example"]
INC_NAMES = ["ann", "bob", "cy", "dee", "list", "info"]
MYSQL_OPS = st.tuples(st.sampled_from(["add_user", "del_user", "lock", "unlock",
                                       "valias_insert", "valias_delete",
                                       "valias_delete_domain"]),
                      st.integers(0, 1), st.integers(0, len(INC_NAMES) - 1))
SEED = """
DROP DATABASE IF EXISTS incdb; CREATE DATABASE incdb; USE incdb;
CREATE TABLE vpopmail (pw_name char(32) not null, pw_domain varchar(96) not null,
  pw_passwd varchar(128), pw_gid int, primary key (pw_name, pw_domain));
CREATE TABLE valias (alias char(32) not null, domain varchar(96) not null,
  valias_line text not null, index (alias, domain));
CREATE TABLE one_example (pw_name char(32) not null primary key, pw_passwd varchar(128),
  pw_gid int);
CREATE TABLE two_b_example LIKE one_example;
INSERT INTO vpopmail VALUES ('ann', 'one.example', 'x', 0), ('bob', 'two-b.example', 'x', 0);
INSERT INTO one_example VALUES ('ann', 'x', 0);
INSERT INTO valias VALUES ('info', 'one.example', '&ann@one.example');
GRANT SELECT ON incdb.* TO 'vpop'@'%';
"""


def mysql_change(db: MariaDB, layout: str, op: tuple[str, int, int]
                 ) -> tuple[str, frozenset[str] | None]:
    """One change as vpopmail's tools make it; (domain, what the onchange line names:
    the address, or None for a domain command)."""
    kind, i, j = op
    d, n = INC_DOMAINS[i], INC_NAMES[j]
    table = "vpopmail" if layout == "single" else d.replace(".", "_").replace("-", "_")
    key = f"pw_name = '{n}'" + (f" AND pw_domain = '{d}'" if layout == "single" else "")
    statement = {
        "add_user": f"INSERT IGNORE INTO {table} (pw_name, "
                    f"{'pw_domain, ' if layout == 'single' else ''}pw_passwd, pw_gid) VALUES "
                    f"('{n}', {repr(d) + ', ' if layout == 'single' else ''}'x', 0)",
        "del_user": f"DELETE FROM {table} WHERE {key}",
        "lock": f"UPDATE {table} SET pw_gid = 16 WHERE {key}",
        "unlock": f"UPDATE {table} SET pw_gid = 0 WHERE {key}",
        "valias_insert": f"INSERT INTO valias VALUES ('{n}', '{d}', '&ann@{d}')",
        "valias_delete": f"DELETE FROM valias WHERE alias = '{n}' AND domain = '{d}'",
        "valias_delete_domain": f"DELETE FROM valias WHERE domain = '{d}'",
    }[kind]
    db.sql(f"USE incdb; {statement};")
    return d, (None if kind == "valias_delete_domain" else frozenset({f"{n}@{d}"}))


@settings(max_examples=int(os.environ.get("QMAIL_MYSQL_EXAMPLES", "25")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(ops=st.lists(MYSQL_OPS, min_size=1, max_size=8),
       layout=st.sampled_from(["single", "per-domain"]))
def test_mysql_incremental_answers_as_full(mariadb: MariaDB, ops, layout):
    """vpopmail on MariaDB: after each change, the daemon's incremental build (the named
    rows asked again by their keys, the rest from memory) installs exactly what a full
    build of the same database installs, and asks the server a few rows, not the
    tables."""
    import tempfile

    from updater.config import load
    from updater.daemon import incremental
    mariadb.sql(SEED)
    root = Path(tempfile.mkdtemp(prefix="mysql-inc-"))
    try:
        tree = Tree(root)
        mysql_tree(tree, mariadb)
        env = tree.env(UPDATER_MYSQL="1", UPDATER_MYSQL_DATABASE="incdb",
                       UPDATER_MYSQL_LAYOUT=layout)
        s = load(environ={**env, "VALIDRCPTTO_CDB": str(root / "live.cdb")})
        s_full = load(environ={**env, "VALIDRCPTTO_CDB": str(root / "full.cdb")})
        _, snap, _ = incremental.full(s, force=True)
        for op in ops:
            domain, named = mysql_change(mariadb, layout, op)
            asked = snap.mysql.queries
            report, snap, _, _ = incremental.build(s, snap, {domain}, force=True,
                                                   rows={domain: named})
            incremental.full(s_full, force=True)
            assert found(root / "live.cdb") == found(root / "full.cdb"), \
                (op, layout, report.line())
            # a row: one question per list (users, valias) and the connection's probes
            assert snap.mysql.queries - asked <= (4 if named else 5), op
    finally:
        shutil.rmtree(root)


def test_mysql_single_table_layout_and_valias(tree: Tree, mariadb: MariaDB):
    mysql_tree(tree, mariadb)
    assert tree.keys("--mysql") == [
        "ann@one.example", "bob@one.example", "cat@two-b.example", "help@two-b.example",
        "info@one.example", "list-default@one.example", "list@one.example"]
    done = tree.run("generate", "--mysql", "--origins")
    assert f"ann@one.example\tmysql 127.0.0.1:{mariadb.port}/vpopmail table vpopmail" in done.stdout
    assert "info@one.example\tmysql" in done.stdout and "table valias" in done.stdout


def test_mysql_per_domain_layout_by_socket(tree: Tree, mariadb: MariaDB):
    mysql_tree(tree, mariadb)
    keys = tree.keys("--mysql", UPDATER_MYSQL_DATABASE="vpopsplit",
                     UPDATER_MYSQL_SOCKET=str(mariadb.socket))
    assert keys == ["list-default@one.example", "list@one.example", "split1@one.example",
                    "split2@one.example", "split3@two-b.example"]
    # the layout can be forced; a missing per-domain table is an error naming it
    done = tree.run("generate", "--mysql", "--mysql-layout", "per-domain")
    assert done.returncode == 1
    assert done.stderr.strip() == (f"qmail-updater: mysql 127.0.0.1:{mariadb.port}/vpopmail: "
                                   "no table one_example for one.example (and 1 more domains)")


def held_lines(stderr: str) -> dict[str, str]:
    """domain -> why, from ``build``'s ``held DOMAIN (...): WHY`` lines."""
    out = {}
    for line in stderr.splitlines():
        if line.startswith("qmail-updater: held "):
            domain, _, rest = line[len("qmail-updater: held "):].partition(" ")
            out[domain] = rest.partition("): ")[2]
    return out


def test_mysql_down_or_refusing_holds_its_domains_and_keeps_their_entries(
        tree: Tree, mariadb: MariaDB, tmp_path: Path):
    mysql_tree(tree, mariadb)
    assert tree.run("build", "--mysql").returncode == 0
    good = tree.cdb.read_bytes()
    wrong = tmp_path / "pw"
    wrong.write_text("not-the-password\n")
    done = tree.run("build", "--mysql", UPDATER_MYSQL_PASSWORD_FILE=str(wrong))
    assert done.returncode == 1
    held = held_lines(done.stderr)
    assert sorted(held) == ["one.example", "two-b.example"]
    assert held["one.example"].startswith(f"mysql 127.0.0.1:{mariadb.port}/vpopmail: "
                                          "cannot connect: (1045) Access denied for user 'vpop'@")
    assert "not-the-password" not in done.stderr and PASSWORD not in done.stderr
    assert tree.cdb.read_bytes() == good
    mariadb.stop()
    try:
        started = time.monotonic()
        done = tree.run("build", "--mysql", UPDATER_MYSQL_TIMEOUT="3")
        assert time.monotonic() - started < 8          # one connect, not one per domain
        assert done.returncode == 1
        assert held_lines(done.stderr)["two-b.example"].startswith(
            f"mysql 127.0.0.1:{mariadb.port}/vpopmail: cannot connect: (2003) Can't connect "
            "to MySQL server")
        assert len(done.stderr.strip().splitlines()) == 3
        assert PASSWORD not in done.stderr
        assert tree.cdb.read_bytes() == good
    finally:
        mariadb.start()


def test_mysql_valias_denied_fails_loud_and_no_skips_it(tree: Tree, mariadb: MariaDB):
    mysql_tree(tree, mariadb)
    mariadb.sql(f"""
CREATE USER IF NOT EXISTS 'noalias'@'%' IDENTIFIED BY '{PASSWORD}';
GRANT SELECT ON vpopmail.vpopmail TO 'noalias'@'%';
CREATE USER IF NOT EXISTS 'halfsplit'@'%' IDENTIFIED BY '{PASSWORD}';
GRANT SELECT ON vpopsplit.one_example TO 'halfsplit'@'%';
""")
    assert tree.run("build", "--mysql").returncode == 0
    good = tree.cdb.read_bytes()
    done = tree.run("build", "--mysql", UPDATER_MYSQL_USER="noalias")
    assert done.returncode == 1
    assert held_lines(done.stderr)["one.example"].startswith(
        f"mysql 127.0.0.1:{mariadb.port}/vpopmail: table valias: access denied for user "
        "'noalias': (1142)")
    assert len(done.stderr.strip().splitlines()) == 3 and PASSWORD not in done.stderr
    assert tree.cdb.read_bytes() == good
    done = tree.run("generate", "--mysql", UPDATER_MYSQL_USER="noalias", UPDATER_MYSQL_VALIAS="no")
    assert done.returncode == 0
    assert done.stdout.split() == ["ann@one.example", "bob@one.example", "cat@two-b.example",
                                   "list-default@one.example", "list@one.example"]
    assert "valias not read (UPDATER_MYSQL_VALIAS=no)" in done.stderr
    # a vpopmail built without valias: no table at all is fine for auto, an error for yes
    done = tree.run("generate", "--mysql", UPDATER_MYSQL_DATABASE="vpopsplit")
    assert done.returncode == 0, done.stderr
    done = tree.run("generate", "--mysql", UPDATER_MYSQL_DATABASE="vpopsplit",
                    UPDATER_MYSQL_VALIAS="yes")
    assert done.returncode == 1 and "no table valias" in done.stderr
    # a per-domain table the user may not read
    done = tree.run("generate", "--mysql", UPDATER_MYSQL_DATABASE="vpopsplit",
                    UPDATER_MYSQL_USER="halfsplit", UPDATER_MYSQL_LAYOUT="per-domain",
                    UPDATER_MYSQL_VALIAS="no")
    assert done.returncode == 1
    assert "table two_b_example: access denied for user 'halfsplit'" in done.stderr


def test_mysql_alias_domain_mailboxes_are_its_real_domains(mariadb: MariaDB):
    """``vaddaliasdomain alias.example one.example`` (the real vpopmail 5.6 tool writes
    ``+alias.example-:one.example:...`` to users/assign): on MySQL the alias domain's
    mailboxes are one.example's rows, asked for by the real domain as vget_assign does,
    in both layouts."""
    from helpers.vpopmail import Vpopmail
    vp = Vpopmail("5.6.13")
    vp.tool("vadddomain", "one.example", "pw", daemon=False)
    vp.domain_dir("one.example").joinpath(".qmail-default").write_text(
        f"| {vp.vpop / 'bin'}/vdelivermail '' bounce-no-mailbox\n")
    vp.tool("vaddaliasdomain", "alias.example", "one.example", daemon=False)
    assert "+alias.example-:one.example:" in (vp.qmail / "users/assign").read_text()
    (vp.vpop / "etc").mkdir(exist_ok=True)
    (vp.vpop / "etc/vpopmail.mysql").write_text(
        f"127.0.0.1|{mariadb.port}|vpop|{PASSWORD}|vpopmail\n")
    for database, mailboxes in (("vpopmail", ("ann", "bob", "info")),
                                ("vpopsplit", ("split1", "split2"))):
        vp.reset_cdb()                          # (a list of its own for each database)
        done = subprocess.run([script("qmail-updater"), "build", "--mysql"], env=vp.env(
            UPDATER_MYSQL_DATABASE=database), capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        for name in mailboxes:
            assert vp.accepts(f"{name}@one.example", f"{name}@alias.example"), name
        assert vp.refuses("nobody@alias.example", "locked@alias.example")


def test_mysql_localhost_means_the_socket(tree: Tree, mariadb: MariaDB, tmp_path: Path):
    mysql_tree(tree, mariadb)
    tree.write("home/vpopmail/etc/vpopmail.mysql", f"localhost|0|vpop|{PASSWORD}|vpopmail\n")
    mariadb.stop()
    mariadb.start(networking=False)
    try:
        keys = tree.keys("--mysql", MYSQL_UNIX_PORT=str(mariadb.socket))
        assert "ann@one.example" in keys and "info@one.example" in keys
        # the option files' [client] socket= is the next default
        from updater.build.sources.mysql import option_socket
        conf = tmp_path / "conf.d"
        conf.mkdir()
        (conf / "50-client.cnf").write_text(f"[client]\nsocket = {mariadb.socket}\n")
        (tmp_path / "my.cnf").write_text(f"[mysqld]\nsocket=/wrong\n!includedir {conf}\n")
        assert option_socket([str(tmp_path / "my.cnf")], env={}) == str(mariadb.socket)
        assert option_socket([str(tmp_path / "none.cnf")], env={}) == "/run/mysqld/mysqld.sock"
        # 127.0.0.1 stays TCP, which this server does not offer
        tree.write("home/vpopmail/etc/vpopmail.mysql",
                   f"127.0.0.1|{mariadb.port}|vpop|x|vpopmail\n")
        done = tree.run("generate", "--mysql", MYSQL_UNIX_PORT=str(mariadb.socket))
        assert done.returncode == 1 and "(2003)" in done.stderr
    finally:
        mariadb.stop()
        mariadb.start()


def test_mysql_timeout_on_a_hung_server(tree: Tree, mariadb: MariaDB):
    mysql_tree(tree, mariadb)
    os.kill(mariadb.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        done = tree.run("generate", "--mysql", UPDATER_MYSQL_TIMEOUT="2")
        elapsed = time.monotonic() - started
    finally:
        os.kill(mariadb.proc.pid, signal.SIGCONT)
    assert done.returncode == 1 and "cannot connect" in done.stderr, done.stderr
    assert elapsed < 10, elapsed


def test_mysql_domain_returning_nothing_is_caught_by_the_gate(tree: Tree, mariadb: MariaDB):
    mysql_tree(tree, mariadb)
    tree.control("rcpthosts", "one.example\ntwo-b.example\n" +
                 "".join(f"pad{i}.example\n" for i in range(20)))
    tree.control("smtproutes", "".join(f"pad{i}.example:[192.0.2.1]\n" for i in range(20)))
    assert tree.run("build", "--mysql").returncode == 0
    good = tree.cdb.read_bytes()
    mariadb.sql("DELETE FROM vpopmail.vpopmail WHERE pw_domain = 'two-b.example';"
                "DELETE FROM vpopmail.valias WHERE domain = 'two-b.example';")
    try:
        done = tree.run("build", "--mysql")          # shrinks by 2 of 29: under 20 %
        assert done.returncode == 1
        assert done.stderr.strip().splitlines()[0] == (
            "qmail-updater: warning: two-b.example: qmail delivers no address there (its mail "
            "ends at ~alias or bounces)")
        assert held_lines(done.stderr) == {"two-b.example": (
            "two-b.example had 2 entries and now has none; did a source return nothing?")}
        assert tree.cdb.read_bytes() == good
    finally:
        mariadb.sql("INSERT INTO vpopmail.vpopmail (pw_name, pw_domain) VALUES "
                    "('cat', 'two-b.example');"
                    "INSERT INTO vpopmail.valias VALUES ('help', 'two-b.example', '&x');")


# --------------------------------------------------------------------------- OpenLDAP

CONTACT_SCHEMA = """\
objectclass ( 1.2.840.113556.1.5.15 NAME 'contact' SUP organizationalPerson STRUCTURAL
  MAY ( mail $ proxyAddresses $ instanceType $ objectCategory ) )
"""


def user(i: int) -> str:
    return (f"dn: cn=User {i},ou=people,dc=corp,dc=example\nobjectClass: user\ncn: User {i}\n"
            f"sn: {i}\ninstanceType: 4\nnTSecurityDescriptor:: AAAA\n"
            "objectCategory: CN=Person,CN=Schema,CN=Configuration,DC=corp,DC=example\n"
            f"mail: User{i}@Corp.Example\nproxyAddresses: SMTP:User{i}@Corp.Example\n"
            f"proxyAddresses: smtp:u{i}@corp.example\n"
            f"proxyAddresses: X400:c=US;a= ;p=Corp;o=Exchange;s={i};\n"
            f"proxyAddresses: sip:u{i}@corp.example\n\n")


LDIF = ("dn: dc=corp,dc=example\nobjectClass: dcObject\nobjectClass: organization\no: Corp\n"
        "dc: corp\n\ndn: ou=people,dc=corp,dc=example\nobjectClass: organizationalUnit\n"
        "ou: people\n\n" + "".join(user(i) for i in range(25)) +
        "dn: cn=Sales,ou=people,dc=corp,dc=example\nobjectClass: group\ncn: Sales\n"
        "groupType: 8\ninstanceType: 4\nnTSecurityDescriptor:: AAAA\n"
        "objectCategory: CN=Group,CN=Schema,CN=Configuration,DC=corp,DC=example\n"
        "mail: sales@corp.example\nproxyAddresses: smtp:vertrieb@corp.example\n"
        "proxyAddresses: SMTP:sales@other.example\n\n"
        "dn: cn=Partner,ou=people,dc=corp,dc=example\nobjectClass: contact\ncn: Partner\n"
        "sn: Partner\nmail: partner@outside.example\nproxyAddresses: SMTP:partner@outside.example\n"
        "proxyAddresses: smtp:partner@corp.example\n\n"
        "dn: cn=No Mail,ou=people,dc=corp,dc=example\nobjectClass: user\ncn: No Mail\nsn: x\n"
        "instanceType: 4\nnTSecurityDescriptor:: AAAA\n"
        "objectCategory: CN=Person,CN=Schema,CN=Configuration,DC=corp,DC=example\n\n")


class Slapd:
    def __init__(self, root: Path, tls: str = ""):
        self.root = root
        self.port = free_port()
        self.uri = f"ldap://127.0.0.1:{self.port}/"
        self.proc = None
        self.tls = tls                        # slapd.conf TLS lines (and an ldaps:// port)
        self.tls_port = free_port() if tls else 0

    def start(self) -> None:
        slapd = need("slapd")
        (self.root / "db").mkdir(exist_ok=True)
        (self.root / "contact.schema").write_text(CONTACT_SCHEMA)
        schema = "/etc/ldap/schema"
        conf = self.root / "slapd.conf"
        conf.write_text(
            "".join(f"include {schema}/{s}.schema\n"
                    for s in ("core", "cosine", "inetorgperson", "nis", "msuser")) +
            f"include {self.root}/contact.schema\n"
            "modulepath /usr/lib/ldap\nmoduleload back_mdb\n"
            f"pidfile {self.root}/slapd.pid\n"
            "database mdb\nsuffix \"dc=corp,dc=example\"\n"
            "index objectClass eq\nindex modifyTimestamp eq\n"
            "rootdn \"cn=admin,dc=corp,dc=example\"\n"
            f"rootpw {PASSWORD}\ndirectory {self.root}/db\n"
            # like AD: plain searches stop at 10 entries, paged ones get everything
            "limits * size.soft=10 size.hard=10 size.pr=10 size.prtotal=unlimited\n")
        if self.tls:
            conf.write_text(self.tls + conf.read_text())
        urls = self.uri + (f" ldaps://127.0.0.1:{self.tls_port}/" if self.tls else "")
        self.proc = subprocess.Popen([slapd, "-d", "0", "-f", str(conf), "-h", urls],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        search = need("ldapsearch")
        wait_until(lambda: subprocess.run([search, "-x", "-H", self.uri, "-s", "base", "-b", "",
                                           "(objectClass=*)"], capture_output=True
                                          ).returncode in (0, 32), 30, "slapd")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(30)
            self.proc = None


@pytest.fixture(scope="module")
def slapd(tmp_path_factory):
    yield from running_slapd(tmp_path_factory)


def running_slapd(tmp_path_factory):
    """A slapd with the fixture's entries, for one test module."""
    server = Slapd(tmp_path_factory.mktemp("slapd"))
    server.start()
    subprocess.run([need("ldapadd"), "-x", "-H", server.uri, "-D", "cn=admin,dc=corp,dc=example",
                    "-w", PASSWORD], input=LDIF, text=True, check=True, capture_output=True)
    yield server
    server.stop()


def ldap_tree(tree: Tree, server: Slapd, password: str = PASSWORD) -> dict[str, str]:
    tree.control("rcpthosts", "corp.example\nlocal.example\n")
    tree.control("locals", "local.example\n")
    tree.control("smtproutes", "corp.example:[192.0.2.50]\n")     # the Exchange server
    tree.control("validrcptto.ldapdomains", "corp.example\n")
    tree.account("joe")
    pw = tree.write("etc/ldap.secret", password + "\n", mode=0o600)
    return dict(UPDATER_LDAP_URI=server.uri, UPDATER_LDAP_BIND_DN="cn=admin,dc=corp,dc=example",
                UPDATER_LDAP_PASSWORD_FILE=str(pw), UPDATER_LDAP_BASE="dc=corp,dc=example",
                UPDATER_LDAP_PAGE_SIZE="7")


def test_ldap_addresses_paged_search_and_domain_filter(tree: Tree, slapd: Slapd):
    env = ldap_tree(tree, slapd)
    keys = tree.keys(**env)
    expected = sorted({f"user{i}@corp.example" for i in range(25)} |
                      {f"u{i}@corp.example" for i in range(25)} |
                      {"vertrieb@corp.example", "partner@corp.example",
                       "joe@local.example", "alias@local.example"})
    assert keys == expected                       # 53 keys: more than one 7-entry page
    done = tree.run("generate", "--origins", **env)
    assert f"vertrieb@corp.example\tldap {slapd.uri} base dc=corp,dc=example" in done.stdout
    # the group's mail value is none of its proxy addresses: Exchange does not route it
    # (UPDATER_LDAP_ADDRESSES=proxy-first); "all" lists it too
    assert tree.keys(**env, UPDATER_LDAP_ADDRESSES="all") == sorted(
        [*expected, "sales@corp.example"])


def test_ldap_failures_keep_the_cdb(tree: Tree, slapd: Slapd):
    env = ldap_tree(tree, slapd)
    assert tree.run("build", **env).returncode == 0
    good = tree.cdb.read_bytes()
    bad = tree.write("etc/wrong.secret", "wrong-password\n")
    done = tree.run("build", **{**env, "UPDATER_LDAP_PASSWORD_FILE": str(bad)})
    assert done.returncode == 1
    assert held_lines(done.stderr) == {
        "corp.example": f"ldap {slapd.uri}: bind failed: invalidCredentials (49)"}
    assert "wrong-password" not in done.stderr
    done = tree.run("build", **{**env, "UPDATER_LDAP_BASE": "dc=nowhere,dc=example"})
    assert done.returncode == 1
    assert held_lines(done.stderr) == {
        "corp.example": f"ldap {slapd.uri}: search failed: noSuchObject (32)"}
    slapd.stop()
    try:
        tree.account("newbie")                          # the local domain goes on
        done = tree.run("build", **env)
        assert done.returncode == 1
        assert held_lines(done.stderr)["corp.example"].startswith(
            f"ldap {slapd.uri}: connect failed: LDAPSocketOpenError")
        assert len(done.stderr.strip().splitlines()) == 2
        before = tree.root / "before.cdb"
        before.write_bytes(good)
        assert keys_of(tree.cdb) == keys_of(before) | {"newbie@local.example"}
    finally:
        slapd.start()


def test_ldap_configured_without_domains_file(tree: Tree, slapd: Slapd):
    env = ldap_tree(tree, slapd)
    (tree.qmail / "control/validrcptto.ldapdomains").unlink()
    done = tree.run("generate", **env)
    assert done.returncode == 1
    assert done.stderr.strip() == (f"qmail-updater: {tree.qmail}/control/"
                                   "validrcptto.ldapdomains: missing")


def ldap_change(server: Slapd, ldif: str, tool: str = "ldapmodify") -> None:
    subprocess.run([need(tool), "-x", "-H", server.uri, "-D", "cn=admin,dc=corp,dc=example",
                    "-w", PASSWORD], input=ldif, text=True, check=True, capture_output=True)


def test_ldap_poll_reads_only_what_changed(tree: Tree, slapd: Slapd):
    """A poll asks for the entries changed since the newest change stamp seen: a new
    entry, one changed, one that no longer has an address (gone); a deleted entry is
    found by the next full read.  Each poll's searches do not grow with the directory."""
    from updater.build.sources import ldap
    from updater.config import load
    env = ldap_tree(tree, slapd)
    s = load(environ=tree.env(**env))
    cache = ldap.read_all(s)
    assert len(cache.entries) == 27 and cache.mark
    time.sleep(1.1)                                # a new second: stamps are in seconds
    ldap_change(slapd, user(100), "ldapadd")
    ldap_change(slapd, "dn: cn=User 3,ou=people,dc=corp,dc=example\nchangetype: modify\n"
                       "replace: proxyAddresses\nproxyAddresses: smtp:third@corp.example\n\n"
                       "dn: cn=User 4,ou=people,dc=corp,dc=example\nchangetype: modify\n"
                       "delete: mail\n-\ndelete: proxyAddresses\n\n")
    updates, mark, count = ldap.poll(s, cache.mark)
    searches = count.searches
    # entries are keyed by their entryUUID (asked for: it is operational), not their DN
    assert all(k.startswith("entryUUID:") for k in [*cache.entries, *updates])
    new = [k for k in updates if k not in cache.entries and updates[k]]
    assert len(new) == 1 and "u100@corp.example" in updates[new[0]]
    assert ["third@corp.example"] in updates.values()    # (its mail is no proxy address)
    assert [] in updates.values()                  # user 4, no address now
    # (and the entries of the newest stamp's second: stamps are whole seconds, so a poll
    # asks from that second on)
    assert searches >= 2 and mark > cache.mark       # (pages of 7 here)
    assert ldap.apply(cache, updates, mark) == {"corp.example"}
    wanted = set(cache.addresses({"corp.example"}))
    assert {"user100@corp.example", "u100@corp.example", "third@corp.example"} <= wanted
    assert not {"u3@corp.example", "user4@corp.example", "u4@corp.example"} & wanted
    # nothing changed since: the poll returns the last second's entries, which change nothing
    first = set(updates)
    updates, mark2, _ = ldap.poll(s, mark)
    assert set(updates) <= first
    assert ldap.apply(cache, updates, mark2) == set()
    # a deletion: invisible to a poll (OpenLDAP keeps no tombstones), found by a sweep
    # (the identities alone) and by a full read
    ldap_change(slapd, "dn: cn=User 100,ou=people,dc=corp,dc=example\nchangetype: delete\n\n")
    updates, mark3, _ = ldap.poll(s, cache.mark)
    ldap.apply(cache, updates, mark3)
    assert "u100@corp.example" in cache.addresses({"corp.example"})
    swept, mark4, _ = ldap.poll(s, cache.mark, kept=set(cache.entries))
    gone = [k for k, v in swept.items() if v == [] and k in cache.entries]
    assert len(gone) == 1 and cache.entries[gone[0]] == ["user100@corp.example",
                                                          "u100@corp.example"]
    fresh = ldap.read_all(s)
    assert ldap.apply(cache, fresh.entries, fresh.mark, whole=True) == {"corp.example"}
    assert "u100@corp.example" not in cache.addresses({"corp.example"})
    assert ldap.apply(cache, swept, mark4) == set()        # (the same answer, once more)
    ldap_change(slapd, user(3).replace("dn: ", "dn: ", 1).split("\n", 1)[0] +
                "\nchangetype: delete\n\n")
    ldap_change(slapd, user(3), "ldapadd")        # put the fixture's entries back
    ldap_change(slapd, "dn: cn=User 4,ou=people,dc=corp,dc=example\nchangetype: delete\n\n")
    ldap_change(slapd, user(4), "ldapadd")


def test_daemon_polls_ldap_and_keeps_the_list_when_it_is_down(tree: Tree, slapd: Slapd):
    """A mailbox created in the directory is live within the poll interval plus a second,
    with no trigger; a directory that goes away costs one line and keeps the list."""
    import json

    from helpers.daemon import Running
    env = ldap_tree(tree, slapd)
    r = Running(tree, UPDATER_LDAP_POLL="0.5", UPDATER_LDAP_FULL="600", **env)
    try:
        ldap_change(slapd, user(200), "ldapadd")
        added = time.monotonic()
        wait_until(lambda: "u200@corp.example" in keys_of(tree.cdb), 5, "the new entry")
        assert time.monotonic() - added <= 0.5 + 1 + 0.5     # poll + 1 s (+ the wait's step)
        assert r.count(r"build \(directory changed: corp.example\): installed .*"
                       r"\[incremental: 1 domain: corp.example\]") == 1
        slapd.stop()
        try:
            r.wait(r"directory poll failed: ldap .*connect failed: .*; list kept; retry in", 5)
            time.sleep(2)
            assert r.count("directory poll failed") == 1          # one line, not one a poll
            assert "u200@corp.example" in keys_of(tree.cdb)
            status = json.loads((tree.qmail / "control/validrcptto.status").read_text())
            assert status["result"] == "installed"
        finally:
            slapd.start()
        r.wait(r"directory poll works again after \d+ failure", 10)
    finally:
        assert r.stop() == 0
        ldap_change(slapd, "dn: cn=User 200,ou=people,dc=corp,dc=example\n"
                           "changetype: delete\n\n")


def test_daemon_sees_an_openldap_deletion_at_the_next_sweep(tree: Tree, slapd: Slapd):
    """OpenLDAP keeps no tombstones: a deleted entry is gone from the live list at the
    next sweep (UPDATER_LDAP_SWEEP: a poll that also lists the identities), not at the
    full read 600 s away; the other entries stay."""
    from helpers.daemon import Running
    env = ldap_tree(tree, slapd)
    ldap_change(slapd, user(300), "ldapadd")
    r = Running(tree, UPDATER_LDAP_POLL="0.5", UPDATER_LDAP_SWEEP="1",
                UPDATER_LDAP_FULL="600", **env)
    try:
        wait_until(lambda: "u300@corp.example" in keys_of(tree.cdb), 5, "the entry")
        ldap_change(slapd, "dn: cn=User 300,ou=people,dc=corp,dc=example\n"
                           "changetype: delete\n\n")
        deleted = time.monotonic()
        wait_until(lambda: "u300@corp.example" not in keys_of(tree.cdb), 10,
                   "the deletion:\n" + "\n".join(r.lines))
        assert time.monotonic() - deleted <= 1 + 0.5 + 1 + 0.5   # sweep, poll, build, step
        assert "u3@corp.example" in keys_of(tree.cdb)
        assert r.count("full build") == 0 and r.count(r"build \(start\)") == 1
    finally:
        assert r.stop() == 0


def test_an_entry_from_the_future_never_stops_the_polls(tree: Tree, slapd: Slapd):
    """An entry stamped 2099 (set with the relax control, as a DC whose clock ran ahead
    leaves it): logged once, the mark stays at the last true stamp, and an entry added
    afterwards is live within a poll, not at the next full read."""
    from helpers.daemon import Running
    env = ldap_tree(tree, slapd)
    future = ("dn: cn=User 5,ou=people,dc=corp,dc=example\nchangetype: modify\n"
              "replace: modifyTimestamp\nmodifyTimestamp: 20991231000000Z\n\n")
    subprocess.run([need("ldapmodify"), "-x", "-e", "relax", "-H", slapd.uri, "-D",
                    "cn=admin,dc=corp,dc=example", "-w", PASSWORD], input=future, text=True,
                   check=True, capture_output=True)
    r = Running(tree, UPDATER_LDAP_POLL="0.5", UPDATER_LDAP_FULL="600", **env)
    try:
        r.wait(r"directory entry stamped in the future \(20991231000000Z\): "
               r"cn=user 5,ou=people,dc=corp,dc=example", 5)
        time.sleep(1.1)
        ldap_change(slapd, user(300), "ldapadd")
        wait_until(lambda: "u300@corp.example" in keys_of(tree.cdb), 5, "the new entry")
        time.sleep(1)
        assert r.count("stamped in the future") == 1
    finally:
        assert r.stop() == 0
        ldap_change(slapd, "dn: cn=User 300,ou=people,dc=corp,dc=example\n"
                           "changetype: delete\n\n")


def test_ldap_later_rule():
    from updater.build.sources.ldap import later, stamp_ceiling
    ceiling = stamp_ceiling(0.0)
    assert ceiling == "19700101000500Z"
    future: dict[str, str] = {}
    assert later("19700101000000Z", "19700101000400Z", "a", future, ceiling) == "19700101000400Z"
    assert later("19700101000400Z", "20991231000000Z", "b", future, ceiling) == "19700101000400Z"
    assert later("19700101000400Z", "20991231000000.5Z", "c", future, ceiling) == \
        "19700101000400Z"
    assert future == {"b": "20991231000000Z", "c": "20991231000000.5Z"}


@pytest.fixture(scope="module")
def tls_slapd(tmp_path_factory):
    """A slapd with a certificate for ``localhost`` from a CA of the test's own, on
    ldaps:// and (StartTLS) ldap://."""
    openssl = need("openssl")
    root = tmp_path_factory.mktemp("tls-slapd")
    ca, key = root / "ca.pem", root / "ca.key"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=Test CA", "-keyout", str(key), "-out", str(ca)],
                   check=True, capture_output=True)
    (root / "ext").write_text("subjectAltName=DNS:localhost\n")
    subprocess.run([openssl, "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
                    "-keyout", str(root / "server.key"), "-out", str(root / "server.csr")],
                   check=True, capture_output=True)
    subprocess.run([openssl, "x509", "-req", "-in", str(root / "server.csr"), "-CA", str(ca),
                    "-CAkey", str(key), "-CAcreateserial", "-days", "2", "-extfile",
                    str(root / "ext"), "-out", str(root / "server.pem")],
                   check=True, capture_output=True)
    server = Slapd(root, tls=f"TLSCACertificateFile {ca}\nTLSCertificateFile {root}/server.pem\n"
                   f"TLSCertificateKeyFile {root}/server.key\n")
    server.start()
    subprocess.run([need("ldapadd"), "-x", "-H", server.uri, "-D", "cn=admin,dc=corp,dc=example",
                    "-w", PASSWORD], input=LDIF, text=True, check=True, capture_output=True)
    server.ca = ca
    yield server
    server.stop()


def test_ldap_tls_verifies_the_certificate_by_default(tree: Tree, tls_slapd: Slapd):
    """ldaps:// and StartTLS: a certificate from a CA the host does not trust, or for
    another name than the URI's, is refused before the password is sent (the domain
    keeps its list); UPDATER_LDAP_CA_FILE makes it trusted; UPDATER_LDAP_INSECURE skips
    the check, with a warning."""
    env = ldap_tree(tree, tls_slapd)
    port, tls_port = tls_slapd.port, tls_slapd.tls_port
    ldaps = {**env, "UPDATER_LDAP_URI": f"ldaps://localhost:{tls_port}"}
    ca = {"UPDATER_LDAP_CA_FILE": str(tls_slapd.ca)}
    done = tree.run("build", **ldaps, **ca)
    assert done.returncode == 0, done.stderr
    assert "u1@corp.example" in keys_of(tree.cdb)
    for why, extra in (("an untrusted CA", {}),
                       ("another name", {"UPDATER_LDAP_URI": f"ldaps://127.0.0.1:{tls_port}",
                                         **ca}),
                       ("StartTLS, an untrusted CA",
                        {"UPDATER_LDAP_URI": f"ldap://localhost:{port}",
                         "UPDATER_LDAP_STARTTLS": "1"})):
        done = tree.run("build", **{**ldaps, **extra})
        assert done.returncode == 1, why
        held = held_lines(done.stderr)["corp.example"]
        assert held.startswith(("ldap ldaps://", "ldap ldap://")) and (
            "certificate" in held.lower() or "CERTIFICATE_VERIFY_FAILED" in held), (why, held)
        assert PASSWORD not in done.stderr
        assert "u1@corp.example" in keys_of(tree.cdb), why          # the list is kept
    done = tree.run("build", **{**ldaps, "UPDATER_LDAP_URI": f"ldap://localhost:{port}",
                                "UPDATER_LDAP_STARTTLS": "1", **ca})
    assert done.returncode == 0, done.stderr
    done = tree.run("build", **ldaps, UPDATER_LDAP_INSECURE="1")
    assert done.returncode == 0, done.stderr
    assert f"UPDATER_LDAP_INSECURE: ldaps://localhost:{tls_port}'s certificate is not " \
        "verified" in done.stderr


def test_a_moved_entry_is_followed_by_its_uuid(tree: Tree, slapd: Slapd):
    """A user moved to another OU, then an alias of it removed: the moved entry replaces
    its old self (keyed by entryUUID, not DN), so the alias is refused within a poll,
    not at the next full read."""
    from helpers.daemon import Running
    env = ldap_tree(tree, slapd)
    ldap_change(slapd, "dn: ou=moved,dc=corp,dc=example\nobjectClass: organizationalUnit\n"
                       "ou: moved\n\n", "ldapadd")
    r = Running(tree, UPDATER_LDAP_POLL="0.5", UPDATER_LDAP_FULL="600", **env)
    try:
        assert "u7@corp.example" in keys_of(tree.cdb)
        subprocess.run([need("ldapmodrdn"), "-x", "-H", slapd.uri, "-D",
                        "cn=admin,dc=corp,dc=example", "-w", PASSWORD, "-s",
                        "ou=moved,dc=corp,dc=example", "cn=User 7,ou=people,dc=corp,dc=example",
                        "cn=User 7"], check=True, capture_output=True)
        time.sleep(1.5)                            # a poll sees the move (a new second)
        ldap_change(slapd, "dn: cn=User 7,ou=moved,dc=corp,dc=example\nchangetype: modify\n"
                           "replace: proxyAddresses\nproxyAddresses: SMTP:User7@Corp.Example\n\n")
        wait_until(lambda: "u7@corp.example" not in keys_of(tree.cdb), 5, "the alias gone")
        assert "user7@corp.example" in keys_of(tree.cdb)
    finally:
        assert r.stop() == 0
        ldap_change(slapd, "dn: cn=User 7,ou=moved,dc=corp,dc=example\nchangetype: delete\n\n"
                           "dn: ou=moved,dc=corp,dc=example\nchangetype: delete\n\n")
        ldap_change(slapd, user(7), "ldapadd")


def test_entry_key_rule():
    from updater.build.sources.ldap import entry_key
    assert entry_key("cn=a", {"entryUUID": ["0E2F-AB"]}) == "entryUUID:0e2f-ab"
    assert entry_key("cn=a", {"objectGUID": [b"\x01\xff"]}) == "objectGUID:01ff"
    assert entry_key("cn=a", {"entryUUID": []}) == "cn=a"


def test_ldap_change_stamps_never_become_filter_syntax():
    from updater.build.sources.ldap import stamp
    assert stamp({"modifyTimestamp": ["20261205031000Z"]}) == "20261205031000Z"
    assert stamp({"whenChanged": ["20261205031000.0Z"]}, "whenChanged") == "20261205031000.0Z"
    assert stamp({"modifyTimestamp": ["2026*)(objectClass=*"]}) == ""
    assert stamp({}) == ""


def test_ldap_addresses_rule():
    from updater.build.sources.ldap import addresses
    values = {"mail": ["A@B.example"],
              "proxyAddresses": ["SMTP:A@B.example", "smtp:c@b.example", "X400:c=US;",
                                 "sip:x@b.example", b"smtp:d@e"]}
    assert addresses(values, ["mail", "proxyAddresses"]) == [
        "a@b.example", "a@b.example", "c@b.example", "d@e"]


def test_each_address_rule_on_an_entry():
    """UPDATER_LDAP_ADDRESSES: proxy-first (the default) takes the smtp: proxy addresses
    of an entry that has any and the mail of one that has none; proxy only the former;
    all every attribute's."""
    from updater.build.sources.ldap import addresses
    attrs = ["mail", "proxyAddresses"]
    renamed = {"mail": ["old@b.example"], "proxyAddresses": ["SMTP:new@b.example",
                                                             "X500:/o=Corp/cn=new"]}
    plain = {"mail": ["m@b.example"]}                     # OpenLDAP, or no Exchange
    x400_only = {"mail": ["x@b.example"], "proxyAddresses": ["X400:c=US;"]}
    assert addresses(renamed, attrs, "proxy-first") == ["new@b.example"]
    assert addresses(plain, attrs, "proxy-first") == ["m@b.example"]
    assert addresses(x400_only, attrs, "proxy-first") == []   # has proxies: none smtp:
    assert addresses(renamed, attrs, "proxy") == ["new@b.example"]
    assert addresses(plain, attrs, "proxy") == []
    assert addresses(renamed, attrs, "all") == ["old@b.example", "new@b.example"]
    assert addresses(plain, ["mail"], "proxy-first") == ["m@b.example"]


def test_ldap_servers_in_order_and_another_dc_means_a_full_read(tree: Tree, slapd: Slapd):
    """UPDATER_LDAP_URI may name several servers: the first that answers is used, the one
    the last read used is asked first, and when a poll is answered by another server than
    the one its mark came from (each AD DC stamps its own changes), it reads everything
    instead and the daemon logs why.  Every server down: one error naming each."""
    from updater.build.sources import ldap
    from updater.build.sources.ldapconn import Server
    from updater.config import load
    from updater.daemon.directorypoll import applied, ask, poll
    from updater.errors import SourceError
    env = ldap_tree(tree, slapd)
    dead = f"ldap://127.0.0.1:{free_port()}"
    s = load(environ=tree.env(**{**env, "UPDATER_LDAP_URI": f"{dead}, {slapd.uri}"}))
    cache = ldap.read_all(s)
    assert cache.server == Server(slapd.uri, slapd.uri)      # (OpenLDAP: no dsServiceName)
    assert len(cache.entries) == 27
    updates, mark, count = ldap.poll(s, cache.mark, cache.server)
    assert not count.complete and len(updates) < len(cache.entries)
    other = Server("ldap://dc2.corp.example", "cn=ntds settings,cn=dc2,cn=servers")
    cache.server = other
    event = poll(s, ask(s, cache, False, time.monotonic()))
    assert event.full and len(event.updates or {}) == 27 and event.server.uri == slapd.uri
    assert event.note == (f"directory polls answered by {slapd.uri} ({slapd.uri}), not "
                          f"{other.dc}: its change stamps are its own, so a full read")
    applied(cache, event)
    assert cache.server.uri == slapd.uri and cache.mark == event.mark
    down = load(environ=tree.env(**{**env, "UPDATER_LDAP_URI":
                                    f"{dead} ldap://127.0.0.1:{free_port()}"}))
    with pytest.raises(SourceError) as err:
        ldap.read_all(down)
    assert str(err.value).count(": connect failed: ") == 2 and dead in str(err.value)
