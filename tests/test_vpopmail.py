"""The real vpopmail tools of both versions, our shipped onchange hook and the running
daemon: every change vpopmail makes reaches the cdb through the fast path."""

from __future__ import annotations

import pytest

from helpers.daemon import Running
from helpers.vpopmail import VERSIONS, Vpopmail
from helpers.wait import wait_for

BOUNCE = "| {bin}/vdelivermail '' bounce-no-mailbox\n"
FAST = 3.0        # the fast path answers in well under a second; the quiet period is 8 s


@pytest.fixture(params=sorted(VERSIONS))
def vp(request):
    return Vpopmail(request.param)


def listed_domain(vp: Vpopmail, domain: str) -> None:
    """As an admin does on 5.6, whose vadddomain makes a catch-all (``delete``)."""
    vp.domain_dir(domain).joinpath(".qmail-default").write_text(
        BOUNCE.format(bin=vp.vpop / "bin"))


def test_vpopmail_changes_take_the_fast_path(vp: Vpopmail):
    vp.tool("vadddomain", "d0.example", "pw", daemon=False)
    listed_domain(vp, "d0.example")
    for i in range(8):        # locking one of ten is under the 20 % shrink limit
        vp.tool("vadduser", f"user{i}@d0.example", "pw", daemon=False)
    # a quiet period far longer than the waits: only the onchange fast path can pass
    r = Running(vp, UPDATER_QUIET="8", UPDATER_MAX_DELAY="40", UPDATER_MIN_INTERVAL="30")
    try:
        assert vp.accepts("postmaster@d0.example") and vp.refuses("nobody@d0.example")
        vp.tool("vadduser", "alice@d0.example", "pw")
        wait_for(lambda: vp.accepts("alice@d0.example"), FAST, "the new mailbox")
        r.wait(r"\+1 -0.*\[incremental: 1 domain: d0.example\]")
        vp.tool("valias", "-i", "alice@d0.example", "sales@d0.example")
        wait_for(lambda: vp.accepts("sales@d0.example"), FAST, "the new valias")
        r.wait(r"\+1 -0.*\[incremental: 1 domain: d0.example\]", count=2)
        vp.tool("vmoduser", "-b", "alice@d0.example")           # locked: vdelivermail bounces
        wait_for(lambda: vp.refuses("alice@d0.example"), FAST, "the locked account refused")
        vp.tool("vmoduser", "-x", "alice@d0.example")           # flags cleared
        wait_for(lambda: vp.accepts("alice@d0.example"), FAST, "the account unlocked")
        # a new domain: vadddomain's add_domain line is a request like the others
        vp.tool("vadddomain", "d1.example", "pw")
        wait_for(lambda: vp.accepts("postmaster@d1.example"), FAST, "the new domain")
        vp.tool("vaddaliasdomain", "d2.example", "d0.example")
        wait_for(lambda: vp.accepts("alice@d2.example", "sales@d2.example"), FAST,
                 "the alias domain")
        # removals wait for the quiet period (vpopmail reports del_user before the change)
        vp.tool("vdeluser", "alice@d0.example")
        wait_for(lambda: vp.refuses("alice@d0.example", "alice@d2.example"), 30,
                 "the removal")
        assert r.count(r"build failed|refusing") == 0, r.lines
    finally:
        r.stop()


def test_locked_accounts_are_refused_from_vpasswd_and_vpasswd_cdb(vp: Vpopmail):
    vp.tool("vadddomain", "d0.example", "pw", daemon=False)
    listed_domain(vp, "d0.example")
    for name in ("bob", "carol"):
        vp.tool("vadduser", f"{name}@d0.example", "pw", daemon=False)
    vp.tool("vmoduser", "-b", "carol@d0.example", daemon=False)
    done = vp.build()
    assert done.returncode == 0, done.stderr
    assert vp.accepts("bob@d0.example", "postmaster@d0.example")
    assert vp.refuses("carol@d0.example")
    (vp.domain_dir("d0.example") / "vpasswd").unlink()      # then from the compiled cdb
    vp.cdb.unlink()
    done = vp.build()
    assert done.returncode == 0, done.stderr
    assert vp.accepts("bob@d0.example", "postmaster@d0.example")
    assert vp.refuses("carol@d0.example")
