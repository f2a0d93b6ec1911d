"""Against a real Active Directory: a Samba 4 domain controller (Debian's samba),
provisioned by the test and run in a network namespace of its own (AD's LDAP is on port
389), populated as an Exchange organisation is.  What each address rule
(UPDATER_LDAP_ADDRESSES) lists, and a deletion seen by the next poll through AD's
tombstones rather than at the next full read."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers.daemon import Running
from helpers.tools import CI, need, script
from helpers.tree import Tree, keys_of
from helpers.wait import wait_for

pytestmark = pytest.mark.slow

ADMIN, PASSWORD = "CN=Administrator,CN=Users,DC=corp,DC=example", "Passw0rd!x9"
LOGIN = f"-UCORP\\Administrator%{PASSWORD}"            # (the ldb tools' form)
USERS = "CN=Users,DC=corp,DC=example"


@dataclass
class DC:
    pid: int                 # a process in the DC's network namespace
    root: Path

    def inside(self) -> list[str]:
        return [need("nsenter"), "-t", str(self.pid), "-n"]

    def ldif(self, tool: str, text: str) -> None:
        path = self.root / "change.ldif"
        path.write_text(text)
        done = subprocess.run([*self.inside(), need(tool), "-H", "ldap://127.0.0.1",
                               LOGIN, str(path)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr + done.stdout

    def delete(self, dn: str) -> None:
        done = subprocess.run([*self.inside(), need("ldbdel"), "-H", "ldap://127.0.0.1",
                               LOGIN, dn],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr + done.stdout


@pytest.fixture(scope="module")
def dc(tmp_path_factory):
    if os.geteuid() != 0:
        msg = "a Samba AD DC in a network namespace needs root (unshare -n)"
        if CI:
            pytest.fail(msg + " -- required under CI=true")
        pytest.skip(msg)
    samba_tool, samba = need("samba-tool"), need("samba")
    root = tmp_path_factory.mktemp("ad")
    (root / "run").mkdir()
    done = subprocess.run(
        [samba_tool, "domain", "provision", "--server-role=dc", "--use-rfc2307",
         "--dns-backend=NONE", "--realm=CORP.EXAMPLE", "--domain=CORP",
         f"--adminpass={PASSWORD}", f"--targetdir={root}", "--host-name=dc1",
         "--option=interfaces=lo", "--option=bind interfaces only=yes",
         f"--option=pid directory = {root}/run"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    conf = root / "etc/smb.conf"              # simple binds over plain LDAP, as in a lab
    conf.write_text(conf.read_text().replace(
        "[global]\n", "[global]\n\tldap server require strong auth = no\n", 1))
    proc = subprocess.Popen(
        [need("unshare"), "-n", "--fork", "--kill-child", "sh", "-c",
         f"ip link set lo up && exec {samba} -s {root}/etc/smb.conf -i -M single"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    server = DC(proc.pid, root)

    def answers() -> bool:
        got = subprocess.run([*server.inside(), need("ldbsearch"), "-H", "ldap://127.0.0.1",
                              LOGIN, "-s", "base", "-b", "",
                              "highestCommittedUSN"], capture_output=True, text=True)
        return got.returncode == 0 and "highestCommittedUSN" in got.stdout
    try:
        wait_for(answers, 90, "the Samba DC's LDAP")
        server.ldif("ldbadd", "".join(exchange_user(f"u{i}", [f"SMTP:u{i}@corp.example"])
                                      for i in range(12)) + ORGANISATION)
        yield server
    finally:                  # (a throw-away DC: samba -i takes ~10 s over a SIGTERM)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def exchange_user(name: str, proxies: list[str], mail: str | None = None) -> str:
    lines = [f"dn: CN={name},{USERS}", "objectClass: user", f"sAMAccountName: {name}"]
    if mail:
        lines.append(f"mail: {mail}")
    lines += [f"proxyAddresses: {p}" for p in proxies]
    return "\n".join(lines) + "\n\n"


ORGANISATION = (
    exchange_user("ann", ["SMTP:ann@corp.example", "smtp:a.example@corp.example",
                          "X500:/o=Corp/ou=Exchange/cn=Recipients/cn=ann",
                          "SIP:ann@corp.example"], "ann@corp.example")
    # a mail value and no proxy address: no Exchange recipient (MS-ADA3 2.169)
    + exchange_user("bob", [], "bob@corp.example")
    # mail left from before a rename; Exchange routes by the proxy address
    + exchange_user("cat", ["SMTP:cat@corp.example"], "cat.old@corp.example")
    + f"dn: CN=Sales,{USERS}\nobjectClass: group\nsAMAccountName: sales\n"
      "mail: sales@corp.example\nproxyAddresses: SMTP:sales@corp.example\n"
      "proxyAddresses: smtp:vertrieb@corp.example\n\n"
    + f"dn: CN=Partner,{USERS}\nobjectClass: contact\nmail: partner@outside.example\n"
      "proxyAddresses: SMTP:partner@outside.example\n"
      "proxyAddresses: smtp:partner@corp.example\n\n")

EVERYONE = {f"u{i}@corp.example" for i in range(12)} | {
    "ann@corp.example", "a.example@corp.example", "cat@corp.example",
    "sales@corp.example", "vertrieb@corp.example", "partner@corp.example"}


def ad_tree(tree: Tree, **extra: str) -> dict[str, str]:
    tree.control("rcpthosts", "corp.example\n")
    tree.control("smtproutes", "corp.example:[192.0.2.50]\n")      # the Exchange server
    tree.control("validrcptto.ldapdomains", "corp.example\n")
    pw = tree.write("etc/ad.secret", PASSWORD + "\n", mode=0o600)
    return dict(UPDATER_LDAP_URI="ldap://127.0.0.1", UPDATER_LDAP_BIND_DN=ADMIN,
                UPDATER_LDAP_PASSWORD_FILE=str(pw), UPDATER_LDAP_BASE="CN=Users,DC=corp,"
                "DC=example", UPDATER_LDAP_STAMP="whenChanged", **extra)


def generate(dc: DC, tree: Tree, env: dict[str, str]) -> set[str]:
    done = subprocess.run([*dc.inside(), script("qmail-updater"), "generate"],
                          env=tree.env(**env), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def test_each_address_rule_lists_what_it_says(tree: Tree, dc: DC):
    env = ad_tree(tree)
    assert generate(dc, tree, env) == EVERYONE | {"bob@corp.example"}       # proxy-first
    assert generate(dc, tree, {**env, "UPDATER_LDAP_ADDRESSES": "proxy"}) == EVERYONE
    assert generate(dc, tree, {**env, "UPDATER_LDAP_ADDRESSES": "all"}) == \
        EVERYONE | {"bob@corp.example", "cat.old@corp.example"}
    done = subprocess.run([*dc.inside(), script("qmail-updater"), "generate"],
                          env=tree.env(**env, UPDATER_LDAP_ADDRESSES="exchange"),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "UPDATER_LDAP_ADDRESSES" in done.stderr, done.stderr


def test_the_polls_know_which_domain_controller_answered(tree: Tree, dc: DC):
    """AD's change stamps are each DC's own: the source names the DC by its rootDSE
    dsServiceName (its NTDS Settings object), which is what the polls are pinned to."""
    env = ad_tree(tree)
    code = ("from updater.config import load; from updater.build.sources import ldap; "
            "c = ldap.read_all(load()); print(c.server.uri, c.server.dc, sep='|')")
    done = subprocess.run([*dc.inside(), sys.executable, "-c", code], env=tree.env(**env),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    uri, ident = done.stdout.strip().split("|")
    assert uri == "ldap://127.0.0.1"
    assert ident.startswith("cn=ntds settings,cn=dc1,cn=servers,") and \
        ident.endswith(",cn=configuration,dc=corp,dc=example"), ident


def test_a_deletion_is_gone_at_the_next_poll_through_the_tombstone(tree: Tree, dc: DC):
    """The full read is 600 s away: the deleted user's address goes with the poll that
    asks for tombstones changed since its mark (AD strips mail and proxyAddresses from
    them and keeps the objectGUID the entry was kept by)."""
    env = ad_tree(tree, UPDATER_LDAP_POLL="1", UPDATER_LDAP_FULL="600")
    r = Running(tree, prefix=dc.inside(), **env)
    try:
        wait_for(lambda: "u3@corp.example" in keys_of(tree.cdb), 30, "the first build")
        time.sleep(1.1)                     # whenChanged is in whole seconds
        started = time.monotonic()
        dc.delete(f"CN=u3,{USERS}")
        wait_for(lambda: "u3@corp.example" not in keys_of(tree.cdb), 15,
                 "the deletion in the live list:\n" + "\n".join(r.lines))
        assert time.monotonic() - started < 15
        assert "u4@corp.example" in keys_of(tree.cdb)
        assert not [line for line in r.lines if "held" in line]
        # and a new user by the same poll path
        dc.ldif("ldbadd", exchange_user("dee", ["SMTP:dee@corp.example"]))
        wait_for(lambda: "dee@corp.example" in keys_of(tree.cdb), 15, "the new user")
    finally:
        r.stop()
