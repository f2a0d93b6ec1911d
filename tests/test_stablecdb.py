"""A cdb rewritten with its records kept in place (updater/install/stablecdb.py), read by three
independent cdb readers (freecdb's cdbget, tinycdb's cdb -q, cdbx) and held to a model
over generated sequences of changes: every key answers as the model says, the tables a
change did not touch are the live file's bytes, and a compaction writes exactly what
cdbmake writes from ``qmail-updater dump``."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import cdbx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.tools import need, script
from updater.checker import records, whole
from updater.install import stablecdb
from updater.install.installer import write_cdb

# (no key the C tools would take for an option)
KEYS = st.binary(min_size=1, max_size=12).filter(lambda k: k[:1] != b"-" and b"\0" not in k)
CHANGE = st.tuples(st.lists(KEYS, max_size=6),             # keys put (accepting)
                   st.lists(KEYS, max_size=6),             # keys put with "-"
                   st.lists(st.integers(0, 10 ** 6), max_size=6))   # keys dropped (by index)


def canonical(path: Path, model: dict[bytes, bytes]) -> None:
    with open(path, "wb") as f:
        write_cdb(f, sorted(model), {k for k, v in model.items() if v})


def rewrite(live: Path, new: Path, drop: list[bytes], put: list[tuple[bytes, bytes]]) -> int:
    fd, buf = stablecdb.open_file(str(live))        # (as the install reads the live file)
    try:
        with open(new, "w+b") as out:
            return stablecdb.rewrite(fd, buf, out, drop, put)
    finally:
        os.close(fd)


def c_lookup(tool: list[str], path: Path, key: bytes) -> bytes | None:
    done = subprocess.run([*tool, key], stdin=open(path, "rb") if "-q" not in tool else None,
                          capture_output=True)
    assert done.returncode in (0, 100), done.stderr
    return done.stdout if done.returncode == 0 else None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(start=st.dictionaries(KEYS, st.sampled_from([b"", b"-"]), max_size=40),
       changes=st.lists(CHANGE, min_size=1, max_size=8))
def test_rewrites_answer_as_the_model_and_compact_to_a_full_build(tmp_path_factory, start,
                                                                  changes):
    root = tmp_path_factory.mktemp("stable")
    model = dict(start)
    live = root / "live.cdb"
    canonical(live, model)
    seen = set(model)
    garbage = 0
    for n, (accepting, rejecting, drops) in enumerate(changes):
        names = sorted(model)
        drop = [names[i % len(names)] for i in drops] if names else []
        put = dict([(k, b"") for k in accepting] + [(k, b"-") for k in rejecting])
        drop = [k for k in drop if k not in put]
        new = root / f"{n}.cdb"
        garbage += rewrite(live, new, drop, sorted(put.items()))
        for k in drop:
            model.pop(k, None)
        model.update(put)
        seen |= set(put)
        data = new.read_bytes()
        assert whole(data[:2048], len(data)) and records(data[:2048]) == len(model)
        assert dict(stablecdb.reachable(data)) == model
        db = cdbx.CDB(str(new))
        assert {k: db.get(k) for k in seen} == {k: model.get(k) for k in seen}
        db.close()
        # what rewrite says it left behind is all the records no lookup reaches
        kept = sum(8 + len(k) + len(v) for k, v in model.items())
        assert stablecdb.layout(data).data_end - 2048 - kept == garbage
        live = new
    # the C readers agree on every key ever seen (one process each: a sample)
    cdbget, tiny = need("cdbget"), need("cdb")
    for k in sorted(seen)[:8]:
        assert c_lookup([cdbget], live, k) == model.get(k), k
        assert c_lookup([tiny, "-q", str(live)], live, k) == model.get(k), k
    # a compaction (a full build of the model) is what cdbmake writes from what the
    # rewritten file's lookups find, in key order
    found = sorted(stablecdb.reachable(live.read_bytes()))
    ref, full = root / "ref.cdb", root / "full.cdb"
    subprocess.run([need("cdbmake"), str(ref), str(ref) + ".tmp"], check=True,
                   input=b"".join(b"+%d,%d:%s->%s\n" % (len(k), len(v), k, v)
                                  for k, v in found) + b"\n")
    canonical(full, model)
    assert ref.read_bytes() == full.read_bytes()


def test_a_one_key_change_leaves_every_other_byte_in_place(tmp_path: Path):
    """The records stay where they were and the tables that neither gained nor lost a
    key are the live file's bytes, shifted by the new record: an rsync push finds
    all of it."""
    model = {f"user{i:06d}@d{i % 50}.example".encode(): b"" for i in range(20000)}
    live, new = tmp_path / "live.cdb", tmp_path / "new.cdb"
    canonical(live, model)
    old = live.read_bytes()
    gone = b"user000007@d7.example"
    rewrite(live, new, [gone], [(b"zed@d3.example", b"")])
    data = new.read_bytes()
    lay_old, lay_new = stablecdb.layout(old), stablecdb.layout(data)
    assert data[2048:lay_old.data_end] == old[2048:lay_old.data_end]   # records in place
    touched = {stablecdb.cdb_hash(gone) & 255, stablecdb.cdb_hash(b"zed@d3.example") & 255}
    for i in range(256):
        (p0, s0), (p1, s1) = lay_old.tables[i], lay_new.tables[i]
        if i not in touched:
            assert old[p0:p0 + 8 * s0] == data[p1:p1 + 8 * s1], i
    differing = sum(1 for i in range(256) if old[lay_old.tables[i][0]:][:8 * lay_old.tables[i][1]]
                    != data[lay_new.tables[i][0]:][:8 * lay_new.tables[i][1]])
    assert differing == len(touched)
    assert dict(stablecdb.reachable(data)) == {**{k: v for k, v in model.items() if k != gone},
                                                b"zed@d3.example": b""}
    # cdbdump walks the records and still shows the removed one; our dump does not
    walked = subprocess.run([need("cdbdump")], stdin=open(new, "rb"), capture_output=True,
                            check=True).stdout
    ours = subprocess.run([script("qmail-updater"), "dump", "--cdb", str(new)],
                          capture_output=True, check=True).stdout
    assert b":" + gone + b"->" in walked and b":" + gone + b"->" not in ours
    assert len(ours.splitlines()) == len(model) + 1           # (its last line is empty)


def test_a_change_of_most_tables_is_left_to_the_canonical_writer(tmp_path: Path,
                                                                 monkeypatch):
    """Placing most of a big file's slots again in Python costs more than writing the
    sorted file in C: rewrite says so before writing anything."""
    import pytest
    model = {f"k{i:05d}".encode(): b"" for i in range(3000)}
    live, new = tmp_path / "live.cdb", tmp_path / "new.cdb"
    canonical(live, model)
    wide = [(f"new{i}".encode(), b"") for i in range(400)]
    monkeypatch.setattr(stablecdb, "MAX_REBUILT", (0.25, 1000))
    with pytest.raises(stablecdb.Cheaper):
        rewrite(live, new, [], wide)
    assert new.read_bytes() == b""
    rewrite(live, new, [], wide[:1])                  # one table: in place
    assert dict(stablecdb.reachable(new.read_bytes())) == {**model, b"new0": b""}


def test_a_live_file_truncated_in_place_is_refused_not_a_crash(tmp_path: Path):
    """Someone truncates the live cdb in place while a rewrite reads it: the rewrite
    reads by pread, so that is a NotCdb (the install then writes the whole file), never
    a SIGBUS of the daemon."""
    import pytest
    live, new = tmp_path / "live.cdb", tmp_path / "new.cdb"
    canonical(live, {f"k{i}".encode(): b"" for i in range(5000)})
    fd, buf = stablecdb.open_file(str(live))
    try:
        os.truncate(live, 3000)
        with open(new, "w+b") as out, pytest.raises(stablecdb.NotCdb):
            stablecdb.rewrite(fd, buf, out, [b"k7"], [(b"zz", b"")])
    finally:
        os.close(fd)


def test_dump_refuses_what_is_not_a_cdb(tmp_path: Path):
    bad = tmp_path / "bad.cdb"
    bad.write_bytes(b"\xff" * 4096)
    done = subprocess.run([script("qmail-updater"), "dump", "--cdb", str(bad)],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith(f"qmail-updater: {bad}: not a cdb: ")
    link = tmp_path / "link.cdb"
    link.symlink_to(bad)
    done = subprocess.run([script("qmail-updater"), "dump", "--cdb", str(link)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "cannot read" in done.stderr, done.stderr
