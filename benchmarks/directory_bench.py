"""How fast a change in a directory source is live (issue 32), with the real servers
started here:

- vpopmail on MariaDB (the single ``vpopmail`` table, every domain x its users, loaded
  with LOAD DATA): a new mailbox (the row inserted, then ``add_user u@d`` on the FIFO
  as vpopmail's onchange hook writes it) until the live cdb answers for it, against a
  cold full build of the same database;
- LDAP (OpenLDAP slapd, ``modifyTimestamp`` indexed, entries loaded with slapadd): the
  cost of one poll after one change (entries returned, time) at two directory sizes,
  and a new entry until it is live in a daemon polling every second.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import time

import trees
from run import QU, fmt_n, fmt_s, has_key, read_json, wait

POLL = 1.0                       # the LDAP benchmark daemon's UPDATER_LDAP_POLL


def run(bench) -> None:
    mysql(bench)
    ldap(bench)


# ---------------------------------------------------------------------------- MariaDB

def _mariadb(root: str) -> tuple[subprocess.Popen | None, str]:
    install, server = shutil.which("mariadb-install-db"), shutil.which("mariadbd")
    if not install or not server:
        return None, ""
    data, sock = os.path.join(root, "data"), os.path.join(root, "mysqld.sock")
    subprocess.run([install, "--no-defaults", f"--datadir={data}", "--skip-test-db",
                    "--auth-root-authentication-method=normal", "--user=root"],
                   check=True, capture_output=True, timeout=300)
    proc = subprocess.Popen([server, "--no-defaults", f"--datadir={data}", f"--socket={sock}",
                             "--skip-networking", "--user=root", "--skip-log-bin",
                             "--secure-file-priv=", "--innodb-buffer-pool-size=256M",
                             f"--pid-file={root}/mysqld.pid", f"--log-error={root}/error.log"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait(lambda: _sql(sock, "SELECT 1", check=False).returncode == 0, 60, "mariadbd")
    return proc, sock


def _sql(sock: str, statements: str, check: bool = True) -> subprocess.CompletedProcess:
    client = shutil.which("mariadb") or "mysql"
    return subprocess.run([client, "--no-defaults", "-S", sock, "-uroot"], input=statements,
                          text=True, capture_output=True, check=check, timeout=600)


def mysql(bench) -> None:
    n, domains = bench.sizes[-1], bench.domains
    root = os.path.join(bench.root, "mysql")
    os.makedirs(root)
    proc, sock = _mariadb(root)
    if proc is None:
        bench.row(what="new mailbox -> live, vpopmail on MariaDB", ours="n/a")
        return
    try:
        env = dict(trees.make_tree(root, domains, 0))      # vpopmail domains, no vpasswd users
        rows = os.path.join(root, "users.tsv")
        names = [d for d, _ in trees.domain_dirs(env)]
        with open(rows, "w") as f:
            for i in range(n):
                f.write(f"user{i:06d}\t{names[i % domains]}\tx\t0\n")
        _sql(sock, f"""
CREATE DATABASE vpopmail; USE vpopmail;
CREATE TABLE vpopmail (pw_name char(32) not null, pw_domain varchar(96) not null,
  pw_passwd varchar(128), pw_gid int, primary key (pw_name, pw_domain));
CREATE TABLE valias (alias char(32) not null, domain varchar(96) not null,
  valias_line text not null, index (alias, domain));
LOAD DATA INFILE '{rows}' INTO TABLE vpopmail;
""")
        from run import clean_env
        env = {**clean_env(), **env, "VALIDRCPTTO_CDB": os.path.join(root, "validrcptto.cdb"),
               "UPDATER_MYSQL": "1", "UPDATER_MYSQL_USER": "root",
               "UPDATER_MYSQL_SOCKET": sock, "UPDATER_MYSQL_DATABASE": "vpopmail",
               "UPDATER_FIFO": os.path.join(root, "trigger"),
               "UPDATER_STATUS": os.path.join(root, "status.json")}
        started = time.perf_counter()
        subprocess.run(QU + ["build", "--force"], env=env, check=True, capture_output=True)
        cold = time.perf_counter() - started
        _mysql_daemon(bench, env, sock, names, n, cold)
    finally:
        proc.terminate()
        proc.wait(60)


def _mysql_daemon(bench, env: dict[str, str], sock: str, names: list[str], n: int,
                  cold: float) -> None:
    from incremental_bench import _request
    cdb, status = env["VALIDRCPTTO_CDB"], env["UPDATER_STATUS"]
    log = open(os.path.join(os.path.dirname(cdb), "daemon.log"), "wb")
    daemon = subprocess.Popen(QU + ["run"], env=env, stderr=log, stdout=log)
    try:
        wait(lambda: (read_json(status) or {}).get("builds", 0) >= 1, 600, "first build")
        latencies: dict[str, list[float]] = {"5.4": [], "5.6": []}
        for i in range(2 * bench.runs):
            domain = names[(i * 37) % len(names)]
            name = f"newmbox{i}"
            _sql(sock, f"INSERT INTO vpopmail.vpopmail VALUES ('{name}', '{domain}', 'x', 0);")
            version = ("5.4", "5.6")[i % 2]
            started = time.perf_counter()
            _request(env["UPDATER_FIFO"],
                     f"add_user {name}@{domain}" + (" - " if version == "5.6" else ""))
            wait(lambda: has_key(cdb, f"{name}@{domain}".encode()), 60, "the new mailbox")
            latencies[version].append(time.perf_counter() - started)
            time.sleep(1.5)
        both = latencies["5.4"] + latencies["5.6"]
        lat = statistics.median(both)
        bench.row(what=f"new mailbox -> live, vpopmail on MariaDB, {len(names):,} domains x "
                  f"{fmt_n(n // len(names))}", ours=fmt_s(lat), reference=fmt_s(cold),
                  ratio=lat / cold, target="<= 1.0 s, <= 0.4x",
                  met=lat <= 1.0 and lat / cold <= 0.4)
        lat56 = statistics.median(latencies["5.6"])
        bench.row(what="  with vpopmail 5.6's line (add_user u@d - '')", ours=fmt_s(lat56),
                  reference=fmt_s(cold), ratio=lat56 / cold, target="<= 1.0 s, <= 0.4x",
                  met=lat56 <= 1.0 and lat56 / cold <= 0.4)
    finally:
        daemon.terminate()
        daemon.wait(60)
        log.close()


# ---------------------------------------------------------------------------- slapd

SUFFIX = "dc=bench,dc=example"


def _entries(count: int, start: int = 0) -> str:
    return "".join(f"dn: uid=u{i},{SUFFIX}\nobjectClass: inetOrgPerson\nuid: u{i}\ncn: U {i}\n"
                   f"sn: {i}\nmail: u{i}@corp.example\n\n" for i in range(start, start + count))


def _slapd(root: str, count: int) -> tuple[subprocess.Popen | None, str]:
    slapd, slapadd = shutil.which("slapd") or "/usr/sbin/slapd", shutil.which("slapadd") \
        or "/usr/sbin/slapadd"
    if not os.path.exists(slapd) or not os.path.exists(slapadd):
        return None, ""
    from server_bench import free_port
    os.makedirs(os.path.join(root, "db"))
    conf = os.path.join(root, "slapd.conf")
    with open(conf, "w") as f:
        f.write("".join(f"include /etc/ldap/schema/{s}.schema\n"
                        for s in ("core", "cosine", "inetorgperson")) +
                f"modulepath /usr/lib/ldap\nmoduleload back_mdb\npidfile {root}/slapd.pid\n"
                f"database mdb\nsuffix \"{SUFFIX}\"\nrootdn \"cn=admin,{SUFFIX}\"\n"
                f"rootpw secret\ndirectory {root}/db\nmaxsize 1073741824\n"
                "index objectClass eq\nindex mail pres,eq\nindex modifyTimestamp eq\n")
    ldif = os.path.join(root, "entries.ldif")
    with open(ldif, "w") as f:
        f.write(f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\no: B\n"
                f"dc: bench\n\n" + _entries(count))
    subprocess.run([slapadd, "-q", "-f", conf, "-l", ldif], check=True, capture_output=True,
                   timeout=900)
    uri = f"ldap://127.0.0.1:{free_port()}"
    proc = subprocess.Popen([slapd, "-d", "0", "-f", conf, "-h", uri + "/"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait(lambda: subprocess.run(["ldapsearch", "-x", "-H", uri, "-s", "base", "-b", "",
                                 "(objectClass=*)"], capture_output=True).returncode == 0,
         60, "slapd")
    return proc, uri


def _ldap_env(root: str, uri: str) -> dict[str, str]:
    from run import clean_env
    env = dict(trees.make_tree(root, 1, 0))
    qmail = env["QMAIL_DIR"]
    for name, text in (("rcpthosts", "corp.example\n"), ("locals", ""),
                       ("virtualdomains", ""), ("smtproutes", "corp.example:[192.0.2.50]\n"),
                       ("validrcptto.ldapdomains", "corp.example\n")):
        with open(os.path.join(qmail, "control", name), "w") as f:
            f.write(text)
    secret = os.path.join(root, "ldap.secret")
    with open(secret, "w") as f:
        f.write("secret\n")
    return {**clean_env(), **env, "UPDATER_LDAP_URI": uri,
            "UPDATER_LDAP_BIND_DN": f"cn=admin,{SUFFIX}", "UPDATER_LDAP_PASSWORD_FILE": secret,
            "UPDATER_LDAP_BASE": SUFFIX, "UPDATER_LDAP_FILTER": "(mail=*)",
            "UPDATER_LDAP_ATTRS": "mail", "UPDATER_LDAP_PAGE_SIZE": "1000",
            "VALIDRCPTTO_CDB": os.path.join(root, "validrcptto.cdb"),
            "UPDATER_FIFO": os.path.join(root, "trigger"),
            "UPDATER_STATUS": os.path.join(root, "status.json")}


def _add(uri: str, i: int) -> None:
    subprocess.run(["ldapadd", "-x", "-H", uri, "-D", f"cn=admin,{SUFFIX}", "-w", "secret"],
                   input=_entries(1, i), text=True, check=True, capture_output=True)


def ldap(bench) -> None:
    sizes = [10000, 100000] if bench.sizes[-1] >= 100000 else [500, 2000]
    for count in sizes:
        root = os.path.join(bench.root, f"ldap-{count}")
        os.makedirs(root)
        proc, uri = _slapd(root, count)
        if proc is None:
            bench.row(what=f"LDAP poll, {fmt_n(count)} entries", ours="n/a")
            continue
        try:
            env = _ldap_env(root, uri)
            _ldap_poll_rows(bench, env, uri, count)
            if count == sizes[-1]:
                _ldap_daemon(bench, env, uri, count)
        finally:
            proc.terminate()
            proc.wait(60)


def _ldap_poll_rows(bench, env: dict[str, str], uri: str, count: int) -> None:
    from updater.build.sources import ldap as source
    from updater.config import load
    s = load(environ=env)
    started = time.perf_counter()
    cache = source.read_all(s)
    full = time.perf_counter() - started
    # stamps are whole seconds and a poll asks from the newest one seen on, so the first
    # poll after a bulk load (slapadd: every entry in the same second or two) returns
    # that second's entries again; one change moves the mark, as in a living directory
    time.sleep(1.1)
    _add(uri, count)
    updates, mark, _ = source.poll(s, cache.mark)
    source.apply(cache, updates, mark)
    time.sleep(1.1)
    times, returned = [], []
    for i in range(1, bench.runs + 1):
        _add(uri, count + i)
        started = time.perf_counter()
        updates, mark, _ = source.poll(s, cache.mark)
        times.append(time.perf_counter() - started)
        returned.append(len(updates))
        source.apply(cache, updates, mark)
        time.sleep(1.1)
    t = statistics.median(times)
    bench.row(what=f"LDAP poll after one new entry, {fmt_n(count)} entries: entries returned",
              ours=str(max(returned)), target="independent of size",
              met=max(returned) <= 2)
    bench.row(what=f"  time per poll, {fmt_n(count)} entries (vs a full read)", ours=fmt_s(t),
              reference=fmt_s(full), ratio=t / full, target="independent of size", met=None)


def _ldap_daemon(bench, env: dict[str, str], uri: str, count: int) -> None:
    env = {**env, "UPDATER_LDAP_POLL": str(POLL)}
    cdb, status = env["VALIDRCPTTO_CDB"], env["UPDATER_STATUS"]
    log = open(os.path.join(os.path.dirname(cdb), "daemon.log"), "wb")
    daemon = subprocess.Popen(QU + ["run"], env=env, stderr=log, stdout=log)
    try:
        wait(lambda: (read_json(status) or {}).get("builds", 0) >= 1, 600, "first build")
        times = []
        for i in range(bench.runs):
            started = time.perf_counter()
            _add(uri, 2 * count + i)
            wait(lambda: has_key(cdb, f"u{2 * count + i}@corp.example".encode()), 60,
                 "the new entry")
            times.append(time.perf_counter() - started)
        lat = statistics.median(times)
        bench.row(what=f"new LDAP entry -> live (polling every {POLL:g} s), {fmt_n(count)}",
                  ours=fmt_s(lat), target=f"<= {POLL + 1:g} s", met=max(times) <= POLL + 1)
    finally:
        daemon.terminate()
        daemon.wait(60)
        log.close()
