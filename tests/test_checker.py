"""REFERENCE §1 conformance vectors through the library and through `qmail-updater check`."""

from __future__ import annotations

import subprocess

import pytest

from helpers.smtp_client import T1, make_cdb
from helpers.tools import script
from updater.checker import candidates, check

# address -> (keys tried, accepted)
VECTORS = [
    ("Joe@Example.COM", ["joe@example.com"], True),
    ("joe-list-foo-bar@example.com", ["joe-list-foo-bar@example.com",
     "joe-list-foo-default@example.com", "joe-list-default@example.com"], True),
    ("joe-list@example.com", ["joe-list@example.com", "joe-default@example.com",
     "@example.com"], False),
    ("bob@example.com", ["bob@example.com", "@example.com"], False),
    ("bob-x-y@example.com", ["bob-x-y@example.com", "bob-x-default@example.com",
     "bob-default@example.com"], True),
    ("anyone@catchall.org", ["anyone@catchall.org", "@catchall.org"], True),
    ("Blocked@CatchAll.org", ["blocked@catchall.org"], False),
    ("neg-a@example.com", ["neg-a@example.com", "neg-default@example.com"], False),
    ("neg-a@catchall.org", ["neg-a@catchall.org", "neg-default@catchall.org",
     "@catchall.org"], True),
    ("Postmaster", ["postmaster"], True),
    ("x@example.net", ["x@example.net"], True),
    ("y@blockdom.net", ["y@blockdom.net", "@blockdom.net"], False),
    ("foo@sub.catchall.org", ["foo@sub.catchall.org", "@sub.catchall.org"], False),
    ("", [""], False),
]


@pytest.mark.parametrize("address,tried,accepted", VECTORS)
def test_library_vectors(address, tried, accepted):
    verdict = check(T1.get, address.encode())
    assert [k.decode() for k in verdict.tried] == tried
    assert verdict.accepted is accepted


def test_candidates_dash_rules():
    assert list(candidates(b"a-b-c@d")) == [b"a-b-c@d", b"a-b-default@d", b"a-default@d", b"@d"]
    assert list(candidates(b"abc-@d")) == [b"abc-@d", b"abc-default@d", b"@d"]
    assert list(candidates(b"-foo@d")) == [b"-foo@d", b"-default@d", b"@d"]
    assert list(candidates(b"a@b@c")) == [b"a@b@c", b"@c"]          # the last @ splits


def test_cli_vectors(tmp_path):
    cdb = make_cdb(tmp_path / "t1.cdb", T1)
    done = subprocess.run([script("qmail-updater"), "check", "--cdb", str(cdb), "-v",
                           *[a for a, _, _ in VECTORS]], capture_output=True, text=True)
    assert done.returncode == 1                     # some were rejected
    lines = done.stdout.splitlines()
    assert len(lines) == len(VECTORS)
    for line, (address, tried, accepted) in zip(lines, VECTORS):
        word, rest = line.split(" ", 1)
        assert word == ("accept" if accepted else "reject")
        assert rest.startswith((address or "<>") + " ")           # <> for the empty one
        assert rest.endswith(" tried " + " ".join(t or "''" for t in tried))
    assert lines[0] == "accept Joe@Example.COM joe@example.com tried joe@example.com"
    assert lines[6].startswith("reject Blocked@CatchAll.org blocked@catchall.org ")
    assert lines[3].startswith("reject bob@example.com - ")


def test_cli_exit_codes(tmp_path):
    cdb = make_cdb(tmp_path / "t1.cdb", T1)
    run = lambda *a: subprocess.run([script("qmail-updater"), "check", *a],
                                    capture_output=True, text=True)
    assert run("--cdb", str(cdb), "joe@example.com", "postmaster").returncode == 0
    done = run("--cdb", str(tmp_path / "missing.cdb"), "joe@example.com")
    assert done.returncode == 2
    assert done.stderr == f"qmail-updater: {tmp_path}/missing.cdb: cannot open: " \
                          "No such file or directory\n"
    empty = tmp_path / "empty.cdb"
    empty.write_bytes(b"")                          # opens, finds nothing: rejected
    assert run("--cdb", str(empty), "joe@example.com").stdout == "reject joe@example.com -\n"
