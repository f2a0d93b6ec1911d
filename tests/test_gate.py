"""The sanity gate judges what the list accepts: over generated trees in which a vpopmail
domain's ``.qmail-default`` switches between bounce-no-mailbox, a catch-all, ``delete``
and a forward, and its users come and go, a change that only widens acceptance is never
refused, a real loss is, and the full and the incremental install agree with each other
and with a model of what each list accepts."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.tree import Tree, found

VD = "/home/vpopmail/bin/vdelivermail"
MODES = {
    "bounce": f"| {VD} '' bounce-no-mailbox",
    "catchall": f"| {VD} '' /home/vpopmail/domains/v.example/postmaster",
    "delete": f"| {VD} '' delete",
    "forward": f"| {VD} '' someone@elsewhere.example",
}
NAMES = [f"u{i}" for i in range(12)]
STEADY = [f"s{i}" for i in range(12)]          # another domain's users, never touched
EXAMPLES = int(os.environ.get("QMAIL_GATE_EXAMPLES", "30"))


def tree_with(root: Path, mode: str, users: list[str]) -> Tree:
    t = Tree(root)
    t.control("rcpthosts", "v.example\nsteady.example\n")
    t.control("virtualdomains", "v.example:v.example\nsteady.example:steady.example\n")
    t.vpop_domain("steady.example", users=tuple(STEADY))
    t.vpop_domain("v.example", users=tuple(users), default=MODES[mode])
    return t


def switch(t: Tree, mode: str, users: list[str]) -> None:
    d = t.vpop / "domains/v.example"
    tmp = d / "vpasswd.tmp"
    tmp.write_text("".join(f"{u}:$1$xx$yy:1:0:{u}:{d}/{u}:NOQUOTA\n" for u in users))
    os.replace(tmp, d / "vpasswd")
    (d / ".qmail-default").write_text(MODES[mode] + "\n")


def model(mode: str, users: list[str], probe: str) -> bool:
    return mode != "bounce" or probe in users


def expected(before: tuple[str, list[str]], after: tuple[str, list[str]]) -> bool:
    """Whether the gate (shrink limit 20 %) installs v.example's change or holds the
    domain: what the old list accepted there and the new one refuses, against what it
    accepted (steady.example has nothing to do with it)."""
    (m0, u0), (m1, u1) = before, after
    old_n = len(u0) if m0 == "bounce" else 1
    new_n = len(u1) if m1 == "bounce" else 1
    if m0 == "bounce":
        lost = sum(1 for u in u0 if not model(m1, u1, u))
    else:                                          # a catch-all narrowed to mailboxes
        lost = 1 if new_n == 0 else 0
    if lost and new_n == 0:
        return False                               # emptied
    return not (lost >= 2 and lost * 100 > 20 * old_n)


def settings_for(t: Tree, cdb: Path):
    from updater.config import load
    return load(environ=t.env(VALIDRCPTTO_CDB=str(cdb)))


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m0=st.sampled_from(sorted(MODES)), m1=st.sampled_from(sorted(MODES)),
       u0=st.lists(st.sampled_from(NAMES), unique=True, max_size=8),
       u1=st.lists(st.sampled_from(NAMES), unique=True, max_size=8))
def test_the_gate_refuses_losses_only(tmp_path_factory, m0, m1, u0, u1):
    from updater.checker import check, open_cdb
    from updater.daemon import incremental
    from updater.errors import InstallRefused
    root = tmp_path_factory.mktemp("gate")
    t = tree_with(root / "t", m0, u0)
    live = root / "live.cdb"
    s = settings_for(t, live)
    try:
        _, snap, _ = incremental.full(s)
    except InstallRefused:                # the very first list of nothing: not this test
        assert m0 == "bounce" and not u0
        return
    copy = root / "copy.cdb"
    shutil.copy(live, copy)
    switch(t, m1, u1)
    verdicts = []
    for how in ("full", "incremental"):
        try:
            if how == "full":
                report, _, _ = incremental.full(settings_for(t, copy))
            else:
                report, _, _, _ = incremental.build(s, snap, {"v.example"})
        except incremental.NeedFull:
            pytest.fail("a change inside one domain must not need a full build")
        assert set(report.held) <= {"v.example"}
        verdicts.append("v.example" not in report.held)
    want = expected((m0, u0), (m1, u1))
    assert verdicts == [want, want], (m0, u0, m1, u1)
    assert found(live) == found(copy)
    # installed: what the model accepts now; held: what it accepted before
    mode, users = (m1, u1) if want else (m0, u0)
    for path in (live, copy):
        get = open_cdb(str(path))
        try:
            for name in NAMES + ["nobody"]:
                address = f"{name}@v.example".encode()
                assert bool(check(get, address).accepted) == model(mode, users, name)
            assert check(get, b"s3@steady.example").accepted
        finally:
            get.close()


def test_probe_and_lost_rules():
    from updater.install.gate import lost, probe, set_getter
    assert probe(b"joe@d") == b"joe@d"
    assert probe(b"joe-default@d") == b"joe-\x01@d"
    assert probe(b"@d") == b"\x01@d"
    assert probe(b"postmaster") == b"postmaster"
    old = set_getter({b"a@d", b"b@d", b"x-default@d"}, set())
    widened = set_getter({b"@d"}, set())
    assert lost([b"a@d", b"b@d", b"x-default@d"], old, widened) == []
    narrowed = set_getter({b"a@d", b"x-default@d", b"x-y@d"}, {b"x-y@d"})
    assert lost([b"b@d", b"x-y@d"], old, narrowed) == [b"b@d", b"x-y@d"]
    catchall = set_getter({b"@d"}, set())
    listed = set_getter({b"a@d"}, set())
    assert lost([b"@d"], catchall, listed) == [b"@d"]
    assert lost([b"@d"], catchall, listed, lambda prefix, domain: True) == []
