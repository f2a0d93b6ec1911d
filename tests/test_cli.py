"""The commands as an admin types them: mkvalidrcptto, demo, usage errors."""

from __future__ import annotations

import subprocess

from helpers.tools import need, script
from helpers.tree import Tree


def small(tree: Tree) -> None:
    tree.control("rcpthosts", "example.com\nvpop.example\n")
    tree.control("locals", "example.com\n")
    tree.control("virtualdomains", "vpop.example:vpop.example\n")
    tree.account("joe")
    tree.vpop_domain("vpop.example", users=("ann",))
    tree.control("validrcptto.exclude", "trap@vpop.example\n")


def test_mkvalidrcptto_plain_cdbmake_and_cdb(tree: Tree, tmp_path):
    small(tree)
    done = tree.run(prog="mkvalidrcptto")
    assert done.returncode == 0
    assert done.stdout.splitlines() == ["alias@example.com", "ann@vpop.example",
                                        "joe@example.com", "trap@vpop.example -"]
    done = tree.run("-m", prog="mkvalidrcptto")
    assert done.stdout == ("+17,0:alias@example.com->\n+16,0:ann@vpop.example->\n"
                           "+15,0:joe@example.com->\n+17,1:trap@vpop.example->-\n\n")
    out = tmp_path / "v.cdb"
    done = tree.run("-n", "-c", str(out), "-d", prog="mkvalidrcptto")
    assert done.returncode == 0 and done.stdout == ""
    assert f"mkvalidrcptto: joe@example.com: account joe ({tree.root}/home/joe): default " \
        "delivery" in done.stderr
    dump = subprocess.run([need("cdbdump")], stdin=open(out, "rb"), capture_output=True).stdout
    assert dump == (b"+17,0:alias@example.com->\n+16,0:ann@vpop.example->\n"
                    b"+15,0:joe@example.com->\n+17,1:trap@vpop.example->-\n\n")


def test_mkvalidrcptto_errors(tree: Tree):
    done = tree.run(prog="mkvalidrcptto")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"mkvalidrcptto: {tree.qmail}/control/rcpthosts: missing\n"
    assert tree.run("-x", prog="mkvalidrcptto").returncode == 2


def test_usage_errors_exit_2(tree: Tree):
    assert tree.run().returncode == 2
    assert tree.run("frobnicate").returncode == 2
    assert tree.run("build", "--max-shrink", "lots").returncode == 2


def test_demo_builds_the_sample_and_shows_verdicts(tmp_path):
    done = subprocess.run([script("qmail-updater"), "demo", "--dir", str(tmp_path / "d")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "installed " in out and "73 entries" in out
    assert "250 accept  mary@vpop.example.net" in out
    assert "553 reject  nobody@vpop.example.net              decided by (none)" in out
    assert "553 reject  spamtrap@catchall.example.org        decided by spamtrap@" in out
    assert (tmp_path / "d/var/qmail/control/validrcptto.cdb").exists()
    assert ("  C: RCPT TO:<Mary@vpop.example.net>\n  S: 250 ok\n"
            "  C: RCPT TO:<nobody@vpop.example.net>\n"
            "  S: 553 sorry, this recipient is not in my validrcptto list (#5.7.1)\n"
            "  C: RCPT TO:<spamtrap@catchall.example.org>\n"
            "  S: 553 sorry, this recipient is not in my validrcptto list (#5.7.1)\n"
            "  C: QUIT\n  S: 221 mail.example.com\n") in out
    assert "validrcptto [192.0.2.7] not found: spamtrap@catchall.example.org" in out
