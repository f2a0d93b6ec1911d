"""The generator, through the real CLI: one fixture tree per rule, exact key sets."""

from __future__ import annotations

import subprocess
import sys

from helpers.daemon import without_dac_override
from helpers.tools import need
from helpers.tree import Tree


def base(tree: Tree, rcpthosts: str, locals_: str = "", vd: str = "", sr: str = "") -> None:
    tree.control("me", "mail.example.com\n")
    tree.control("rcpthosts", rcpthosts)
    tree.control("locals", locals_)
    if vd:
        tree.control("virtualdomains", vd)
    if sr:
        tree.control("smtproutes", sr)


def alias_at(*domains: str) -> list[str]:
    """qmail delivers ``alias@`` a local domain itself: qmail-getpw finds the alias
    account (it owns ~alias) and qmail-local, with no extension, never bounces."""
    return [f"alias@{d}" for d in domains]


# --------------------------------------------------------------------------- local domains

def test_local_accounts_uid_range_and_dot_qmail_files(tree: Tree):
    base(tree, "example.com\n", "example.com\n")
    tree.account("joe", 1000, files=(".qmail", ".qmail-lists", ".qmail-lists-default",
                                     ".qmail-a:b", ".qmail-bad.dot", ".qmail-Caps"))
    tree.account("system", 100)            # below 500
    tree.account("nobody", 65534)          # above 65000
    tree.account("toor", 0)                # uid 0 never
    tree.account("nohome", 1001, home=False)
    tree.account("Mixed", 1002)            # qmail-getpw ignores names with capitals
    tree.account("edge", 500)
    tree.account("edge2", 65000)
    assert tree.keys() == sorted(alias_at("example.com") + [
        "edge2@example.com", "edge@example.com",
        "joe-a.b@example.com", "joe-a:b@example.com",       # qmail-local reads .qmail-a:b
        "joe-lists-default@example.com", "joe-lists@example.com", "joe@example.com",
    ])


def test_uid_range_is_configurable(tree: Tree):
    base(tree, "example.com\n", "example.com\n")
    tree.account("low", 100)
    tree.account("joe", 1000)
    want = alias_at("example.com") + ["low@example.com"]
    assert tree.keys("--uid-min", "100", "--uid-max", "200") == want
    assert tree.keys(UPDATER_UID_MIN="100", UPDATER_UID_MAX="200") == want


def test_me_is_local_only_when_locals_is_absent(tree: Tree):
    tree.control("me", "mail.example.com\n")
    tree.control("rcpthosts", "mail.example.com\n")
    tree.account("joe")
    # control/me is also envnoathost's default, so bare local parts are listed too
    assert tree.keys() == ["alias", "alias@mail.example.com", "joe", "joe@mail.example.com"]
    tree.control("locals", "")
    done = tree.run("generate")
    assert done.returncode == 1 and "mail.example.com is listed but not handled" in done.stderr


def test_bare_keys_follow_envnoathost(tree: Tree):
    base(tree, "example.com\nother.example\n", "example.com\nother.example\n")
    tree.control("envnoathost", "other.example\n")
    tree.account("joe")
    assert tree.keys() == ["alias", "alias@example.com", "alias@other.example", "joe",
                           "joe@example.com", "joe@other.example"]


# --------------------------------------------------------------------------- aliases

def test_alias_files_for_local_and_alias_domains(tree: Tree):
    base(tree, "example.com\naliases.example\nvirt.example\n", "example.com\n",
         vd="aliases.example:alias\nvirt.example:virt.example\n")
    tree.vpop_domain("virt.example", users=("ann",))
    for name in (".qmail-postmaster", ".qmail-mailer-daemon", ".qmail-owner-default"):
        tree.write(f"var/qmail/alias/{name}", "joe\n")
    # aliases.example:alias: qmail-getpw finds the alias account, ext = the local part;
    # at a local domain the alias account also answers alias-NAME
    assert tree.keys() == sorted(alias_at("example.com") + [
        "alias-mailer-daemon@example.com", "alias-owner-default@example.com",
        "alias-postmaster@example.com",
        "ann@virt.example",
        "mailer-daemon@aliases.example", "mailer-daemon@example.com",
        "owner-default@aliases.example", "owner-default@example.com",
        "postmaster@aliases.example", "postmaster@example.com",
    ])


def test_fastforward_aliases_cdb_made_by_setforward(tree: Tree):
    setforward = need("setforward")
    base(tree, "example.com\nexample.org\nremote.example\n", "example.com\nexample.org\n",
         sr="remote.example:[192.0.2.1]\n")
    aliases = tree.root / "etc/aliases.cdb"
    # setforward's input: "address: target,...;" ; it lowercases the addresses
    source = ("Sales@Example.COM: joe@example.com;\n"
              "webmaster@: joe@example.com;\n"
              "@example.org: joe@example.com;\n"
              "far@elsewhere.example: joe@example.com;\n")
    subprocess.run([setforward, str(aliases), str(aliases) + ".tmp"], input=source.encode(),
                   check=True)
    tree.write("var/qmail/alias/.qmail-default", f"| fastforward -d {aliases}\n")
    # fastforward sees $DEFAULT@$HOST: "alias-sales" reaches it as sales@example.com too;
    # under @example.org nothing else needs a key
    assert tree.keys() == ["@example.org", "@remote.example", "alias-sales@example.com",
                           "alias-webmaster@example.com", "alias@example.com",
                           "sales@example.com", "webmaster@example.com"]


def test_alias_default_without_fastforward_is_a_catch_all(tree: Tree):
    base(tree, "example.com\n", "example.com\n")
    tree.write("var/qmail/alias/.qmail-default", "./Maildir/\n")
    done = tree.run("generate")
    assert done.returncode == 0
    assert done.stdout.splitlines() == ["@example.com"]
    assert (f"{tree.qmail}/alias/.qmail-default accepts every address at example.com: "
            "@example.com is a catch-all") in done.stderr


def test_fastforward_cdb_missing_fails(tree: Tree):
    base(tree, "example.com\n", "example.com\n")
    tree.write("var/qmail/alias/.qmail-default", "| fastforward -d /nonexistent/aliases.cdb\n")
    done = tree.run("generate")
    assert done.returncode == 1 and done.stdout == ""
    assert "/nonexistent/aliases.cdb, which does not exist" in done.stderr


# --------------------------------------------------------------------------- virtual domains

def test_vpopmail_domain_users_valias_and_ezmlm(tree: Tree):
    base(tree, "vpop.example\n", vd="vpop.example:vpop.example\n")
    tree.vpop_domain("vpop.example", users=("Mary", "pete"),
                     files=(".qmail-info", ".qmail-list", ".qmail-list-default",
                            ".qmail-list-owner", ".qmail-list-return-default"))
    # list-owner and list-return-* are under list-default already: no keys of their own
    assert tree.keys() == ["info@vpop.example", "list-default@vpop.example",
                           "list@vpop.example", "mary@vpop.example", "pete@vpop.example"]
    assert tree.keys("--qmail-ext") == [
        "info@vpop.example", "list-default@vpop.example", "list@vpop.example",
        "mary-default@vpop.example", "mary@vpop.example", "pete-default@vpop.example",
        "pete@vpop.example"]


def test_vpasswd_cdb_when_no_text_file(tree: Tree):
    import cdbx
    base(tree, "vpop.example\n", vd="vpop.example:vpop.example\n")
    d = tree.vpop_domain("vpop.example", vpasswd=False)
    maker = cdbx.CDB.make(str(d / "vpasswd.cdb"))
    for u in (b"ann", b"bob"):
        maker.add(u, b"$1$x$y\x001\x000\x00gecos")
    maker.commit().close()
    assert tree.keys() == ["ann@vpop.example", "bob@vpop.example"]


def test_hashed_domain_layout_found_through_users_assign(tree: Tree):
    base(tree, "big.example\n", vd="big.example:big.example\n")
    tree.vpop_domain("big.example", users=("zed",), sub="7")
    assert tree.keys() == ["zed@big.example"]


def test_catch_all_vpopmail_domain(tree: Tree):
    base(tree, "catch.example\n", vd="catch.example:catch.example\n")
    tree.vpop_domain("catch.example", users=("a",),
                     default="| /home/vpopmail/bin/vdelivermail '' delete")
    done = tree.run("generate")
    assert done.stdout.splitlines() == ["@catch.example"]
    assert "@catch.example is a catch-all" in done.stderr


def test_plain_virtual_domain_by_passwd_prepend(tree: Tree):
    base(tree, "plain.example\n", vd="plain.example:fred\n")
    tree.account("fred", 1200, files=(".qmail", ".qmail-sales", ".qmail-help-default"))
    # fred is a system account but plain.example is not local: only its .qmail-EXT files
    assert tree.keys() == ["help-default@plain.example", "sales@plain.example"]


def test_single_address_entries_exceptions_and_wildcards(tree: Tree):
    base(tree, "a.example\nsub.wild.example\nex.example\n", "",
         vd="boss@a.example:fred\nceo@a.example:wild\n.wild.example:wild\nex.example:\n",
         sr="a.example:[192.0.2.1]\n:smarthost.example\n")
    tree.account("wild", 1300, files=(".qmail-x", ".qmail-ceo"))
    # boss@a.example goes to local part fred-boss: no account fred, ~alias has nothing
    # for it: qmail bounces it although a.example is relayed; ceo@ reaches ~wild/.qmail-ceo
    assert tree.keys() == ["@a.example", "@ex.example", "boss@a.example -",
                           "ceo@sub.wild.example", "x@sub.wild.example"]


def test_morercpthosts_cdb_is_part_of_the_universe(tree: Tree):
    import cdbx
    base(tree, "example.com\n", "example.com\n", sr="more.example:[192.0.2.1]\n")
    maker = cdbx.CDB.make(str(tree.qmail / "control/morercpthosts.cdb"))
    maker.add(b"more.example", b"")
    maker.commit().close()
    tree.account("joe")
    assert tree.keys() == ["@more.example", "alias@example.com", "joe@example.com"]


# --------------------------------------------------------------------------- site files

def test_site_include_and_exclude(tree: Tree):
    base(tree, "example.com\ncatch.example\ngone.example\n", "example.com\n",
         sr="catch.example:[192.0.2.1]\ngone.example:[192.0.2.1]\n")
    tree.account("joe")
    tree.account("ann", 1001)
    tree.control("validrcptto.include", "# extra\nExtra@Example.COM\nlist-default@example.com\n")
    tree.control("validrcptto.exclude", "ann@example.com\ntrap@catch.example\n@gone.example\n")
    assert tree.keys() == ["@catch.example", "@gone.example -", "alias@example.com",
                           "ann@example.com -",
                           "extra@example.com", "joe@example.com", "list-default@example.com",
                           "trap@catch.example -"]
    done = tree.run("generate", "--origins")
    assert "ann@example.com -\texclude file " in done.stdout


def test_site_files_are_configurable_and_validated(tree: Tree):
    base(tree, "example.com\n", "example.com\n")
    inc = tree.write("site/inc", "one@example.com\ntwo words@example.com\n")
    done = tree.run("generate", "--include", str(inc))
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip() == (f"qmail-updater: {inc}:2: not an address, -default address "
                                   "or @domain: 'two words@example.com'")


def test_output_is_sorted_deduplicated_lowercase(tree: Tree):
    base(tree, "example.com\nEXAMPLE.com\n", "example.com\n")
    tree.account("joe", files=(".qmail-x",))
    tree.control("validrcptto.include", "JOE@example.com\nJoe-X@Example.Com\n")
    assert tree.keys() == ["alias@example.com", "joe-x@example.com", "joe@example.com"]


# --------------------------------------------------------------------------- failures

def failing(tree: Tree, *args: str, **env: str) -> str:
    """Run generate and build; both fail with one line, no stdout, old cdb untouched."""
    tree.cdb.write_bytes(b"old cdb, not touched")
    done = tree.run("generate", *args, **env)
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    errors = [line for line in lines if ": warning: " not in line]
    assert len(errors) == 1, done.stderr
    built = tree.run("build", *args, **env)
    assert built.returncode == 1
    assert tree.cdb.read_bytes() == b"old cdb, not touched"
    return errors[0]


def test_missing_rcpthosts(tree: Tree):
    assert failing(tree) == f"qmail-updater: {tree.qmail}/control/rcpthosts: missing"


def test_unclassified_domain(tree: Tree):
    base(tree, "example.com\nstray.example\nother.example\n", "example.com\n")
    assert failing(tree) == (
        f"qmail-updater: {tree.qmail}/control/rcpthosts:2: stray.example is listed but not "
        "handled by this server: not in locals, virtualdomains or smtproutes "
        "(and 1 more: other.example)")


def test_wildcard_rcpthosts_is_an_error(tree: Tree):
    base(tree, "example.com\n.example.com\n", "example.com\n")
    assert ("rcpthosts:2: '.example.com' matches every subdomain" in failing(tree))


def test_malformed_virtualdomains_line(tree: Tree):
    base(tree, "example.com\n", "example.com\n", vd="# comment\nexample.org example\n")
    assert failing(tree) == (f"qmail-updater: {tree.qmail}/control/virtualdomains:2: malformed "
                             "line (expected 'domain:value'): 'example.org example'")


def test_malformed_vpasswd_line(tree: Tree):
    base(tree, "vpop.example\n", vd="vpop.example:vpop.example\n")
    d = tree.vpop_domain("vpop.example", users=("ann",))
    with open(d / "vpasswd", "a") as f:
        f.write("broken-line-without-fields\n")
    assert failing(tree) == (f"qmail-updater: {d}/vpasswd:2: expected "
                             "'name:pass:uid:gid:gecos:dir:quota': 'broken-line-without-fields'")


def test_missing_domain_directory(tree: Tree):
    base(tree, "vpop.example\n", vd="vpop.example:vpop.example\n")
    d = tree.vpop_domain("vpop.example", users=("ann",))
    d.rename(d.with_name("moved"))
    assert failing(tree) == (f"qmail-updater: {d}: home directory of {tree.qmail}/users/cdb "
                             "entry '+vpop.example-' does not exist")


def test_unreadable_domain_dir(tree: Tree):
    base(tree, "vpop.example\n", vd="vpop.example:vpop.example\n")
    d = tree.vpop_domain("vpop.example", users=("ann",))
    prefix = without_dac_override()
    d.chmod(0o000)
    try:
        done = subprocess.run(prefix + [sys.executable, "-m", "updater", "generate"],
                              env=tree.env(), capture_output=True, text=True, timeout=60)
    finally:
        d.chmod(0o755)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip() == (f"qmail-updater: {d}: cannot read directory: "
                                   "Permission denied")


def test_vuserinfo_fallback_and_its_failure(tree: Tree):
    base(tree, "vpop.example\n", vd="vpop.example:vpop.example\n")
    d = tree.vpop_domain("vpop.example", users=("ann",), vpasswd=False)
    prog = tree.write("home/vpopmail/bin/vuserinfo",
                      "#!/bin/sh\n[ \"$1 $2 $3\" = \"-n -D vpop.example\" ] || exit 9\n"
                      "printf 'ann\\nbob\\n'\n", mode=0o755)
    done = tree.run("generate")        # not enabled: no vpasswd is an error
    assert done.returncode == 1 and "neither vpasswd nor vpasswd.cdb" in done.stderr
    assert tree.keys("--vuserinfo") == ["ann@vpop.example", "bob@vpop.example"]
    prog.write_text("#!/bin/sh\necho 'Error: no such domain' >&2\nexit 3\n")
    assert failing(tree, "--vuserinfo") == (
        f"qmail-updater: {prog}: -D vpop.example exited 3: Error: no such domain")
    assert d.exists()


def test_bad_setting_is_a_usage_error(tree: Tree):
    base(tree, "example.com\n", "example.com\n")
    done = tree.run("generate", UPDATER_UID_MIN="lots")
    assert done.returncode == 2
    assert done.stderr.strip().startswith("qmail-updater: $UPDATER_UID_MIN: ")
