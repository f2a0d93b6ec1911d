"""The generator against qmail's own programs (netqmail 1.06, built from ../shared/reference).

For generated qmail trees (accounts with owned and unowned homes, users/cdb ``=`` and
``+`` entries, ``.qmail`` files with ``-default`` chains, forwards, mailboxes,
``bouncesaying`` and ``exit`` lines, ~alias with fastforward, a vpopmail domain,
virtualdomains with prepends, suffixes, duplicate lines and single-address lines at
local, virtual and routed domains) every probe address goes through:

- qmail-send's rewrite: ``send_rewrite`` below, read from qmail-send.c (locals first,
  then virtualdomains: the whole address, the domain, each ``.suffix``, the empty key;
  constmap: case-insensitive, the last of equal keys wins);
- qmail-lspawn: the users/cdb lookup (``lspawn`` below, from nughde_get), else the real
  **qmail-getpw**, run in a private mount namespace (``unshare -m``) with the tree's
  passwd bound over /etc/passwd, so that its getpwnam() sees the tree's accounts;
- the real **qmail-local**, delivering for real: mailboxes into the homes, forwards to a
  stub qmail-queue, programs run by sh.  Of the programs, fastforward is the real
  Debian one (with -n: it says what it would do, and bounces what it does not know);
  bouncesaying and vdelivermail are small stand-ins written from bouncesaying(1) and
  vpopmail's vdelivermail.c (the user is $EXT at the domain $HOST, found through
  users/cdb's ``+DOMAIN-``; a user it does not find gets its last argument).

qmail-local's exit code is the answer (0 delivered, 100 bounced; anything else fails
the test: the tree made qmail defer), compared with ``qmail-updater check`` on the cdb
that ``qmail-updater build`` installed for the same tree.  An address qmail-send gives
to qmail-remote is accepted (the far side decides), as the generator's ``@domain`` for
a routed domain says.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.tools import CI, need
from helpers.tree import Tree, low, newu

HERE = Path(__file__).resolve().parent
EXAMPLES = int(os.environ.get("QMAIL_CHAIN_EXAMPLES", "120"))
PROBES = int(os.environ.get("QMAIL_CHAIN_PROBES", "40"))
ROOT = os.geteuid() == 0


@pytest.fixture(scope="session")
def chain(tmp_path_factory) -> tuple[Path, Path]:
    """(directory with qmail-getpw and qmail-local, the qmail dir they were built for),
    from QMAIL_CHAIN_BIN + QMAIL_CHAIN_DIR (.ci/run builds them), else built here."""
    if not ROOT:
        if CI:
            pytest.fail("the qmail chain test needs root (unshare -m, chown)")
        pytest.skip("needs root")
    need("unshare")
    need("setforward")
    need("cdbget")
    bin_dir, qdir = os.environ.get("QMAIL_CHAIN_BIN"), os.environ.get("QMAIL_CHAIN_DIR")
    if not (bin_dir and qdir):
        tarball = Path(os.environ.get("QMAIL_REFERENCE_TARBALL") or
                       HERE.parent.parent / "shared/reference/netqmail-1.06.tar.gz")
        missing = [what for what, ok in ((str(tarball), tarball.exists()),
                                         ("gcc", shutil.which("gcc")),
                                         ("make", shutil.which("make"))) if not ok]
        if missing:
            why = (f"netqmail's qmail-getpw and qmail-local cannot be built: no "
                   f"{', '.join(missing)}. Put netqmail-1.06.tar.gz (netqmail.org) at "
                   "../shared/reference/ or name it in QMAIL_REFERENCE_TARBALL, or build "
                   "them with tests/tools/build-qmail-chain and set QMAIL_CHAIN_BIN and "
                   "QMAIL_CHAIN_DIR")
            if CI:
                pytest.fail(why + " (required under CI=true)")
            pytest.skip(why)
        root = tmp_path_factory.mktemp("qmail-chain")
        qdir, bin_dir = str(root / "qmail"), str(root / "bin")
        done = subprocess.run([str(HERE / "tools/build-qmail-chain"), qdir, bin_dir],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
    q = Path(qdir)
    (q / "bin").mkdir(parents=True, exist_ok=True)
    stub = q / "bin/qmail-queue"           # forwards: take the message and the envelope
    stub.write_text("#!/bin/sh\ncat >/dev/null\ncat <&1 >/dev/null\nexit 0\n")
    stub.chmod(0o755)
    return Path(bin_dir), q


# --------------------------------------------------------------------------- the models

def send_rewrite(address: str, locals_: list[str], vdoms: list[tuple[str, str]]
                 ) -> str | None:
    """qmail-send's rewrite(): the local part handed to qmail-lspawn, or None when the
    address goes to qmail-remote."""
    at = address.rindex("@")
    if low(address[at + 1:]) in locals_:
        return address[:at]
    table = {}
    for left, right in vdoms:                # constmap: the last of equal keys wins
        table[low(left)] = right
    for i in range(len(address) + 1):
        if i == 0 or i == at + 1 or i == len(address) or (i > at and address[i] == "."):
            x = table.get(low(address[i:]))
            if x is not None:
                if not x:
                    return None
                return x + "-" + address[:at]
    return None


RUNNER = r'''
import json, os, subprocess, sys
job = json.load(sys.stdin)
users = job["users_cdb"]


def lspawn(local):
    """qmail-lspawn's nughde_get: users/cdb, else (None) qmail-getpw."""
    import cdbx
    if not os.path.exists(users):
        return None
    db = cdbx.CDB(users)
    lower = b"!" + local.encode().lower() + b"\0"
    wild = db.get(b"") or b""
    i, flagwild = len(lower), False
    while i:
        if not flagwild or i == 1 or lower[i - 1:i] in [bytes([c]) for c in wild]:
            hit = db.get(lower[:i])
            if hit is not None:
                f = hit.split(b"\0")
                rest = local.encode()[i - 1:] if flagwild else b""
                return [x.decode() for x in f[:5]] + [(f[5] + rest).decode()]
        i -= 1
        flagwild = True
    return None


out = []
env = dict(os.environ, PATH=job["path"])
for local, domain in job["probes"]:
    nug = lspawn(local)
    how = "users/cdb"
    if nug is None:
        how = "qmail-getpw"
        p = subprocess.run([job["bin"] + "/qmail-getpw", local], capture_output=True)
        if p.returncode:
            out.append([local, domain, "getpw", p.returncode, ""])
            continue
        nug = p.stdout.decode().split("\0")[:6]
    user, uid, gid, home, dash, ext = nug
    with open(job["msg"], "rb") as msg:
        p = subprocess.run([job["bin"] + "/qmail-local", "--", user, home, local, dash, ext,
                            domain, "sender@example.org", "./Mailbox"], stdin=msg,
                           capture_output=True, env=env)
    out.append([local, domain, how + " " + " ".join(nug), p.returncode,
                p.stdout.decode(errors="replace").strip()])
json.dump(out, sys.stdout)
'''

VDELIVERMAIL = r'''#!/bin/sh
# vdelivermail '' LAST, as vpopmail's vdelivermail.c: the user $EXT at the domain $HOST
# (found through users/cdb's +DOMAIN- entry); a user not found gets LAST
user=$(printf %s "$EXT" | tr A-Z a-z)
host=$(printf %s "$HOST" | tr A-Z a-z)
dir=$(cdbget "!$host-" < "$USERS_CDB" 2>/dev/null | tr '\0' '\n' | sed -n 4p)
if [ -n "$dir" ] && [ -f "$dir/vpasswd" ] && cut -d: -f1 "$dir/vpasswd" | grep -qxF -- "$user"
then exit 0; fi
[ "$2" = bounce-no-mailbox ] && { echo "Sorry, no mailbox here by that name."; exit 100; }
exit 0
'''

BOUNCESAYING = r'''#!/bin/sh
# bouncesaying error [program [arg ...]], as bouncesaying(1) says
[ $# -ge 1 ] || exit 100
msg=$1; shift
[ $# -eq 0 ] && { echo "$msg"; exit 100; }
"$@"; rc=$?
[ $rc -eq 0 ] && { echo "$msg"; exit 100; }
[ $rc -eq 111 ] && exit 111
exit 0
'''

FASTFORWARD = '#!/bin/sh\nexec /usr/bin/fastforward -n "$@"\n'


# --------------------------------------------------------------------------- the trees

ACCOUNTS = ["joe", "ann", "dave", "alice", "joe-virt", "Cap", "toor", "a" * 31, "b" * 32]
CONTENTS = ["./Mailbox\n", "&fw@example.org\n", "|bouncesaying 'gone'\n", "| exit 100\n",
            "|bouncesaying 'maybe' false\n", "# c\n&fw@example.org\n| bouncesaying 'x'\n",
            "|exit 99\n./Mailbox\n", "./Mailbox\n| exit 112\n", "| exit 0\n"]
FILES = [".qmail", ".qmail-default", ".qmail-x", ".qmail-x-default", ".qmail-virt-sales",
         ".qmail-virt-default", ".qmail-sales", ".qmail-gone", ".qmail-old-default",
         ".qmail-a:b", ".qmail-info", ".qmail-boss"]
ALIAS_FILES = [".qmail-postmaster", ".qmail-joe", ".qmail-alias-x", ".qmail-vp:test-info",
               ".qmail-x-default", ".qmail-boss", ".qmail-dave-boss"]
VD_LINES = ["virt.test:joe-virt", "vp.test:vp.test", "ali.test:alias", "caps.test:Vp.Test",
            ".sub.test:joe", "dup.test:joe", "dup.test:ann", "boss@loc.test:dave",
            "Boss@mx.test:dave", "x@virt.test:ann", "sales@routed.test:joe",
            "gone@virt.test:", "Info@vp.test:joe", "mary@vp.test:"]
ASSIGN = ["=info:joe", "=postmaster:ann", "+x-:joe", "+vp.test-:VPOP", "=boss:alice",
          "+dup.test-:alice"]
FORWARDS = ["zed@: root@example.org;", "mary@loc.test: root@example.org;",
            "@ali.test: root@example.org;", "joe@: root@example.org;",
            "info@vp.test: root@example.org;"]
LOCALS = ["joe", "Joe", "joe-x", "joe-x-y", "joe-", "joe-virt", "joe-virt-sales",
          "joe-virt-other", "ann", "ann-sales", "sales", "x", "x-y", "a.b", "a:b", "zed",
          "info", "Info", "mary", "boss", "Boss", "dave-boss", "postmaster", "alias",
          "alias-x", "alice", "alice-gone", "alice-old-x", "alice-x", "dave", "gone",
          "default", "toor", "cap", "a" * 31, "a" * 31 + "-x", "b" * 32, "vp.test-info",
          "vp.test-mary", "list-sub", "q"]


@st.composite
def trees(draw):
    accounts = {}
    for name in draw(st.lists(st.sampled_from(ACCOUNTS), unique=True, max_size=6)):
        accounts[name] = dict(
            uid=draw(st.sampled_from([0, 1000, 1001, 1002])),
            home=draw(st.sampled_from(["own", "own", "own", "missing", "other"])),
            files={f: draw(st.sampled_from(CONTENTS)) for f in
                   draw(st.lists(st.sampled_from(FILES), unique=True, max_size=5))})
    return dict(
        locals=draw(st.one_of(st.none(), st.lists(st.sampled_from(["loc.test", "mx.test"]),
                                                  unique=True, max_size=2))),
        vd=draw(st.lists(st.sampled_from(VD_LINES), unique=True, max_size=7)),
        accounts=accounts,
        vpop_last=draw(st.sampled_from(["bounce-no-mailbox", "delete"])),
        vpop_files={f: draw(st.sampled_from(CONTENTS[:2])) for f in draw(st.lists(
            st.sampled_from([".qmail-info", ".qmail-list-default", ".qmail-x"]), unique=True))},
        assign=draw(st.lists(st.sampled_from(ASSIGN), unique=True, max_size=4)),
        alias_files={f: draw(st.sampled_from(CONTENTS)) for f in
                     draw(st.lists(st.sampled_from(ALIAS_FILES), unique=True, max_size=4))},
        alias_default=draw(st.sampled_from([None, "./Mailbox\n", "fastforward",
                                            "|bouncesaying 'no such alias'\n"])),
        forwards=draw(st.lists(st.sampled_from(FORWARDS), unique=True)),
        seed=draw(st.integers(0, 2 ** 32)),
    )


def build(root: Path, spec: dict) -> tuple[Tree, list[str], list[str], list[tuple[str, str]]]:
    """The tree on disk; (tree, rcpthosts domains, locals, virtualdomains lines)."""
    tree = Tree(root)
    tree.control("me", "mx.test\n")
    locals_ = ["mx.test"] if spec["locals"] is None else list(spec["locals"])
    if spec["locals"] is not None:
        tree.control("locals", "".join(d + "\n" for d in locals_))
    vd = [tuple(line.split(":", 1)) for line in spec["vd"]]
    tree.control("virtualdomains", "".join(f"{a}:{b}\n" for a, b in vd))
    tree.control("smtproutes", "routed.test:relay.example\n")
    domains = set(locals_) | {"routed.test"}
    for left, _ in vd:
        if "@" not in left:
            domains.add("a.sub.test" if left.startswith(".") else left)
    domains = sorted(domains)
    tree.control("rcpthosts", "".join(d + "\n" for d in domains))
    homes: dict[str, Path] = {}
    for name, a in spec["accounts"].items():
        path = tree.account(name, a["uid"], home=a["home"] != "missing")
        homes[name] = path
        if a["home"] == "other":
            os.chown(path, 4321, 4321)
        if a["home"] != "missing":
            for f, content in a["files"].items():
                (path / f).write_text(content)
    vpop = tree.vpop / "domains/vp.test"
    vpop.mkdir(parents=True)
    (vpop / "vpasswd").write_text("mary:x:1:0::/d/mary:NOQUOTA\ninfo2:x:1:0::/d/i:NOQUOTA\n")
    (vpop / ".qmail-default").write_text(f"| vdelivermail '' {spec['vpop_last']}\n")
    for f, content in spec["vpop_files"].items():
        (vpop / f).write_text(content)
    assign = []
    for e in spec["assign"]:
        kind, _, user = e.partition(":")
        if user == "VPOP":
            assign.append(f"{kind}:vpopmail:89:89:{vpop}:-::")
            continue
        home = homes.get(user) or tree.root / "home" / user
        if not home.exists():                # a users/assign home always exists
            home.mkdir(parents=True)
        assign.append(f"{kind}:{user}:1001:1001:{home}:{'-' if kind[0] == '+' else ''}::")
    tree.write("var/qmail/users/assign", "".join(a + "\n" for a in assign) + ".\n")
    newu(tree.qmail)
    alias = tree.qmail / "alias"
    for f, content in spec["alias_files"].items():
        (alias / f).write_text(content)
    if spec["alias_default"] == "fastforward":
        src = tree.root / "etc/aliases"
        src.write_text("".join(x + "\n" for x in spec["forwards"]))
        cdb = tree.root / "etc/aliases.cdb"
        subprocess.run([need("setforward"), str(cdb), str(cdb) + ".tmp"], stdin=open(src),
                       check=True)
        (alias / ".qmail-default").write_text(f"| fastforward -d {cdb}\n")
    elif spec["alias_default"]:
        (alias / ".qmail-default").write_text(spec["alias_default"])
    return tree, domains, locals_, vd


def qmail_answers(tree: Tree, chain: tuple[Path, Path], probes: list[tuple[str, str]],
                  locals_: list[str], vd: list[tuple[str, str]]) -> dict[str, tuple]:
    """address -> (delivered, how) from qmail's own programs."""
    bin_dir, _ = chain
    tools = tree.root / "tools"
    tools.mkdir()
    for name, text in (("vdelivermail", VDELIVERMAIL), ("bouncesaying", BOUNCESAYING),
                       ("fastforward", FASTFORWARD)):
        (tools / name).write_text(text)
        (tools / name).chmod(0o755)
    msg = tree.root / "message"
    msg.write_text("From: sender@example.org\nSubject: probe\n\nhello\n")
    runner = tree.root / "runner.py"
    runner.write_text(RUNNER)
    answers: dict[str, tuple] = {}
    local_jobs = []
    for local, domain in probes:
        lp = send_rewrite(f"{local}@{domain}", locals_, vd)
        if lp is None:
            answers[f"{local}@{domain}"] = (True, "qmail-remote")
        else:
            local_jobs.append((lp, domain, f"{local}@{domain}"))
    job = dict(users_cdb=str(tree.qmail / "users/cdb"), bin=str(bin_dir), msg=str(msg),
               path=f"{tools}:/usr/bin:/bin", probes=[(lp, d) for lp, d, _ in local_jobs])
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", 'mount --bind "$0" /etc/passwd && exec "$@"',
         str(tree.root / "etc/passwd"), sys.executable, str(runner)],
        input=json.dumps(job), capture_output=True, text=True, timeout=300,
        env=dict(os.environ, USERS_CDB=str(tree.qmail / "users/cdb")))
    assert done.returncode == 0, done.stderr
    for (lp, _, address), (_, _, how, code, said) in zip(local_jobs,
                                                             json.loads(done.stdout)):
        assert code in (0, 100), f"{address} -> {lp}: qmail deferred ({how}: exit {code} {said})"
        answers[address] = (code == 0, f"{lp} via {how}: {said}")
    return answers


@pytest.mark.skipif(not ROOT and not CI, reason="needs root")
@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(spec=trees())
def test_the_list_agrees_with_qmail_getpw_and_qmail_local(tmp_path_factory, chain, spec):
    root = tmp_path_factory.mktemp("chain")
    tree, domains, locals_, vd = build(root, spec)
    pool = [(local, d) for d in domains for local in LOCALS]
    probes = random.Random(spec["seed"]).sample(pool, min(PROBES, len(pool)))
    want = qmail_answers(tree, chain, probes, locals_, vd)
    built = tree.run("build", "--force", UPDATER_UID_MIN="1", UPDATER_UID_MAX="4000000000")
    assert built.returncode == 0, built.stderr
    addresses = [f"{local}@{d}" for local, d in probes]
    got = tree.run("check", "--cdb", str(tree.cdb), *addresses)
    said = {}
    for line in got.stdout.splitlines():
        word, address, key = line.split(" ", 2)
        said[address] = (word == "accept", key)
    wrong = [f"{a}: qmail {'delivers' if want[a][0] else 'bounces'} ({want[a][1]}), "
             f"the list says {'accept' if said[a][0] else 'reject'} (key {said[a][1]})"
             for a in addresses if want[a][0] != said[a][0]]
    if wrong:
        listing = tree.run("generate", "--origins", UPDATER_UID_MIN="1",
                           UPDATER_UID_MAX="4000000000").stdout
        pytest.fail("\n".join(wrong) + "\n--- the list:\n" + listing)


def test_send_rewrite_model_reads_qmail_send():
    """The rewrite model's own cases, from qmail-send.c."""
    vd = [("virt.test", "joe"), (".sub.test", "sub"), ("x@virt.test", "ann"),
          ("gone@virt.test", ""), ("dup.test", "a"), ("dup.test", "b"), ("", "all")]
    assert send_rewrite("bob@loc.test", ["loc.test"], vd) == "bob"
    assert send_rewrite("Bob@virt.test", [], vd) == "joe-Bob"
    assert send_rewrite("X@Virt.Test", [], vd) == "ann-X"
    assert send_rewrite("gone@virt.test", [], vd) is None
    assert send_rewrite("y@a.sub.test", [], vd) == "sub-y"
    assert send_rewrite("y@dup.test", [], vd) == "b-y"
    assert send_rewrite("y@other.test", [], vd) == "all-y"
    assert send_rewrite("x@virt.test", ["virt.test"], vd) == "x"
