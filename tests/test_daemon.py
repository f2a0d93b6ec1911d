"""The rebuild daemon: under real supervise/svscan with the shipped service dir, and as a
plain process for the debounce, watch, FIFO and failure cases."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from helpers.daemon import Running, without_dac_override
from helpers.tools import BIN, ROOT, need, script
from helpers.tree import Tree, keys_of, setup_tree
from helpers.wait import wait_for


@pytest.fixture
def running(tree: Tree):
    started: list[Running] = []

    def start(**env: str) -> Running:
        r = Running(tree, **env)
        started.append(r)
        return r
    yield start
    for r in started:
        r.stop()


# --------------------------------------------------------------------------- supervise

def test_under_supervise_with_the_shipped_service_dir(tree: Tree, tmp_path: Path):
    svscan, svok, svc, svstat = (need(t) for t in ("svscan", "svok", "svc", "svstat"))
    need("multilog")
    need("envdir")
    setup_tree(tree)
    services = tmp_path / "services"
    svcdir = services / "qmail-updater"
    shutil.copytree(ROOT / "service/qmail-updater", svcdir)
    env = svcdir / "env"
    for name, value in dict(QMAIL_DIR=tree.qmail, VPOPMAIL_DIR=tree.vpop,
                            UPDATER_PASSWD=tree.root / "etc/passwd", UPDATER_QUIET="0.3",
                            UPDATER_MIN_INTERVAL="0", PATH=f"{BIN}:/usr/bin:/bin").items():
        (env / name).write_text(f"{value}\n")
    scan = subprocess.Popen([svscan, str(services)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    current = svcdir / "log/main/current"
    try:
        wait_for(lambda: subprocess.run([svok, str(svcdir)]).returncode == 0, 15, "svok")
        wait_for(lambda: tree.cdb.exists(), 20, "the first build")
        assert "joe@example.com" in keys_of(tree.cdb)
        # a change nothing watches (a local user's .qmail file): the FIFO tells the daemon
        (tree.root / "home/joe/.qmail-newlist").write_text("./Maildir/\n")
        fifo = tree.qmail / "control/validrcptto.trigger"
        assert fifo.is_fifo()
        started = time.monotonic()
        subprocess.run(["sh", "-c", f"echo add_user joe-newlist@example.com > {fifo}"],
                       check=True, timeout=5)
        wait_for(lambda: "joe-newlist@example.com" in keys_of(tree.cdb), 0.3 + 2 + 1,
                 "the new key")
        assert time.monotonic() - started < 0.3 + 2 + 1
        subprocess.run([svc, "-h", str(svcdir)], check=True)
        wait_for(lambda: "signal SIGHUP" in current.read_text(), 10, "a SIGHUP build")
        subprocess.run([svc, "-d", str(svcdir)], check=True)
        wait_for(lambda: " down " in subprocess.run([svstat, str(svcdir)], capture_output=True,
                                                     text=True).stdout, 15, "svstat down")
        wait_for(lambda: "qmail-updater: stopped" in current.read_text(), 10, "the stop line")
        log = current.read_text()
        assert re.search(r"^@[0-9a-f]{24} qmail-updater: started: ", log, re.M)
        assert "fifo: add_user joe-newlist@example.com" in log
        assert "changes: +joe-newlist@example.com" in log
    finally:
        scan.terminate()
        scan.wait(10)
        for d in (svcdir, svcdir / "log"):
            subprocess.run([svc, "-dx", str(d)], capture_output=True)


# --------------------------------------------------------------------------- debounce

def test_a_burst_of_triggers_reaches_the_rules_whole(tree: Tree, running):
    """1000 trigger lines in about a second through the real FIFO are all read and
    built (how many builds a burst makes is the rules', counted on the fake clock in
    test_schedule.py: test_a_thousand_fifo_lines_in_a_second_make_one_build)."""
    setup_tree(tree)
    r = running()
    fifo = str(tree.qmail / "control/validrcptto.trigger")
    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    for i in range(1000):
        os.write(fd, b"burst %d\n" % i)
        time.sleep(0.0008)
    os.close(fd)
    r.wait(r"build \(fifo: burst 0\b", 10)
    assert r.count("some not read") == 0


# --------------------------------------------------------------------------- watches

def test_watches_come_from_the_builds_record(tree: Tree):
    """What the daemon watches is what the last build read (its one record), plus the
    global inputs' directories; no second run of the delivery chain."""
    from updater import config
    from updater.build.generate import generate
    from updater.build.inputs import Inputs
    from updater.daemon.watch import watch_targets
    d = setup_tree(tree)
    s = config.load(environ=tree.env())
    record = Inputs()
    generate(s, tracer=record)
    targets = watch_targets(s, record)
    assert {"vpasswd", "vpasswd.cdb"} <= targets[str(d)][0] and ".qmail" in targets[str(d)][1]
    assert str(tree.root / "home/joe") not in targets       # a user's own home: the FIFO's
    assert record.homes[str(tree.root / "home/joe")].startswith("account ")
    before = watch_targets(s, None)                       # no build yet, or a failing one
    assert str(d) not in before and str(tree.qmail / "control") in before
    quiet = Inputs(recording=False)                       # a build that keeps no record
    generate(s, tracer=quiet)
    assert not quiet.homes and not quiet.paths


def test_watched_changes_and_our_own_writes(tree: Tree, running):
    d = setup_tree(tree)
    r = running()
    # a control file replaced by rename, editor style
    new = tree.qmail / "control/.rcpthosts.swp"
    new.write_text("example.com\nvpop.example\nnew.example\n")
    tree.control("smtproutes", "new.example:[192.0.2.1]\n")
    r.wait(r"build \(.*smtproutes", 10)
    count = r.builds()
    os.replace(new, tree.qmail / "control/rcpthosts")
    r.wait(r"build \(moved .*/control/rcpthosts", 10)
    wait_for(lambda: "@new.example" in keys_of(tree.cdb), 5, "@new.example")
    # a vpasswd change
    with open(d / "vpasswd", "a") as f:
        f.write("fresh:x:1:0:f:/d/fresh:NOQUOTA\n")
    wait_for(lambda: "fresh@vpop.example" in keys_of(tree.cdb), 5, "fresh@vpop.example")
    # the daemon appended the new mailbox after the live records: a full build from
    # the command line writes the sorted file again (and the daemon, seeing a live file
    # it did not write, builds once to follow it)
    done = tree.run("build", "--force")
    assert done.returncode == 0 and done.stderr.rstrip().endswith(", compacted"), done.stderr
    r.wait(r"live cdb", 10)
    # our own writes (the cdb, its temp file, lock, status) start no build
    time.sleep(1)
    count = r.builds()
    done = tree.run("build", "--force")
    assert done.returncode == 0 and "unchanged" in done.stderr, done.stderr
    subprocess.run([script("qmail-updater"), "status"], env=tree.env(), capture_output=True)
    time.sleep(1.5)
    assert r.builds() == count


def test_fifo_recreated_when_removed_or_replaced(tree: Tree, running):
    setup_tree(tree)
    r = running()
    fifo = tree.qmail / "control/validrcptto.trigger"
    fifo.unlink()
    wait_for(fifo.is_fifo, 5, "the FIFO to come back")
    (tree.root / "home/joe/.qmail-one").write_text("x\n")
    assert tree.run("trigger", "after-delete").returncode == 0
    wait_for(lambda: "joe-one@example.com" in keys_of(tree.cdb), 5, "joe-one")
    fifo.unlink()
    fifo.write_text("not a fifo\n")
    wait_for(fifo.is_fifo, 5, "a FIFO in place of the file")
    assert r.count("was removed or replaced: recreating the FIFO") == 2
    (tree.root / "home/joe/.qmail-two").write_text("x\n")
    assert tree.run("trigger", "after-replace").returncode == 0
    wait_for(lambda: "joe-two@example.com" in keys_of(tree.cdb), 5, "joe-two")


def test_fifo_path_that_is_a_file_at_start(tree: Tree, running):
    setup_tree(tree)
    fifo = tree.qmail / "control/validrcptto.trigger"
    fifo.write_text("junk\n")
    r = running(UPDATER_FIFO_MODE="0620")
    assert fifo.is_fifo() and (fifo.stat().st_mode & 0o777) == 0o620
    assert r.count("is not our FIFO: replacing it with one") == 1


# --------------------------------------------------------------------------- no daemon

def test_trigger_and_onchange_without_a_daemon_return_at_once(tree: Tree):
    setup_tree(tree)
    fifo = tree.qmail / "control/validrcptto.trigger"
    os.mkfifo(fifo)                                    # a FIFO nobody reads
    for argv in ([script("qmail-updater"), "trigger", "add_user", "x@y"],
                 [str(ROOT / "service/onchange"), "add_user", "x@y"]):
        started = time.monotonic()
        done = subprocess.run(argv, env=tree.env(), capture_output=True, text=True, timeout=10)
        elapsed = time.monotonic() - started
        assert done.returncode == (3 if "trigger" in argv else 0)   # the hook: always 0
        assert "no daemon is reading" in done.stderr
        assert elapsed < 2, "it must not wait for a reader"   # (latency: see benchmarks/)
    fifo.unlink()
    done = tree.run("trigger")
    assert done.returncode == 4 and "does not exist" in done.stderr
    done = subprocess.run([str(ROOT / "service/onchange"), "del_user", "x@y"], env=tree.env(),
                          capture_output=True, text=True, timeout=10)
    assert done.returncode == 0 and "does not exist" in done.stderr
    assert not fifo.exists()                           # never creates a regular file
    fifo.write_text("")
    done = tree.run("trigger")
    assert done.returncode == 6 and "is not a FIFO" in done.stderr


def test_onchange_ignores_the_before_stage(tree: Tree, running):
    setup_tree(tree)
    r = running()
    onchange = str(ROOT / "service/onchange")
    subprocess.run([onchange, "del_user", "gone@vpop.example", "before"], env=tree.env(),
                   check=True)
    subprocess.run([onchange, "del_user", "gone@vpop.example", "after"], env=tree.env(),
                   check=True)
    r.wait(r"build \(fifo: del_user gone@vpop.example after\)", 10)
    assert r.count("before") == 0


# --------------------------------------------------------------------------- failures

def test_a_failing_source_holds_its_domain_and_the_others_go_on(tree: Tree):
    """One vpopmail domain's directory unreadable: that domain keeps its last good
    entries (and so does the local domain, whose users/assign prefixes reach into it),
    another vpopmail domain's new mailbox goes live beside it, status names the held
    domains (exit 1), they are retried on their own with backoff and clear by
    themselves when the directory is readable again."""
    d = setup_tree(tree)
    tree.control("rcpthosts", "example.com\nvpop.example\nother.example\n")
    tree.control("virtualdomains", "vpop.example:vpop.example\nother.example:other.example\n")
    other = tree.vpop_domain("other.example", users=("ann",))
    r = Running(tree, prefix=without_dac_override())
    try:
        d.chmod(0)
        subprocess.run([script("qmail-updater"), "trigger", "breaks"], env=tree.env(), check=True)
        r.wait(r"held vpop.example \(its source fails, last good entries kept\): .*cannot "
               r"read directory: Permission denied", 10)
        (other / "vpasswd").write_text("ann:x:1:0::/d/ann:NOQUOTA\nnew:x:1:0::/d/new:NOQUOTA\n")
        wait_for(lambda: "new@other.example" in keys_of(tree.cdb), 5, "the new mailbox")
        assert {"u0@vpop.example", "u2@vpop.example", "joe@example.com"} <= keys_of(tree.cdb)
        r.wait(r"build \(held domain retry \d+: example.com, vpop.example\): unchanged .*2 "
               r"domain\(s\) held", 10)
        assert r.proc.poll() is None and r.count("build failed") == 0
        done = subprocess.run([script("qmail-updater"), "status"], env=tree.env(),
                              capture_output=True, text=True)
        assert done.returncode == 1
        assert "held:         2 domain(s): example.com, vpop.example" in done.stdout
        assert "qmail-updater: held vpop.example (its source fails" in done.stderr
        d.chmod(0o755)
        r.wait(r"^qmail-updater: vpop.example: no longer held", 10)
        done = subprocess.run([script("qmail-updater"), "status"], env=tree.env(),
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "held:         0 domain(s)" in done.stdout
    finally:
        d.chmod(0o755)
        assert r.stop() == 0


def test_status_file_and_prometheus_textfile(tree: Tree, running):
    import json
    setup_tree(tree)
    prom = tree.root / "updater.prom"
    running(UPDATER_PROM_FILE=str(prom))
    st = json.loads((tree.qmail / "control/validrcptto.status").read_text())
    assert st["result"] == "installed" and st["entries"] == 5 and st["added"] == 5
    assert st["reason"] == "start" and st["error"] is None
    text = prom.read_text()
    assert "qmail_updater_entries 5.0\n" in text               # prometheus-client's format
    assert "qmail_updater_last_build_success 1.0\n" in text
    assert "qmail_updater_builds_total 1.0\n" in text
    from prometheus_client.parser import text_string_to_metric_families
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"qmail_updater_entries", "qmail_updater_builds",
            "qmail_updater_last_build_timestamp_seconds"} <= names
    done = subprocess.run([script("qmail-updater"), "status", "--json"], env=tree.env(),
                          capture_output=True, text=True)
    assert done.returncode == 0 and json.loads(done.stdout)["entries"] == 5


def test_polling_mode_sees_changes(tree: Tree, running):
    d = setup_tree(tree)
    r = running(UPDATER_POLL="0.2")
    r.wait(r"watching 5 directories by polling")       # (the line may come after start)
    assert r.count("watching 5 directories by polling") == 1
    with open(d / "vpasswd", "a") as f:
        f.write("polled:x:1:0:p:/d/polled:NOQUOTA\n")
    wait_for(lambda: "polled@vpop.example" in keys_of(tree.cdb), 10, "polled@vpop.example")


@pytest.mark.parametrize("limit, error", [("max_inotify_watches", r"\[Errno 28\]"),   # ENOSPC
                                          ("max_inotify_instances", r"\[Errno 24\]")])  # EMFILE
def test_inotify_limits_fall_back_to_polling(tree: Tree, running, limit: str, error: str):
    """A real inotify limit (ENOSPC for watches, EMFILE for instances), set in a user
    namespace of our own so nothing else on the machine is touched."""
    unshare = need("unshare")
    d = setup_tree(tree)
    value = "1" if limit == "max_inotify_watches" else "0"
    probe = subprocess.run([unshare, "--user", "--map-root-user", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.fail(f"cannot create a user namespace here: {probe.stderr.decode().strip()}")
    r = running(prefix=[unshare, "--user", "--map-root-user", "sh", "-c",
                        f'echo {value} > /proc/sys/user/{limit} && exec "$@"', "sh"])
    r.wait(rf"inotify refused \(.*{error}.*\); falling back to polling")
    r.wait(r"watching 5 directories by polling")
    with open(d / "vpasswd", "a") as f:
        f.write("polled:x:1:0:p:/d/polled:NOQUOTA\n")
    wait_for(lambda: "polled@vpop.example" in keys_of(tree.cdb), 15, "polled@vpop.example")
    r.wait(r"build \(modified .*vpasswd\): installed ")


def test_service_env_dir_holds_every_setting_at_its_default():
    """The shipped env/ directory, read by the real envdir, names every setting of the
    daemon and sets each to exactly its default."""
    from updater import config
    envdir = need("envdir")
    env_dir = ROOT / "service/qmail-updater/env"
    shell_only = {"UPDATER_USER", "PATH"}               # for the run script, not for us
    assert {o.env for o in config.OPTIONS} == set(os.listdir(env_dir)) - shell_only
    done = subprocess.run([envdir, str(env_dir), "env", "-0"], env={}, capture_output=True,
                          check=True)
    environ = dict(item.split("=", 1) for item in done.stdout.decode().split("\0") if item)
    assert environ["QMAIL_DIR"] == "/var/qmail" and environ["UPDATER_QUIET"] == "2"
    assert config.load(None, environ) == config.load(None, {})


# --------------------------------------------------------------------------- hostile local users

def test_fifo_flood_is_bounded_and_reasons_are_escaped(tree: Tree, running):
    """`cat /dev/zero > FIFO` as an unprivileged user: the daemon stays small and alive;
    terminal escapes written to the FIFO never reach the log or `status` raw."""
    setup_tree(tree)
    for p in [tree.root, *tree.root.parents]:          # reachable by other users
        if p in (Path("/tmp"), Path("/")):
            break
        p.chmod(p.stat().st_mode | 0o711)
    for p in (tree.root / "var", tree.qmail, tree.qmail / "control"):
        p.chmod(0o755)
    r = running(UPDATER_FIFO_GROUP="nogroup")           # the group the hook writes as
    fifo = tree.qmail / "control/validrcptto.trigger"
    flood = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                              "sh", "-c", f"exec cat /dev/zero > {fifo}"],
                             stderr=subprocess.PIPE)
    try:
        time.sleep(3)
        assert flood.poll() is None, flood.stderr.read()      # it is writing, not refused
        rss_kb = int(re.search(r"VmRSS:\s+(\d+)",
                               Path(f"/proc/{r.proc.pid}/status").read_text()).group(1))
    finally:
        flood.kill()
        flood.wait()
    assert r.proc.poll() is None and rss_kb < 150 * 1024, rss_kb
    with open(fifo, "wb") as f:
        f.write(b"add_user \x1b[2Jevil\x07@example.com\n")
    r.wait(r"fifo: add_user \\x1b\[2Jevil\\x07@example\.com")
    wait_for(lambda: "x1b" in (tree.qmail / "control/validrcptto.status").read_text(), 10,
             "the status file")
    done = subprocess.run([script("qmail-updater"), "status"], env=tree.env(),
                          capture_output=True)
    assert b"\x1b" not in done.stdout and b"\\x1b[2Jevil\\x07" in done.stdout
    assert not any("\x1b" in line for line in r.lines)


def test_a_line_behind_a_burst_is_never_lost(tree: Tree, running):
    """One write of a real onchange line followed by 128 others (more than one read
    keeps): the change it stands for (here a local user's new .qmail file, which only
    the FIFO tells about) is live, through the full build the lost bytes ask for."""
    setup_tree(tree)
    r = running()
    (tree.root / "home/joe/.qmail-burst").write_text("./Maildir/\n")
    burst = b"add_user joe@example.com - ''\n" + b"".join(
        b"add_user other%03d@elsewhere.example - ''\n" % i for i in range(128))
    assert len(burst) > 4096
    fd = os.open(tree.qmail / "control/validrcptto.trigger", os.O_WRONLY | os.O_NONBLOCK)
    try:
        assert os.write(fd, burst) == len(burst)
    finally:
        os.close(fd)
    wait_for(lambda: "joe-burst@example.com" in keys_of(tree.cdb), 5, "the change")
    r.wait(r"build \(fifo: a burst of lines, some not read \(\d+ bytes\)")


def test_status_reader_tolerates_a_partial_file(tree: Tree):
    status = tree.qmail / "control/validrcptto.status"
    for text in ('{"time": 17', "", "[]", '{"time": "x", "result": "ok", "seconds": 1}'):
        status.write_text(text)
        done = subprocess.run([script("qmail-updater"), "status"], env=tree.env(),
                              capture_output=True, text=True)
        assert done.returncode == 1
        assert done.stderr == f"qmail-updater: {status}: status file is partial or corrupt\n"


def test_status_write_never_follows_a_planted_symlink(tmp_path: Path):
    """The old writer used PATH.tmp.PID; whoever can write the directory could plant a
    link there and have root overwrite any file."""
    from updater.atomicfile import replace as write_atomic
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    victim.chmod(0o600)
    target = tmp_path / "textfiles/qmail_updater.prom"
    target.parent.mkdir()
    for name in (f"{target.name}.tmp.{os.getpid()}", f".{target.name}.tmp.{os.getpid()}"):
        (target.parent / name).symlink_to(victim)
    write_atomic(str(target), "metric 1\n")
    assert victim.read_text() == "precious\n" and (victim.stat().st_mode & 0o777) == 0o600
    assert target.read_text() == "metric 1\n" and (target.stat().st_mode & 0o777) == 0o644
    assert not target.is_symlink()
    leftovers = sorted(p.name for p in target.parent.iterdir())
    assert leftovers == sorted([target.name, f"{target.name}.tmp.{os.getpid()}",
                                f".{target.name}.tmp.{os.getpid()}"])


def test_a_live_cdb_deleted_or_replaced_by_hand_is_put_back(tree: Tree, running):
    """An admin's rm, or another file renamed over the live cdb (or its .sources file):
    the daemon notices on its own, says why, and reinstalls the list it built."""
    setup_tree(tree)
    r = running(UPDATER_QUIET="30", UPDATER_MIN_INTERVAL="60")
    good = tree.cdb.read_bytes()
    tree.cdb.unlink()
    wait_for(lambda: tree.cdb.exists(), 10, "the cdb reinstalled")
    r.wait(r"build \(the live cdb was deleted\): installed ")
    assert tree.cdb.read_bytes() == good
    bogus = tree.cdb.with_name("bogus.tmp")
    bogus.write_bytes(b"\0" * 2048)                 # a cdb of nothing, renamed into place
    os.replace(bogus, tree.cdb)
    r.wait(r"build \(the live cdb was replaced\): installed ")
    wait_for(lambda: tree.cdb.read_bytes() == good, 10, "the list back")
    sources = Path(str(tree.cdb) + ".sources")
    sources.unlink()
    r.wait(r"build \(its .sources file was deleted\): unchanged ")
    wait_for(sources.exists, 10, "the .sources file back")
    assert r.count(r"build failed") == 0


def test_a_status_file_that_cannot_be_written_is_said_once(tree: Tree, running):
    """The status file's directory is a plain file for a while (ENOTDIR: root cannot
    write there either): the daemon says so once, keeps building, and says when it can
    write the file again, which ``status`` then reads."""
    setup_tree(tree)
    where = tree.root / "state"
    where.write_text("not a directory\n")
    status = where / "validrcptto.status"
    r = running(UPDATER_STATUS=str(status))
    r.wait(r"cannot write the status file: .*Not a directory")
    subprocess.run([script("qmail-updater"), "trigger", "one"], env=tree.env(), check=True)
    r.wait(r"build \(fifo: one\)")
    where.unlink()
    where.mkdir()
    subprocess.run([script("qmail-updater"), "trigger", "two"], env=tree.env(), check=True)
    r.wait(r"the status file is written again")          # the build's own write
    assert r.count(r"cannot write the status file") == 1
    done = subprocess.run([script("qmail-updater"), "status", "--status", str(status)],
                          env=tree.env(), capture_output=True, text=True)
    assert "daemon:       running" in done.stdout, done.stdout + done.stderr
