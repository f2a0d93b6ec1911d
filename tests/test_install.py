"""`qmail-updater build`: the cdb it writes, the sanity gate, crash safety, concurrency."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import time
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.tools import need, script
from helpers.tree import Tree
from updater.install.gate import DomainChange, Peak, judge_domain


def local_tree(tree: Tree, users: int) -> None:
    """One vpopmail domain with ``users`` users (vpasswd written directly)."""
    tree.control("rcpthosts", "big.example\n")
    tree.control("virtualdomains", "big.example:big.example\n")
    d = tree.vpop_domain("big.example")
    set_users(d, users)


def set_users(domain_dir: Path, users: int, start: int = 0) -> None:
    (domain_dir / "vpasswd").write_text("".join(
        f"user{i:07d}:$1$ab$cdefghijklmnopqrstuv01:1:0:User {i}:{domain_dir}/user{i:07d}:NOQUOTA\n"
        for i in range(start, start + users)))


def cdbdump(path: Path) -> bytes:
    return subprocess.run([need("cdbdump")], stdin=open(path, "rb"), capture_output=True,
                          check=True).stdout


def test_cdb_is_read_by_freecdb_and_identical_to_cdbmake(tree: Tree, tmp_path: Path):
    cdbmake, cdbget = need("cdbmake"), need("cdbget")
    tree.control("rcpthosts", "example.com\nvpop.example\n")
    tree.control("locals", "example.com\n")
    tree.control("virtualdomains", "vpop.example:vpop.example\n")
    tree.control("validrcptto.exclude", "trap@vpop.example\n")
    tree.account("joe", files=(".qmail-x",))
    tree.vpop_domain("vpop.example", users=("ann", "bob", "trap"))
    done = tree.run("build")
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith(f"qmail-updater: installed {tree.cdb}: 6 entries, +6 -0")
    # cdbget finds each key with its value
    for key, value in ((b"ann@vpop.example", b""), (b"trap@vpop.example", b"-")):
        got = subprocess.run([cdbget, key], stdin=open(tree.cdb, "rb"), capture_output=True)
        assert got.returncode == 0 and got.stdout == value
    assert subprocess.run([cdbget, b"nobody@vpop.example"], stdin=open(tree.cdb, "rb"),
                          capture_output=True).returncode == 100
    # byte-identical to cdbmake fed the same records in the same order (mkvalidrcptto -m)
    records = tree.run("generate", "--format", "cdbmake").stdout.encode()
    assert records.count(b"\n") == 7 and records.endswith(b"\n\n")
    ref = tmp_path / "ref.cdb"
    subprocess.run([cdbmake, str(ref), str(ref) + ".tmp"], input=records, check=True)
    assert tree.cdb.read_bytes() == ref.read_bytes()
    assert cdbdump(tree.cdb) == records
    assert stat.S_IMODE(tree.cdb.stat().st_mode) == 0o644


def test_large_list_identical_to_cdbmake(tree: Tree, tmp_path: Path):
    cdbmake = need("cdbmake")
    local_tree(tree, 20000)
    assert tree.run("build").returncode == 0
    records = tree.run("generate", "--format", "cdbmake").stdout.encode()
    ref = tmp_path / "ref.cdb"
    subprocess.run([cdbmake, str(ref), str(ref) + ".tmp"], input=records, check=True)
    assert tree.cdb.read_bytes() == ref.read_bytes()


def test_unchanged_list_is_not_rewritten(tree: Tree):
    local_tree(tree, 10)
    assert tree.run("build").returncode == 0
    before = tree.cdb.stat()
    time.sleep(0.01)
    done = tree.run("build")
    assert done.returncode == 0
    assert done.stderr.startswith(f"qmail-updater: unchanged {tree.cdb}: 10 entries")
    after = tree.cdb.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_diff_and_counts(tree: Tree):
    local_tree(tree, 10)
    tree.run("build")
    d = tree.vpop / "domains/big.example"
    set_users(d, 10, start=1)             # user0 gone, user10 new
    done = tree.run("build", "--diff")
    assert done.returncode == 0
    assert "10 entries, +1 -1," in done.stderr
    assert done.stdout.splitlines() == ["+user0000010@big.example", "-user0000000@big.example"]


def test_diff_shows_a_key_whose_value_changed(tree: Tree):
    local_tree(tree, 10)
    tree.run("build")
    tree.control("validrcptto.exclude", "user0000001@big.example\n")
    done = tree.run("build", "--diff")
    assert done.returncode == 0 and "10 entries, +0 -0 ~1," in done.stderr
    assert done.stdout.splitlines() == ["~user0000001@big.example"]
    assert tree.run("check", "user0000001@big.example").returncode == 1
    (tree.qmail / "control/validrcptto.exclude").unlink()
    done = tree.run("build", "--diff")
    assert done.stdout.splitlines() == ["~user0000001@big.example"]
    assert tree.run("check", "user0000001@big.example").returncode == 0


def test_sanity_gate_holds_a_big_shrink_and_refuses_an_empty_list(tree: Tree):
    """Half of a domain's mailboxes gone with no onchange line naming them: that domain
    keeps its last good entries (exit 1, one line naming it), and ``accept`` takes the
    new list; an empty list is refused whole."""
    local_tree(tree, 100)
    assert tree.run("build").returncode == 0
    good = tree.cdb.read_bytes()
    d = tree.vpop / "domains/big.example"
    set_users(d, 50)
    done = tree.run("build")
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "qmail-updater: held big.example (the gate doubts its new list, last good entries "
        "kept): big.example would refuse 50 of the 100 addresses it accepted, more than the "
        "20% allowed (--max-shrink)")
    assert tree.cdb.read_bytes() == good
    assert tree.run("build", "--max-shrink", "60").returncode == 0       # a looser gate
    set_users(d, 100)
    tree.run("build")
    assert tree.run("build", UPDATER_MAX_SHRINK="60").returncode == 0
    set_users(d, 50)
    done = tree.run("accept", "big.example")
    assert done.returncode == 0, done.stderr
    assert "accepted big.example" in done.stderr and "50 entries, +0 -50" in done.stderr
    assert tree.run("build").returncode == 0          # the accepted list is the reference
    set_users(d, 0)
    done = tree.run("build")
    assert done.returncode == 1 and "refusing to install an empty list" in done.stderr
    done = tree.run("build", "--force")
    assert done.returncode == 0 and "0 entries, +0 -50" in done.stderr


def test_the_per_domain_rule():
    def judge(old, new, lost, named=(), peak=None, now=1000.0, **kw):
        change = DomainChange(old, new, [b"x%d@d" % i for i in range(lost)], **kw)
        return judge_domain("d", change, frozenset(named), peak, now, 20.0)
    assert judge(100, 80, 20) == (None, Peak(100, 20, 1000.0))   # 20 %: allowed
    why, peak = judge(100, 79, 21)
    assert why.startswith("d would refuse 21 of the 100 addresses") and \
        peak == Peak(100, 0, 1000.0)
    assert judge(100, 79, 21, named=[b"x%d" % i for i in range(21)])[0] is None   # named
    assert judge(3, 2, 1)[0] is None                # one address is never a shrink
    assert judge(3, 0, 3)[0].startswith("d had 3 entries and now has none")
    assert judge(1, 0, 1, named=[b"x0"])[0] is None  # the last one, named by its line
    # a stream of small cuts measures against the largest list of the last hour
    assert judge(85, 72, 13, peak=Peak(100, 15, 500.0))[0] == (
        "d would refuse 28 of the 100 addresses it accepted within 1 h, more than the 20% "
        "allowed (--max-shrink)")
    assert judge(85, 72, 13, peak=Peak(100, 15, 500.0 - 3600))[0] is None   # an hour on
    assert judge(100, 1, 0)[0] is None              # a catch-all that took over: no loss
    # a domain gone from the control files is intended; gone from rcpthosts alone is not
    assert judge(5, 0, 5, served=False) == (None, None)
    assert "no longer in rcpthosts but still in" in judge(5, 0, 5, served=False,
                                                          configured=True)[0]
    # a source that gave nothing where it gave some, remembered while not consulted
    why, _ = judge(10, 9, 1, sources_old={"users": 303}, sources_new={"users": 0},
                   removed=[b"x0@d"])
    assert why == "d: its vpopmail users are gone (303 last time, none now); did a source " \
        "return nothing?"
    assert judge(10, 9, 1, sources_old={"users": 303}, sources_new={}, removed=[b"x0@d"]
                 )[0] is None
    # narrowed, not lost (a catch-all back to mailboxes), but the vpasswd is empty now
    assert judge(1, 1, 0, sources_old={"users": 30}, sources_new={"users": 0},
                 removed=[b"@d"])[0] == "d: its vpopmail users are gone (30 last time, " \
        "none now); did a source return nothing?"


def test_carried_source_counts():
    from updater.install.gate import carried
    assert carried({"users": 303, "valias": 2}, {"valias": 3}) == {"users": 303, "valias": 3}
    assert carried(None, {"ldap": 1}) == {"ldap": 1}


def test_a_domain_whose_vpopmail_users_vanished_is_held(tree: Tree):
    """An emptied vpasswd: the 3 users of small.example gone, its .qmail alias stays:
    the per-source memory (CDB.sources) holds small.example; big.example's new mailbox
    installs meanwhile."""
    tree.control("rcpthosts", "big.example\nsmall.example\n")
    tree.control("virtualdomains", "big.example:big.example\nsmall.example:small.example\n")
    big = tree.vpop_domain("big.example")
    set_users(big, 46)
    small = tree.vpop_domain("small.example", users=("ann", "bob", "cy"), files=(".qmail-info",))
    assert tree.run("build").returncode == 0
    (small / "vpasswd").write_text("")
    set_users(big, 47)
    done = tree.run("build")
    assert done.returncode == 1, done.stderr
    assert "held small.example (the gate doubts its new list, last good entries kept): " \
        "small.example: its vpopmail users are gone (3 last time, none now); did a source " \
        "return nothing?" in done.stderr
    assert tree.run("check", "ann@small.example", "user0000046@big.example").returncode == 0
    done = tree.run("build", "--force")
    assert done.returncode == 0 and "+0 -3" in done.stderr
    assert tree.run("build").returncode == 0          # the new state is remembered
    (small / "vpasswd").write_text("dan:x:1:0::/d/dan:NOQUOTA\n")     # users again: fine
    assert tree.run("build").returncode == 0
    (small / "vpasswd").write_text("")               # the last user really deleted...
    assert tree.run("build").returncode == 1         # ...needs accept, as documented
    assert tree.run("accept", "small.example").returncode == 0
    tree.control("rcpthosts", "big.example\n")       # or the domain leaving rcpthosts
    tree.control("virtualdomains", "big.example:big.example\n")
    assert tree.run("build").returncode == 0


def test_a_domain_whose_vpasswd_is_broken_is_held_and_the_others_go_on(tree: Tree):
    """A vpasswd line broken by hand in one domain: that domain keeps its last good
    entries (its mail is never refused), a new mailbox in another domain installs, and
    the hold clears by itself once the file is mended."""
    tree.control("rcpthosts", "big.example\nsmall.example\n")
    tree.control("virtualdomains", "big.example:big.example\nsmall.example:small.example\n")
    big = tree.vpop_domain("big.example")
    set_users(big, 5)
    small = tree.vpop_domain("small.example", users=("ann", "bob"))
    assert tree.run("build").returncode == 0
    good = (small / "vpasswd").read_text()
    (small / "vpasswd").write_text(good + "broken line without fields\n")
    set_users(big, 6)
    done = tree.run("build")
    assert done.returncode == 1
    assert f"held small.example (its source fails, last good entries kept): {small}/vpasswd:3:" \
        in done.stderr
    assert tree.run("check", "ann@small.example", "user0000005@big.example").returncode == 0
    (small / "vpasswd").write_text(good)
    done = tree.run("build")
    assert done.returncode == 0 and "held" not in done.stderr


def test_unwritable_target_keeps_old_and_leaves_no_temp(tree: Tree):
    local_tree(tree, 5)
    done = tree.run("build", "--cdb", str(tree.root / "no/such/dir/validrcptto.cdb"))
    assert done.returncode == 1
    assert done.stderr.strip().startswith("qmail-updater: ")
    assert done.stderr == (f"qmail-updater: {tree.root}/no/such/dir: cannot use the "
                           "directory: No such file or directory\n")


def test_build_that_cannot_get_memory_for_the_image_keeps_old(tree: Tree):
    """A file-size limit (RLIMIT_FSIZE) also caps the in-memory image: one clear line,
    exit 1, the live cdb untouched."""
    import resource
    local_tree(tree, 5)
    assert tree.run("build").returncode == 0
    good = tree.cdb.read_bytes()
    set_users(tree.vpop / "domains/big.example", 500)

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    done = subprocess.run([script("qmail-updater"), "build"], env=tree.env(), text=True,
                          capture_output=True, preexec_fn=small_files, timeout=60)
    assert done.returncode == 1, done.stderr
    assert done.stderr == (f"qmail-updater: {tree.cdb}: cannot build the cdb in memory: "
                           "File too large\n")
    assert tree.cdb.read_bytes() == good


def keyset(path: Path) -> int:
    import cdbx
    db = cdbx.CDB(str(path))
    try:
        return len(db)
    finally:
        db.close()


def temps(tree: Tree) -> list[str]:
    return [n for n in os.listdir(tree.cdb.parent) if n.startswith(".validrcptto.cdb.tmp.")]


def test_sigkill_anywhere_leaves_old_or_new_complete_file(tree: Tree):
    """Kill builds with SIGKILL at 60 points spread over the write (from the moment the
    temp file appears until the rename); the live file is always one of the two complete
    cdbs; the next good build removes the temp files the killed ones left."""
    sizes = (100000, 150000)
    domain = tree.vpop / "domains/big.example"
    local_tree(tree, sizes[0])
    env = tree.env()
    argv = [script("qmail-updater"), "build", "--force"]
    assert subprocess.run(argv, env=env, capture_output=True).returncode == 0

    def run_until_temp() -> tuple[subprocess.Popen, float | None]:
        proc = subprocess.Popen(argv, env=env, stderr=subprocess.DEVNULL)
        while proc.poll() is None:
            if temps(tree):
                return proc, time.monotonic()
            time.sleep(0.0002)
        return proc, None

    # calibrate: how long the temp file exists (the write: data, fsync, rename)
    set_users(domain, sizes[1])
    proc, seen = run_until_temp()
    assert seen is not None, "never saw the temp file"
    while temps(tree):
        time.sleep(0.0002)
    write = time.monotonic() - seen
    proc.wait()
    assert keyset(tree.cdb) == sizes[1]
    live = 1
    points, inside = 60, 0
    for i in range(points):
        set_users(domain, sizes[1 - live])          # every build heads for the other list
        proc, seen = run_until_temp()
        if seen is not None:
            time.sleep(write * i / points)
            proc.send_signal(signal.SIGKILL)
            inside += bool(temps(tree))
        proc.wait()
        count = keyset(tree.cdb)                   # always a complete, readable cdb
        assert count in sizes
        live = sizes.index(count)
    assert inside >= points // 2, f"only {inside} kills landed inside the write"
    assert tree.run("build", "--force").returncode == 0
    assert keyset(tree.cdb) in sizes
    assert temps(tree) == []


def test_two_builds_at_once(tree: Tree):
    local_tree(tree, 50000)
    env = tree.env()
    procs = [subprocess.Popen([script("qmail-updater"), "build"], env=env,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    # one installed it, the other (serialised by the lock) found it unchanged
    assert sorted(o.split()[1] for o in outs) == ["installed", "unchanged"]
    assert keyset(tree.cdb) == 50000
    assert temps(tree) == []


# --------------------------------------------------------------------------- the diff

keys_st = st.sets(st.binary(min_size=1, max_size=12).map(lambda b: b.replace(b"@", b"") + b"@d"),
                  max_size=60)


@settings(max_examples=300, deadline=None)
@given(old=keys_st, added=keys_st, gone=st.integers(0, 5), rejects=keys_st, seed=st.randoms())
def test_changed_stretch_agrees_with_sets(old, added, gone, rejects, seed, tmp_path_factory):
    """The quick diff (only the differing stretch parsed) equals the plain set difference,
    and the streaming diff too; the quick one is used whenever it can be."""
    from updater.install.cdbdiff import Changes, changed_stretch, compare_live
    from updater.install.installer import make_cdb
    old_keys = sorted(old)
    dropped = set(seed.sample(old_keys, min(gone, len(old_keys))))
    new_keys = sorted((old - dropped) | added)
    old_rejects = {k for k in old if seed.random() < 0.2}
    new_rejects = {k for k in new_keys
                   if k in rejects or (k in old_rejects and seed.random() < 0.7)}
    value = lambda k, rej: b"-" if k in rej else b""                     # noqa: E731
    expect = Changes(sorted(set(new_keys) - old), sorted(old - set(new_keys)),
                     sorted(k for k in set(new_keys) & old
                            if value(k, old_rejects) != value(k, new_rejects)))
    path = tmp_path_factory.mktemp("diff") / "live.cdb"
    with make_cdb(old_keys, old_rejects) as live_image:
        path.write_bytes(live_image[:])
    new = dict.fromkeys(new_keys)
    with make_cdb(new_keys, new_rejects) as image:
        quick = changed_stretch(path.read_bytes(), image, new_keys, new_rejects, new)
        assert quick is not None                    # small lists: always the quick way
        assert quick == expect
        assert compare_live(str(path), new_keys, new, new_rejects, image) == expect  # by pread
        assert compare_live(str(path), new_keys, new, new_rejects) == expect   # streaming


def test_compare_live_with_a_foreign_record_order(tmp_path: Path):
    """A live cdb written by another tool in another order still diffs right."""
    import cdbx

    from updater.install.cdbdiff import Changes, compare_live
    from updater.install.installer import make_cdb
    keys = sorted(b"u%03d@d.example" % i for i in range(300))
    live = tmp_path / "live.cdb"
    maker = cdbx.CDB.make(str(live))
    for k in reversed(keys[1:] + [b"gone@d.example"]):
        maker.add(k, b"-" if k == b"u100@d.example" else b"")
    maker.commit().close()
    with make_cdb(keys, set()) as image:
        got = compare_live(str(live), keys, dict.fromkeys(keys), set(), image)
    assert got == Changes([b"u000@d.example"], [b"gone@d.example"], [b"u100@d.example"])
    live.write_bytes(live.read_bytes()[:3000])               # truncated: counts as empty
    with make_cdb(keys, set()) as image:
        got = compare_live(str(live), keys, dict.fromkeys(keys), set(), image)
    assert got.added == keys and got.removed == []


def test_status_says_which_domains_are_catch_alls(tree: Tree):
    """vpopmail 5.6's vadddomain leaves a domain a catch-all (vdelivermail '' delete):
    every address of it is accepted; status says so (not a fault)."""
    tree.control("rcpthosts", "big.example\nshop.example\n")
    tree.control("virtualdomains", "big.example:big.example\nshop.example:shop.example\n")
    set_users(tree.vpop_domain("big.example"), 3)
    tree.vpop_domain("shop.example", users=("ann",),
                     default="| /home/vpopmail/bin/vdelivermail '' delete")
    assert tree.run("build").returncode == 0
    for _ in range(2):                                   # a build that changes nothing too
        done = tree.run("status")
        assert "catch-all: every address is accepted at 1 domain(s): shop.example" \
            in done.stderr, done.stderr
        assert tree.run("build").returncode == 0
