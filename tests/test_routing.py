"""The generator against qmail's own delivery chain.

``Qmail`` below is a small model of what qmail does with one recipient address, written
from the C sources of qmail-send (rewrite), qmail-lspawn (nughde_get), qmail-getpw
(userext) and qmail-local (qmesearch), and sharing no code with the product.  The
property test builds random qmail trees on disk and checks, for every address from the
tree's own vocabulary, that the list the real CLI prints accepts it exactly when the
model says qmail delivers it.
"""

from __future__ import annotations

import os
import shlex
import stat
from pathlib import Path

import cdbx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.tools import CI
from helpers.tree import Tree, low, newu

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT and not CI, reason="chown needs root")


# --------------------------------------------------------------------------- the model

class Qmail:
    """What qmail does with ``local@domain``: delivered (True) or bounced (False)."""

    def __init__(self, root: Path):
        self.root = root
        self.qmail = root / "var/qmail"
        control = self.qmail / "control"
        self.locals = [low(x) for x in (control / "locals").read_text().split()]
        self.vd = []
        vdf = control / "virtualdomains"
        for line in (vdf.read_text().splitlines() if vdf.exists() else []):
            left, _, right = line.partition(":")
            self.vd.append((low(left), right))
        self.passwd = {}
        for line in (root / "etc/passwd").read_text().splitlines():
            f = line.split(":")
            self.passwd.setdefault(f[0], (int(f[2]), f[5]))
        self.users = cdbx.CDB(str(self.qmail / "users/cdb"))

    def vdomain(self, addr: str) -> str | None:
        """qmail-send's rewrite: the prepend (None: not virtual)."""
        at = addr.rindex("@")
        for i in range(len(addr) + 1):
            if i == 0 or i == at + 1 or i == len(addr) or (i > at and addr[i] == "."):
                for left, right in self.vd:
                    if left == low(addr[i:]):
                        return right or None
        return None

    def delivers(self, local: str, domain: str) -> bool:
        if domain in self.locals:
            lp = local
        else:
            prepend = self.vdomain(local + "@" + domain)
            assert prepend is not None, "the test only asks about local and virtual domains"
            lp = prepend + "-" + local
        home, dash, ext = self.lspawn(lp)
        return self.local(home, dash, ext, domain)

    def lspawn(self, lp: str) -> tuple[str, str, str]:
        key = b"!" + low(lp).encode()
        hit = self.users.get(key + b"\0")
        if hit is not None:
            f = hit.decode().split("\0")
            return f[3], f[4], f[5]
        wild = self.users.get(b"") or b""
        for i in range(len(key), 0, -1):
            if i == 1 or key[i - 1] in wild:
                hit = self.users.get(key[:i])
                if hit is not None:
                    f = hit.decode().split("\0")
                    return f[3], f[4], f[5] + lp[i - 1:]
        return self.getpw(lp)

    def getpw(self, lp: str) -> tuple[str, str, str]:
        e = len(lp)
        while True:
            if e < 32 and (e == len(lp) or lp[e] == "-"):
                entry = self.passwd.get(low(lp[:e]))
                if entry and entry[0] != 0:
                    try:
                        owner = os.stat(entry[1]).st_uid
                    except OSError:
                        owner = None
                    if owner == entry[0]:
                        return entry[1], ("-" if e < len(lp) else ""), lp[e + 1:]
            if e == 0:
                return self.passwd["alias"][1], "-", lp
            e -= 1

    def local(self, home: str, dash: str, ext: str, host: str) -> bool:
        safe = low(ext).replace(".", ":")

        def exists(name: str) -> bool:
            try:
                return stat.S_ISREG(os.stat(os.path.join(home, name)).st_mode)
            except OSError:
                return False

        name = ".qmail" + dash + safe
        default = None
        if exists(name):
            if safe.endswith("default"):
                default = ext[len(safe) - 7:]
        else:
            name = None
            for i in range(len(safe), -1, -1):
                if (i == 0 or safe[i - 1] == "-") and \
                        exists(".qmail" + dash + safe[:i] + "default"):
                    name, default = ".qmail" + dash + safe[:i] + "default", ext[i:]
                    break
        if name is None:
            return dash == ""
        if default is None:
            return True
        for line in Path(home, name).read_text().splitlines():
            if not line.startswith("|"):
                continue
            argv = shlex.split(line[1:])
            prog = os.path.basename(argv[0])
            if prog == "vdelivermail":
                if "bounce-no-mailbox" not in argv:
                    return True
                hit = self.users.get(b"!" + host.encode() + b"-")
                if hit is None or os.path.normpath(hit.decode().split("\0")[3]) != \
                        os.path.normpath(home):
                    return False
                names = {low(x.split(":")[0]) for x in
                         Path(home, "vpasswd").read_text().splitlines() if x}
                return low(default) in names
            if prog == "fastforward":
                db = cdbx.CDB(argv[-1])
                d = low(default)
                return any(db.get(k.encode()) is not None
                           for k in (f":{d}@{host}", f":{d}@", f":@{host}"))
        return True


def listed(keys: dict[str, str], address: str) -> bool:
    """validrcptto's lookup (REFERENCE section 1.7) over the printed list."""
    a = low(address)
    if a in keys:
        return keys[a] != "-"
    user, _, domain = a.rpartition("@")
    dash = user.rfind("-")
    while dash != -1:
        k = user[:dash + 1] + "default@" + domain
        if k in keys:
            return keys[k] != "-"
        dash = user.rfind("-", 0, dash)
    k = "@" + domain
    return k in keys and keys[k] != "-"


def printed(tree: Tree, **env: str) -> dict[str, str]:
    done = tree.run("generate", **env)
    assert done.returncode == 0, done.stderr
    out = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition(" ")
        out[key] = value
    return out


# --------------------------------------------------------------------------- the cases

def base(tree: Tree, rcpthosts: str, locals_: str = "", vd: str = "") -> None:
    tree.control("me", "mx.example\n")
    tree.control("rcpthosts", rcpthosts)
    tree.control("locals", locals_)
    tree.control("virtualdomains", vd)


@needs_root
def test_prepend_user_ext_reaches_the_account_by_cutting_at_dashes(tree: Tree):
    base(tree, "virt.test\n", vd="virt.test:joe-virt\n")
    tree.account("joe", 1000, files=(".qmail-virt-sales", ".qmail-virt-lists-default"))
    assert tree.keys() == ["lists-default@virt.test", "sales@virt.test"]
    (tree.root / "home/joe/.qmail-virt-default").write_text("./Maildir/\n")
    assert tree.keys() == ["@virt.test"]
    # an account named exactly joe-virt wins over joe (qmail-getpw tries it first)
    tree.account("joe-virt", 1001, files=(".qmail-only",))
    assert tree.keys() == ["only@virt.test"]


def test_capital_prepend_is_lowercased_for_users_cdb(tree: Tree):
    base(tree, "ex.test\n", vd="ex.test:Ex.test\n")
    tree.vpop_domain("ex.test", users=("ann", "bob"))
    newu(tree.qmail)
    done = tree.run("generate")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["ann@ex.test", "bob@ex.test"]


@needs_root
def test_exact_users_assign_entry_is_an_address_at_every_local_domain(tree: Tree):
    base(tree, "a.test\nb.test\n", "a.test\nb.test\n")
    joe = tree.account("joe", 1001, files=(".qmail",))
    tree.write("var/qmail/users/assign", f"=info:joe:1001:1001:{joe}:::\n.\n")
    newu(tree.qmail)
    keys = tree.keys()
    assert "info@a.test" in keys and "info@b.test" in keys
    assert "info-x@a.test" not in keys


@needs_root
def test_virtual_domain_without_assign_or_account_goes_to_alias(tree: Tree):
    base(tree, "big.test\n", vd="big.test:big.test\n")
    tree.vpop_domain("big.test", users=("zed",), sub="7")
    tree.write("var/qmail/users/assign", ".\n")          # qmail-newu never saw the domain
    newu(tree.qmail)
    done = tree.run("generate")
    assert done.returncode == 0 and done.stdout == ""
    assert "big.test: qmail delivers no address there" in done.stderr
    # what ~alias has for big.test-NAME is what qmail delivers (qmail-local writes the
    # dots of the extension as colons: the file with a dot is never read)
    tree.write("var/qmail/alias/.qmail-big.test-postmaster", "root\n")
    assert tree.keys() == []
    tree.write("var/qmail/alias/.qmail-big:test-postmaster", "root\n")
    assert tree.keys() == ["postmaster@big.test"]


@needs_root
def test_home_owned_by_someone_else_is_not_an_account(tree: Tree):
    base(tree, "ex.test\n", "ex.test\n")
    home = tree.account("joe", 1000, files=(".qmail",))
    assert "joe@ex.test" in tree.keys()
    os.chown(home, 1234, 1234)
    assert "joe@ex.test" not in tree.keys()
    tree.write("var/qmail/alias/.qmail-joe", "&joe@elsewhere.example\n")
    assert "joe@ex.test" in tree.keys()                 # now ~alias answers for it


@needs_root
def test_users_cdb_is_what_counts_not_users_assign(tree: Tree):
    base(tree, "ex.test\n", vd="ex.test:ex.test\n")
    tree.vpop_domain("ex.test", users=("ann",))
    newu(tree.qmail)
    d2 = tree.vpop_domain("other.test", users=("zed",))
    # assign now sends ex.test elsewhere, but qmail-newu has not run
    tree.write("var/qmail/users/assign", f"+ex.test-:x:89:89:{d2}:-::\n.\n")
    done = tree.run("generate")
    assert done.stdout.splitlines() == ["ann@ex.test"]
    assert "warning" not in done.stderr
    (tree.qmail / "users/cdb").unlink()
    done = tree.run("generate")
    assert "users/cdb does not exist: using" in done.stderr


@needs_root
def test_refusal_under_a_catch_all_is_a_reject_key(tree: Tree):
    base(tree, "ex.test\n", "ex.test\n")
    tree.write("var/qmail/alias/.qmail-default", "./Maildir/\n")
    tree.account("joe", 1000, files=(".qmail", ".qmail-x"))
    keys = printed(tree)
    # joe-anything goes to ~joe, which has no .qmail-default: qmail bounces it, although
    # every other address at ex.test is delivered by ~alias/.qmail-default
    assert keys == {"@ex.test": "", "joe-default@ex.test": "-", "joe-x@ex.test": ""}


def test_single_address_line_never_applies_at_a_local_domain(tree: Tree):
    """qmail-send checks locals before virtualdomains: with no control/locals, me is
    local, and Boss@mx2.test:dave is never used; boss goes to ~alias."""
    tree.control("me", "mx2.test\n")
    tree.control("rcpthosts", "mx2.test\n")
    tree.control("virtualdomains", "Boss@mx2.test:dave\n")
    tree.write("var/qmail/alias/.qmail-default", "./Maildir/\n")
    done = tree.run("generate")
    assert done.returncode == 0, done.stderr
    keys = {k: v for k, _, v in (line.partition(" ") for line in done.stdout.splitlines())}
    assert listed(keys, "boss@mx2.test") and listed(keys, "Boss@MX2.test")
    assert "boss@mx2.test" not in keys
    assert "boss@mx2.test never applies: mx2.test is in locals" in done.stderr


@needs_root
def test_bouncesaying_and_exit_100_are_refusals(tree: Tree):
    base(tree, "ex.test\n", "ex.test\n")
    alice = tree.account("alice", 1000, files=(".qmail",))
    (alice / ".qmail-default").write_text("./Maildir/\n")
    (alice / ".qmail-gone").write_text("|bouncesaying 'Alice has left'\n")
    (alice / ".qmail-old-default").write_text("# retired\n&archive@example.org\n"
                                              "| bouncesaying 'retired'\n")
    (alice / ".qmail-dead").write_text("| exit 100\n")
    (alice / ".qmail-maybe").write_text("|bouncesaying 'not you' condition-program\n")
    (alice / ".qmail-later").write_text("|preline procmail\n|bouncesaying 'x'\n")
    keys = printed(tree)
    for refused in ("alice-gone", "alice-old-x", "alice-old-x-y", "alice-dead", "Alice-Gone"):
        assert not listed(keys, refused + "@ex.test"), (refused, keys)
    for accepted in ("alice", "alice-x", "alice-maybe", "alice-later", "alice-old"):
        assert listed(keys, accepted + "@ex.test"), (accepted, keys)
    (tree.root / "home/alice/.qmail").write_text("|bouncesaying 'moved'\n")
    assert not listed(printed(tree), "alice@ex.test")


@needs_root
def test_vdelivermail_at_a_domain_vpopmail_does_not_know(tree: Tree):
    """vdelivermail looks the user up in the domain named by $HOST; at a domain vpopmail
    does not have, no user is found and its last argument decides, as for an unknown
    user (vpopmail's usernotfound()): bounce-no-mailbox bounces, delete (or a forward)
    takes the message.  Reached here through a users/cdb prefix at a local domain."""
    base(tree, "local.test\n", "local.test\n")
    for how, accepted in (("bounce-no-mailbox", False), ("delete", True)):
        d = tree.vpop_domain("catch.test", users=("ann",),
                             default=f"| /home/vpopmail/bin/vdelivermail '' {how}")
        newu(tree.qmail)
        keys = printed(tree)
        assert listed(keys, "catch.test-x@local.test") is accepted, (how, keys)
        assert listed(keys, "catch.test-ann@local.test") is accepted, (how, keys)
        (d / ".qmail-default").unlink()


# --------------------------------------------------------------------------- property

ACCOUNTS = ["joe", "ann", "joe-virt", "sales", "Cap", "toor", "a" * 31, "b" * 32]
FILES = [".qmail", ".qmail-default", ".qmail-x", ".qmail-x-default", ".qmail-virt-sales",
         ".qmail-virt-default", ".qmail-sales", ".qmail-a:b", ".qmail-", ".qmail-zed",
         ".qmail-info", ".qmail-list-default", ".qmail-Up", ".qmail-v.dot"]
ALIAS_FILES = [".qmail-postmaster", ".qmail-joe", ".qmail-nobody-zed", ".qmail-alias-x",
               ".qmail-vp.test-info", ".qmail-vp:test-info", ".qmail-x-default"]
LOCALS = ["joe", "Joe", "joe-x", "joe-x-y", "joe-", "joe-virt", "joe-virt-sales",
          "joe-virt-other", "ann", "ann-sales", "sales", "x", "x-y", "a.b", "a:b", "zed",
          "info", "Info", "mary", "list-sub", "postmaster", "alias", "alias-x", "alias-q",
          "nobody", "nobody-zed", "default", "up", "v.dot", "toor", "cap", "a" * 31,
          "a" * 31 + "-x", "b" * 32, "vp.test-info", "vp.test-mary", "q"]
VDOMAINS = {                     # domain -> prepend
    "uext.test": "joe-virt", "caps.test": "Vp.Test", "vp.test": "vp.test",
    "none.test": "nobody", "ali.test": "alias", "plain.test": "joe",
}


@st.composite
def trees(draw):
    accounts = {}
    for name in draw(st.lists(st.sampled_from(ACCOUNTS), unique=True, max_size=6)):
        accounts[name] = dict(
            uid=draw(st.sampled_from([0, 1000, 1001, 1002])),
            home=draw(st.sampled_from(["own", "own", "own", "missing", "other"])),
            files=draw(st.lists(st.sampled_from(FILES), unique=True, max_size=5)))
    vdomains = draw(st.lists(st.sampled_from(sorted(VDOMAINS)), unique=True, max_size=4))
    suffix = draw(st.booleans())
    return dict(
        locals=draw(st.lists(st.sampled_from(["loc.test", "loc2.test"]), unique=True,
                             max_size=2)),
        accounts=accounts, vdomains=vdomains, suffix=suffix,
        vpop_bounce=draw(st.booleans()), vpop_files=draw(st.lists(
            st.sampled_from([".qmail-info", ".qmail-list-default", ".qmail-x"]), unique=True)),
        vpop_assign=draw(st.booleans()),
        alias_files=draw(st.lists(st.sampled_from(ALIAS_FILES), unique=True, max_size=4)),
        alias_default=draw(st.sampled_from([None, "plain", "fastforward"])),
        ff=draw(st.lists(st.sampled_from([":zed@", ":mary@loc.test", ":@loc2.test",
                                          ":info@vp.test", ":x@ali.test"]), unique=True)),
        exact=draw(st.lists(st.sampled_from(["=info:joe", "=postmaster:ann", "+x-:joe"]),
                            unique=True)),
    )


def build(root: Path, spec: dict) -> Tree:
    tree = Tree(root)
    if not spec["locals"] and not spec["vdomains"] and not spec["suffix"]:
        spec["locals"] = ["loc.test"]
    vd = [f"{d}:{VDOMAINS[d]}" for d in spec["vdomains"]]
    domains = spec["locals"] + spec["vdomains"]
    if spec["suffix"]:
        vd.append(".sub.test:joe")
        domains.append("a.sub.test")
    base(tree, "".join(d + "\n" for d in domains),
         "".join(d + "\n" for d in spec["locals"]), "".join(v + "\n" for v in vd))
    homes = {}
    for name, a in spec["accounts"].items():
        path = tree.account(name, a["uid"], home=a["home"] != "missing")
        homes[name] = path
        if a["home"] == "other":
            os.chown(path, 4321, 4321)
        for f in a["files"] if a["home"] != "missing" else ():
            (path / f).write_text("./Maildir/\n")
    assign = []
    vpop = tree.vpop / "domains/vp.test"
    vpop.mkdir(parents=True)
    (vpop / "vpasswd").write_text("mary:x:1:0::/d/mary:NOQUOTA\nInfo2:x:1:0::/d/i:NOQUOTA\n")
    (vpop / ".qmail-default").write_text(
        "| /home/vpopmail/bin/vdelivermail '' "
        + ("bounce-no-mailbox\n" if spec["vpop_bounce"] else "/d/postmaster\n"))
    for f in spec["vpop_files"]:
        (vpop / f).write_text("&someone@example.org\n")
    if spec["vpop_assign"]:
        assign.append(f"+vp.test-:vp.test:89:89:{vpop}:-::")
    for e in spec["exact"]:
        kind, _, user = e.partition(":")
        home = homes.get(user) or tree.root / "home" / user
        home.mkdir(parents=True, exist_ok=True)
        assign.append(f"{kind}:{user}:1001:1001:{home}:{'-' if kind[0] == '+' else ''}::")
    tree.write("var/qmail/users/assign", "".join(a + "\n" for a in assign) + ".\n")
    newu(tree.qmail)
    alias = tree.qmail / "alias"
    for f in spec["alias_files"]:
        (alias / f).write_text("&root@example.org\n")
    if spec["alias_default"] == "plain":
        (alias / ".qmail-default").write_text("./Mailbox\n")
    elif spec["alias_default"] == "fastforward":
        cdb = tree.root / "etc/aliases.cdb"
        maker = cdbx.CDB.make(str(cdb))
        for k in spec["ff"]:
            maker.add(k.encode(), b"&root@example.org\0")
        maker.commit().close()
        (alias / ".qmail-default").write_text(f"| fastforward -d {cdb}\n")
    return tree


EXAMPLES = int(os.environ.get("ROUTING_EXAMPLES", "120"))


@needs_root
@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(spec=trees())
def test_generated_list_agrees_with_qmail_delivery(tmp_path_factory, spec):
    root = tmp_path_factory.mktemp("q")
    tree = build(root, spec)
    domains = spec["locals"] + spec["vdomains"] + (["a.sub.test"] if spec["suffix"] else [])
    keys = printed(tree, UPDATER_UID_MIN="1", UPDATER_UID_MAX="4000000000")
    model = Qmail(root)
    wrong = []
    for domain in domains:
        for local in LOCALS:
            want = model.delivers(local, domain)
            got = listed(keys, f"{local}@{domain}")
            if want != got:
                wrong.append(f"{local}@{domain}: qmail {'delivers' if want else 'bounces'}, "
                             f"list says {'accept' if got else 'reject'}")
    assert not wrong, "\n".join(wrong) + "\n" + "\n".join(f"{k} {v}" for k, v in keys.items())
