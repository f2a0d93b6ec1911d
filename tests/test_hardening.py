"""The rebuild path against hostile local users and odd files, attacked the way a user
would: an unprivileged uid (setpriv), real flock, real FIFO writers, real symlinks and
FIFOs, against the real CLI, a running daemon and the shipped service under supervise."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.tools import BIN, CI, ROOT, need, script
from helpers.tree import Tree, keys_of, setup_tree
from helpers.wait import wait_for

MALLORY = 4321                   # an unprivileged local user with no group in common

pytestmark = pytest.mark.skipif(os.geteuid() != 0 and not CI,
                                reason="attacks need root to switch to another uid")


@pytest.fixture(autouse=True)
def reachable(tree: Tree):
    """pytest's temp dirs are 0700 root: let other users walk down to the tree, as they
    can to /var/qmail and their homes on a real host."""
    for p in [tree.root, *tree.root.parents]:
        if p == Path("/tmp") or p == Path("/"):
            break
        p.chmod(p.stat().st_mode | 0o711)
    for p in (tree.root, tree.root / "home", tree.root / "var", tree.qmail,
              tree.qmail / "control"):
        p.mkdir(parents=True, exist_ok=True)
        p.chmod(0o755)


def as_user(uid: int = MALLORY, gid: int | None = None, groups: str = "") -> list[str]:
    gid = uid if gid is None else gid
    return [need("setpriv"), f"--reuid={uid}", f"--regid={gid}",
            f"--groups={groups}" if groups else "--clear-groups"]


# --------------------------------------------------------------------------- the lock

def test_a_user_cannot_take_or_keep_the_build_lock(tree: Tree):
    setup_tree(tree)
    lock = tree.qmail / "control/validrcptto.cdb.lock"
    lock.write_text("")
    lock.chmod(0o644)                          # as an older version left it
    flock = need("flock")
    holder = subprocess.Popen(as_user() + [flock, "-x", str(lock), "sleep", "60"])
    try:
        wait_for(lambda: subprocess.run([flock, "-n", "-s", str(lock), "true"]).returncode,
                 5, "the user's flock")
        started = time.monotonic()
        done = tree.run("build", UPDATER_LOCK_TIMEOUT="20")
        assert done.returncode == 0, done.stderr
        assert time.monotonic() - started < 10          # not frozen by the user's lock
        assert "joe@example.com" in keys_of(tree.cdb)
        assert (lock.stat().st_mode & 0o777) == 0o600 and lock.stat().st_uid == 0
        again = subprocess.run(as_user() + [flock, "-n", "-x", str(lock), "true"],
                               capture_output=True, text=True)
        assert again.returncode != 0 and "Permission denied" in again.stderr
    finally:
        holder.kill()
        holder.wait()


def test_waiting_for_the_lock_is_bounded_and_names_the_holder(tree: Tree):
    setup_tree(tree)
    assert tree.run("build").returncode == 0
    good = tree.cdb.read_bytes()
    (tree.root / "home/joe/.qmail-new").write_text("./Maildir/\n")
    lock = tree.qmail / "control/validrcptto.cdb.lock"
    first = subprocess.Popen([script("qmail-updater"), "build"], env=tree.env(),
                             stderr=subprocess.PIPE, text=True)
    first.wait(30)
    holder = subprocess.Popen([need("flock"), "-x", str(lock), "sleep", "30"])
    try:
        wait_for(lambda: subprocess.run([need("flock"), "-n", str(lock), "true"]).returncode,
                 5, "the holder")
        started = time.monotonic()
        done = tree.run("build", UPDATER_LOCK_TIMEOUT="1")
        assert 1 <= time.monotonic() - started < 5
        assert done.returncode == 1
        assert re.fullmatch(rf"qmail-updater: {re.escape(str(lock))}: another build holds the "
                            rf"lock \(pid {holder.pid} since \d\d:\d\d:\d\d\); gave up after "
                            r"1s\n", done.stderr), done.stderr
    finally:
        holder.kill()
        holder.wait()
    assert tree.cdb.read_bytes() != good or "joe-new@example.com" in keys_of(tree.cdb)


def test_svc_down_stops_a_daemon_waiting_for_the_lock(tree: Tree, tmp_path: Path):
    svscan, svok, svc, svstat = (need(t) for t in ("svscan", "svok", "svc", "svstat"))
    setup_tree(tree)
    lock = tree.qmail / "control/validrcptto.cdb.lock"
    lock.touch(mode=0o600)                     # a lock as ours are: only root can take it
    holder = subprocess.Popen([need("flock"), "-x", str(lock), "sleep", "120"])
    services = tmp_path / "services"
    svcdir = services / "qmail-updater"
    shutil.copytree(ROOT / "service/qmail-updater", svcdir)
    for name, value in dict(QMAIL_DIR=tree.qmail, VPOPMAIL_DIR=tree.vpop,
                            UPDATER_PASSWD=tree.root / "etc/passwd",
                            PATH=f"{BIN}:/usr/bin:/bin").items():
        (svcdir / "env" / name).write_text(f"{value}\n")
    scan = subprocess.Popen([svscan, str(services)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    current = svcdir / "log/main/current"
    try:
        wait_for(lambda: subprocess.run([svok, str(svcdir)]).returncode == 0, 15, "svok")
        wait_for(lambda: current.exists() and "started:" in current.read_text(), 15,
                 "the daemon's start")
        time.sleep(1)                              # the first build now waits for the lock
        subprocess.run([svc, "-d", str(svcdir)], check=True)
        wait_for(lambda: " down " in subprocess.run([svstat, str(svcdir)], capture_output=True,
                                                     text=True).stdout, 10, "svstat down")
        log = current.read_text()
        assert "stopping: gave up waiting for the lock" in log and "qmail-updater: stopped" in log
    finally:
        scan.terminate()
        scan.wait()
        subprocess.run([svc, "-dx", str(svcdir), str(svcdir / "log")])
        holder.kill()
        holder.wait()


def test_one_daemon_per_tree(tree: Tree):
    setup_tree(tree)
    env = tree.env(UPDATER_QUIET="0.3")
    first = subprocess.Popen([script("qmail-updater"), "run"], env=env,
                             stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: tree.cdb.exists(), 20, "the first daemon's build")
        second = subprocess.run([script("qmail-updater"), "run"], env=env, capture_output=True,
                                text=True, timeout=20)
        assert second.returncode == 1
        assert re.fullmatch(rf"qmail-updater: {re.escape(str(tree.cdb))}\.daemon: another "
                            rf"qmail-updater run holds the lock \(pid {first.pid} since "
                            r"\d\d:\d\d:\d\d\); gave up after 0s: exiting\n", second.stderr), \
            second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(20) == 0


# --------------------------------------------------------------------------- the gate

def test_a_users_own_dot_qmail_files_never_move_the_shrink_gate(tree: Tree):
    setup_tree(tree)
    home = tree.account("mallory", MALLORY)
    assert tree.run("build").returncode == 0
    make = "for i in $(seq 1 100); do echo ./Maildir/ > $HOME/.qmail-x$i; done"
    subprocess.run(as_user() + ["env", f"HOME={home}", "sh", "-c", make], check=True)
    done = tree.run("build")
    assert done.returncode == 0 and "+100 -0" in done.stderr, done.stderr
    subprocess.run(as_user() + ["sh", "-c", f"rm {home}/.qmail-x*"], check=True)
    done = tree.run("build")                          # 100 of 106 keys gone: still fine
    assert done.returncode == 0, done.stderr
    assert "+0 -100" in done.stderr
    # the same shrink in what the admin controls is still held
    (tree.vpop / "domains/vpop.example/vpasswd").write_text("")
    done = tree.run("build")
    assert done.returncode == 1 and "held vpop.example (the gate doubts" in done.stderr


# --------------------------------------------------------------------------- the FIFO

def test_fifo_owner_mode_and_floor(tree: Tree):
    setup_tree(tree)
    env = tree.env(UPDATER_QUIET="0.2", UPDATER_MIN_INTERVAL="3", UPDATER_FIFO_GROUP="nogroup")
    daemon = subprocess.Popen([script("qmail-updater"), "run"], env=env,
                              stderr=subprocess.PIPE, text=True)
    fifo = tree.qmail / "control/validrcptto.trigger"
    lines: list[str] = []
    import threading
    threading.Thread(target=lambda: lines.extend(daemon.stderr), daemon=True).start()
    try:
        wait_for(lambda: any("build (start)" in x for x in lines), 20, "the first build")
        st = fifo.stat()
        assert (st.st_mode & 0o777) == 0o620 and st.st_uid == 0
        assert st.st_gid == 65534                      # nogroup: the hook's group
        denied = subprocess.run(as_user() + ["sh", "-c", f"echo x > {fifo}"],
                                capture_output=True, text=True)
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
        # a member of the group writes a trigger every 0.4 s for 5 s: at most 2 builds
        started = time.monotonic()
        writer = as_user(MALLORY, 65534)
        while time.monotonic() - started < 5:
            subprocess.run(writer + ["sh", "-c", f"echo poke > {fifo}"], check=True)
            time.sleep(0.4)
        time.sleep(1)
        fifo_builds = sum(1 for x in lines if "build (fifo: poke" in x)
        assert 1 <= fifo_builds <= 2, lines
        # a file change is not held back by the floor
        before = time.monotonic()
        with open(tree.vpop / "domains/vpop.example/vpasswd", "a") as f:
            f.write("new:x:1:0::/d/new:NOQUOTA\n")
        wait_for(lambda: "new@vpop.example" in keys_of(tree.cdb), 3, "the watched change")
        assert time.monotonic() - before < 3
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(20)


class Running:
    def __init__(self, tree: Tree, **env: str):
        self.proc = subprocess.Popen([script("qmail-updater"), "run"], env=tree.env(**env),
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        import threading
        threading.Thread(target=lambda: self.lines.extend(self.proc.stderr), daemon=True).start()

    def wait(self, text: str, seconds: float = 20) -> None:
        wait_for(lambda: any(text in x for x in self.lines), seconds, repr(text))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(20)


def test_fifo_group_is_vpopmails_and_the_hook_says_what_happened(tree: Tree, vpopmail_account):
    setup_tree(tree)
    hook = tree.root / "onchange"                      # where any user can run it
    shutil.copy(ROOT / "service/onchange", hook)
    hook.chmod(0o755)
    fifo = tree.qmail / "control/validrcptto.trigger"
    vp = as_user(vpopmail_account.pw_uid, vpopmail_account.pw_gid,
                 groups=str(vpopmail_account.pw_gid))
    daemon = Running(tree, UPDATER_QUIET="0.2", UPDATER_MIN_INTERVAL="0")
    try:
        daemon.wait("build (start)")
        st = fifo.stat()
        assert st.st_gid == vpopmail_account.pw_gid and (st.st_mode & 0o777) == 0o620
        done = subprocess.run(vp + [str(hook), "add_user", "new@vpop.example"],
                              env=tree.env(), capture_output=True, text=True, timeout=10)
        assert done.returncode == 0 and done.stderr == ""
        daemon.wait("build (fifo: add_user new@vpop.example)")
        done = subprocess.run(as_user() + [str(hook), "add_user", "x@vpop.example"],
                              env=tree.env(), capture_output=True, text=True, timeout=10)
        assert done.returncode == 0 and "onchange: permission denied writing" in done.stderr
    finally:
        daemon.stop()
    done = subprocess.run(vp + [str(hook), "add_user", "x@vpop.example"], env=tree.env(),
                          capture_output=True, text=True, timeout=10)
    assert done.returncode == 0 and "onchange: no daemon is reading" in done.stderr
    assert tree.run("trigger", "x").returncode == 3
    daemon = Running(tree, UPDATER_FIFO_GROUP="nosuchgroup")
    try:
        daemon.wait("there is no group 'nosuchgroup'")
        daemon.wait("build (start)")
        assert fifo.stat().st_gid == 0
    finally:
        daemon.stop()


def test_a_held_build_is_visible(tree: Tree):
    """A FIFO request for a full build held back by UPDATER_MIN_INTERVAL is logged with
    the time it is held until, and `status` shows it and a live count of the pending
    requests, also after an incremental build ran in between; `status` says whether the
    daemon is running.  (A line that names no domain asks for a full build, which the
    floor holds; add_user is a targeted build, which it does not.)"""
    d = setup_tree(tree)
    fifo = tree.qmail / "control/validrcptto.trigger"
    daemon = Running(tree, UPDATER_QUIET="0.2", UPDATER_MIN_INTERVAL="60")

    def say(line: str) -> None:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.write(fd, f"{line}\n".encode())
        os.close(fd)
    try:
        daemon.wait("build (start)")
        shown = tree.run("status").stdout
        assert re.search(r"^daemon: +running \(pid \d+ since \d\d:\d\d:\d\d\)$", shown, re.M), shown
        assert "pending:      0 requests" in shown
        for n, who in enumerate(("a", "b"), 1):
            say(f"refresh {who}.example")
            wait_for(lambda: f"pending:      {n} requests" in tree.run("status").stdout, 5,
                     f"{n} pending in status")
        assert sum("held until" in x and "(min-interval 60s)" in x for x in daemon.lines) == 1
        shown = tree.run("status").stdout
        assert re.search(r"held until:   \d\d:\d\d:\d\d \(min-interval\)", shown), shown
        # a new mailbox goes ahead; the full build stays held, and status says so
        (d / "vpasswd").write_text((d / "vpasswd").read_text() + "new:x:1:0::/x:NOQUOTA\n")
        say("add_user new@vpop.example - ")
        daemon.wait("[incremental: 1 domain: vpop.example]")
        wait_for(lambda: "pending:      2 requests" in tree.run("status").stdout, 5,
                 "the two held requests, the new mailbox's done")
        assert "held until:" in tree.run("status").stdout
        assert not any("build (fifo: refresh" in x for x in daemon.lines)
        daemon.proc.send_signal(signal.SIGHUP)         # the admin's "now"
        daemon.wait("build (fifo: refresh a.example")
        wait_for(lambda: "held until" not in tree.run("status").stdout, 5, "held cleared")
        assert "pending:      0 requests" in tree.run("status").stdout
    finally:
        daemon.stop()
    shown = tree.run("status").stdout
    assert "daemon:       not running" in shown and "pending:      (none: no daemon)" in shown


def test_trigger_path_that_is_a_directory(tree: Tree):
    setup_tree(tree)
    fifo = tree.qmail / "control/validrcptto.trigger"
    fifo.mkdir()
    daemon = subprocess.Popen([script("qmail-updater"), "run"], env=tree.env(UPDATER_QUIET="0.2"),
                              stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    import threading
    threading.Thread(target=lambda: lines.extend(daemon.stderr), daemon=True).start()
    try:
        wait_for(lambda: any("build (start)" in x for x in lines), 20, "the first build")
        with open(tree.vpop / "domains/vpop.example/vpasswd", "a") as f:
            f.write("dir:x:1:0::/d/d:NOQUOTA\n")
        wait_for(lambda: "dir@vpop.example" in keys_of(tree.cdb), 5, "a watched build")
        time.sleep(2)
        assert daemon.poll() is None
        problems = [x for x in lines if "is a directory, not a FIFO" in x]
        assert len(problems) == 1 and not any("Traceback" in x for x in lines), lines
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(20) == 0


# --------------------------------------------------------------------------- odd files

def test_vpasswd_symlink_fifo_and_device_are_refused_without_quoting(tree: Tree):
    d = setup_tree(tree)
    assert tree.run("build").returncode == 0
    good = tree.cdb.read_bytes()
    secret = tree.root / "secret"
    secret.write_text("root:$6$topsecret-hash:19000:0:99999:7:::\n")
    secret.chmod(0o600)
    vpasswd = d / "vpasswd"
    for make, why in ((lambda: vpasswd.symlink_to(secret), "is a symbolic link: not read"),
                      (lambda: vpasswd.symlink_to("/dev/zero"), "is a symbolic link: not read"),
                      (lambda: os.mkfifo(vpasswd), "is not a regular file: not read")):
        vpasswd.unlink()
        make()
        started = time.monotonic()
        done = tree.run("build")
        assert time.monotonic() - started < 20
        assert done.returncode == 1
        assert done.stderr.splitlines()[1:] == [
            f"qmail-updater: held vpop.example (its source fails, last good entries kept): "
            f"{vpasswd}: {why}"]
        assert "topsecret" not in done.stderr and tree.cdb.read_bytes() == good


def test_vpasswd_owned_by_someone_else_and_size_cap(tree: Tree):
    d = setup_tree(tree)
    vpasswd = d / "vpasswd"
    os.chown(d, 89, 89)
    os.chown(vpasswd, MALLORY, MALLORY)
    done = tree.run("build")       # no last good entries yet: the domain is accepted whole
    assert done.returncode == 1 and done.stderr.splitlines()[1:] == [
        f"qmail-updater: held vpop.example (its source fails, last good entries kept): "
        f"{vpasswd}: is owned by uid {MALLORY}, neither root nor the owner of its directory: "
        "not read"]
    assert "@vpop.example" in keys_of(tree.cdb)
    os.chown(vpasswd, 89, 89)
    assert tree.run("build").returncode == 0
    done = tree.run("build", UPDATER_MAX_FILE_SIZE="10")
    assert done.returncode == 1 and "more than UPDATER_MAX_FILE_SIZE (10): not read" in done.stderr


def test_a_users_odd_dot_qmail_files_neither_hang_nor_break_the_build(tree: Tree):
    setup_tree(tree)
    home = tree.account("mallory", MALLORY)
    script_ = (f"mkfifo {home}/.qmail-default && ln -s /dev/zero {home}/.qmail-zero && "
               f"truncate -s 3G {home}/.qmail-big")
    subprocess.run(as_user() + ["sh", "-c", script_], check=True)
    started = time.monotonic()
    done = tree.run("build", UPDATER_MAX_FILE_SIZE="100000")
    assert time.monotonic() - started < 20
    assert done.returncode == 0, done.stderr
    keys = keys_of(tree.cdb)
    # a FIFO or a device is no .qmail file to qmail-local either; the big one is a file
    assert "mallory-big@example.com" in keys and "mallory-zero@example.com" not in keys
    assert "mallory-anything@example.com" not in keys


def test_symlinked_live_cdb_is_refused(tree: Tree):
    setup_tree(tree)
    real = tree.root / "elsewhere.cdb"
    real.write_bytes(b"")
    tree.cdb.symlink_to(real)
    done = tree.run("build")
    assert done.returncode == 1
    assert done.stderr == (f"qmail-updater: {tree.cdb}: is a symbolic link: refusing to install "
                           "through it (set VALIDRCPTTO_CDB to the real file)\n")
    assert tree.cdb.is_symlink() and real.read_bytes() == b""
    assert tree.run("build", VALIDRCPTTO_CDB=str(real)).returncode == 0
    assert "joe@example.com" in keys_of(real)


def test_the_daemon_runs_as_vpopmail_with_a_directory_of_its_own(tree: Tree, vpopmail_account):
    """UPDATER_USER=vpopmail as docs/deploy.md "Running the daemon as vpopmail" sets it up: the
    cdb, locks, status and FIFO in a directory of vpopmail's, with the owners and modes
    it states; the hook (as vpopmail) reaches the daemon.  In root's control/ the daemon
    exits with one line saying what it needs."""
    import grp
    import stat as st_
    setuidgid = need("setuidgid")
    d = setup_tree(tree)
    for p in [tree.root, *tree.root.parents]:           # vpopmail walks down to the tree
        if p in (Path("/tmp"), Path("/")):
            break
        p.chmod(p.stat().st_mode | 0o711)
    own = tree.qmail / "control/validrcptto"
    own.mkdir(mode=0o755)
    os.chown(own, vpopmail_account.pw_uid, vpopmail_account.pw_gid)
    env = tree.env(UPDATER_QUIET="0.2", UPDATER_MIN_INTERVAL="0", PYTHONPATH="",
                   VALIDRCPTTO_CDB=str(own / "validrcptto.cdb"),
                   UPDATER_STATUS=str(own / "validrcptto.status"),
                   UPDATER_FIFO=str(own / "validrcptto.trigger"))
    # the program as vpopmail can start it: the system's Python 3 with this checkout and
    # the virtual environment's packages (this Python's own home may be root's alone)
    import site
    import sysconfig
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    paths = os.pathsep.join([str(ROOT), sysconfig.get_path("purelib"),
                             sysconfig.get_path("platlib"), *site.getsitepackages()])
    run = [setuidgid, "vpopmail", python, "-m", "updater", "run"]
    wrong = subprocess.run(run, env=tree.env(PYTHONPATH=paths), capture_output=True,
                           text=True, timeout=30)
    assert wrong.returncode != 0
    assert "cannot open lock file: Permission denied (this user may not write the cdb's " \
        "directory" in wrong.stderr, wrong.stderr
    env["PYTHONPATH"] = paths
    proc = subprocess.Popen(run, env=env, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    import threading
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    try:
        wait_for(lambda: any("build (start): installed" in x for x in lines), 20,
                 "the first build")
        vp = vpopmail_account.pw_uid
        for name, mode in (("validrcptto.cdb", 0o644), ("validrcptto.cdb.lock", 0o600),
                           ("validrcptto.cdb.daemon", 0o600)):
            s = os.stat(own / name)
            assert (s.st_uid, st_.S_IMODE(s.st_mode)) == (vp, mode), name
        fifo = os.stat(own / "validrcptto.trigger")
        assert st_.S_ISFIFO(fifo.st_mode) and st_.S_IMODE(fifo.st_mode) == 0o620
        assert fifo.st_gid == grp.getgrnam("vchkpw").gr_gid
        (d / "vpasswd").write_text((d / "vpasswd").read_text() + "late:x:1:0::/x:NOQUOTA\n")
        hook = tree.root / "onchange"
        shutil.copy(ROOT / "service/onchange", hook)
        hook.chmod(0o755)
        ran = subprocess.run(as_user(vp, vpopmail_account.pw_gid,
                                     groups=str(vpopmail_account.pw_gid)) +
                             [str(hook), "add_user", "late@vpop.example"], env=env,
                             capture_output=True, text=True, timeout=30)
        assert ran.returncode == 0 and ran.stderr == "", ran.stderr
        wait_for(lambda: "late@vpop.example" in keys_of(own / "validrcptto.cdb"), 10,
                 "the new mailbox")
        assert (own / "validrcptto.status").stat().st_uid == vp
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
