"""Deploy as the README calls it (``sh service/deploy``): a virtual environment, the
service directories, users/cdb and the rules compiled, the first list, qmail-smtpd's
service replaced, every service up under a real svscan, and an unknown recipient
refused from an address that is not a relay client; run again, then again with the
daemon moved to vpopmail, every consumer following.  Only the variables point into a
temporary root (and qmail-newu and qmail-queue, which have no Debian package, are
stand-ins).  A host that lacks what it needs is told all of it, and nothing changes."""

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

from helpers.net import free_port
from helpers.tools import CI, need, script

HERE = Path(__file__).resolve().parent
TOP = HERE.parent


def block(heading: str, page: str = "docs/deploy.md") -> str:
    text = (TOP / page).read_text()
    section = text[text.index(f"\n## {heading}\n"):]
    return re.search(r"```sh\n(.*?)```", section, re.S).group(1)


def deploy(env: dict[str, str], **more: str) -> subprocess.CompletedProcess:
    """The README's Deploy command, as written, with these variables."""
    command = block("Deploy", "README.md")
    assert command.strip().endswith("sh service/deploy"), command
    return subprocess.run(["sh", "service/deploy"], cwd=TOP, env={**env, **more},
                          capture_output=True, text=True, timeout=600)


def svstat_up(services: Path, name: str) -> int | None:
    out = subprocess.run([need("svstat"), str(services / name)], capture_output=True,
                         text=True).stdout
    m = re.search(r": up \(pid (\d+)\) (\d+) seconds", out)
    return int(m.group(1)) if m and int(m.group(2)) >= 1 else None


def wait_up(services: Path, name: str, old: int | None) -> int | None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        pid = svstat_up(services, name)
        if pid is not None and pid != old:
            return pid
        time.sleep(0.2)
    return None


@pytest.mark.skipif(os.geteuid() != 0 and not CI, reason="the services run as root")
def test_deploy_as_the_readme_calls_it(tmp_path: Path, vpopmail_account):
    for tool in ("svscan", "svstat", "svc", "tcprules", "swaks", "envdir", "multilog"):
        need(tool)
    root = tmp_path / "root"
    qmail = root / "var/qmail"
    for d in ("control", "users", "alias", "bin"):      # no supervise/: Deploy makes it
        (qmail / d).mkdir(parents=True)
    (qmail / "control/me").write_text("mx.deploy.test\n")
    (qmail / "control/rcpthosts").write_text("deploy.test\n")
    (qmail / "control/locals").write_text("deploy.test\n")
    (qmail / "alias/.qmail-postmaster").write_text("&root@example.org\n")
    (qmail / "users/assign").write_text(".\n")
    newu = qmail / "bin/qmail-newu"                # a stand-in: writes users/cdb as qmail does
    newu.write_text(f"#!{sys.executable}\nimport sys\nfrom pathlib import Path\n"
                    f"sys.path.insert(0, {str(HERE)!r})\nfrom helpers.tree import newu\n"
                    f"newu(Path({str(qmail)!r}))\n")
    newu.chmod(0o755)
    queue = qmail / "bin/qmail-queue"              # a stand-in: takes the message
    queue.write_text("#!/bin/sh\ncat >/dev/null\n")
    queue.chmod(0o755)
    for p in [tmp_path, *tmp_path.parents]:        # nobody (SMTPD_USER) walks down to it
        if p in (Path("/tmp"), Path("/")):
            break
        p.chmod(p.stat().st_mode | 0o711)
    for p in (root, root / "var", qmail, qmail / "control"):
        p.chmod(0o755)
    services = root / "service"
    services.mkdir()
    old = root / "old/qmail-smtpd"                 # the service Deploy replaces, linked
    (old / "log").mkdir(parents=True)              # into the scanned directory as usual
    (services / "qmail-smtpd").symlink_to(old)
    (old / "run").write_text("#!/bin/sh\nexec sleep 600\n")
    (old / "log/run").write_text("#!/bin/sh\nexec sleep 600\n")
    for f in (old / "run", old / "log/run"):
        f.chmod(0o755)
    (root / "etc").mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("UPDATER_", "VALIDRCPTTO_", "QMAIL_", "VPOPMAIL_", "TCP"))}
    vpopmail = root / "home/vpopmail"
    (vpopmail / "etc").mkdir(parents=True)
    pport = free_port()
    # the system's python3, as on a mail host (this machine's own may live in root's home,
    # which vpopmail cannot enter: the case Deploy refuses, tested with a venv made 0700)
    env["PATH"] = "/usr/bin:/bin:" + env["PATH"]
    env.update(PREFIX=str(tmp_path / "venv"), QMAIL=str(qmail), SERVICE=str(services),
               TCPRULES=str(root / "etc/tcp.smtp"), SMTPD_USER="nobody", IP="::",
               PORT=str(port), CHECK_SERVER="::1", POLICYD=f"127.0.0.1:{pport}",
               VPOPMAIL=str(vpopmail))
    scan = subprocess.Popen([need("svscan"), str(services)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 15           # svscan has started the old service
        while subprocess.run([need("svok"), str(old)]).returncode != 0:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        done = deploy(env)
        assert done.returncode == 0, done.stdout + done.stderr
        out = done.stdout
        assert "ok: nobody-here@deploy.test refused (553" in out, out + done.stderr
        assert re.search(r"/qmail-updater: up \(pid \d+\)", out), out
        assert re.search(r"/validrcptto-smtpd: up \(pid \d+\)", out), out
        assert not os.path.lexists(services / "qmail-smtpd")      # the old service is gone
        assert subprocess.run([need("svok"), str(old)]).returncode != 0
        assert (qmail / "users/cdb").exists() and (root / "etc/tcp.smtp.cdb").exists()
        # the installed programs are the virtual environment's, found through env/PATH
        assert (tmp_path / "venv/bin/validrcptto-smtpd").exists()
        # and its man pages, where man finds them from PATH
        pages = ("qmail-updater", "mkvalidrcptto", "validrcptto-smtpd", "validrcptto-policyd",
                 "qmail-updater-environ")
        found = subprocess.run([need("man"), "-w", *pages], capture_output=True, text=True,
                               env={"PATH": f"{tmp_path}/venv/bin:/usr/bin:/bin"})
        assert found.stdout.splitlines() == [
            f"{tmp_path}/venv/share/man/man{5 if p.endswith('environ') else 8}/{p}."
            f"{5 if p.endswith('environ') else 8}" for p in pages], found.stdout + found.stderr
        listed = subprocess.run([str(tmp_path / "venv/bin/qmail-updater"), "check", "--cdb",
                                 str(qmail / "control/validrcptto.cdb"),
                                 "postmaster@deploy.test"], capture_output=True, text=True)
        assert listed.returncode == 0, listed.stdout + listed.stderr
        log = (qmail / "supervise/validrcptto-smtpd/log/main/current").read_text()
        assert "listening on" in log and "WARNING" not in log
        # validrcptto-policyd deployed too, answering for the list
        assert re.search(r"/validrcptto-policyd: up \(pid \d+\)", out), out
        import socket
        with socket.create_connection(("127.0.0.1", pport), timeout=10) as sock:
            sock.sendall(b"request=smtpd_access_policy\nprotocol_state=RCPT\n"
                         b"recipient=nobody-here@deploy.test\n\n")
            assert sock.recv(200).startswith(b"action=REJECT")
        # the onchange hook, pointed at this qmail's FIFO, reaches the daemon
        hook = vpopmail / "etc/onchange"
        assert f"{qmail}/control/validrcptto.trigger" in hook.read_text()
        ran = subprocess.run([str(hook), "add_user", "postmaster@deploy.test", "-", ""],
                             capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
        assert ran.returncode == 0 and ran.stderr == "", ran.stderr
        # a second run changes nothing and says so
        again = deploy(env)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "deploy: nothing to change (already deployed)" in again.stdout, again.stdout
        assert [x for x in again.stdout.splitlines() if x.startswith("deploy:")] == \
            ["deploy: nothing to change (already deployed)"], again.stdout
        assert "ok: nobody-here@deploy.test refused (553" in again.stdout
        assert not (qmail / "supervise/qmail-updater/qmail-updater").exists()
        # the Upgrade block: installed again, every service restarted, all up again
        pids = {s: svstat_up(services, s) for s in
                ("qmail-updater", "validrcptto-smtpd", "validrcptto-policyd")}
        up = subprocess.run(["bash", "-e", "-c", block("Upgrade")], cwd=TOP, env=env,
                            capture_output=True, text=True, timeout=600)
        assert up.returncode == 0, up.stdout + up.stderr
        for s, pid in pids.items():
            assert f"upgrade: {s} restarted" in up.stdout, up.stdout
            new = wait_up(services, s, pid)
            assert new and new != pid
        moved_to_vpopmail(tmp_path, env, qmail, services, vpopmail, pport)
    finally:
        for s in ("validrcptto-smtpd", "qmail-updater", "validrcptto-policyd"):
            d = qmail / "supervise" / s
            if d.exists():
                subprocess.run([need("svc"), "-dx", str(d), str(d / "log")])
        os.killpg(scan.pid, signal.SIGTERM)
        scan.wait(10)
        time.sleep(1)
        shutil.rmtree(tmp_path / "venv", ignore_errors=True)


def moved_to_vpopmail(tmp_path: Path, env: dict[str, str], qmail: Path, services: Path,
                      vpopmail: Path, pport: int) -> None:
    """DAEMON_USER=vpopmail on a deployed host: refused with the hint while vpopmail
    cannot read the virtual environment; then the daemon runs as vpopmail in a directory
    of its own, and both servers and the hook follow (a new address, named by the hook
    as vpopmail runs it, is accepted by validrcptto-smtpd and by Postfix's policyd)."""
    import pwd
    venv = tmp_path / "venv"
    venv.chmod(0o700)
    refused = deploy(env, DAEMON_USER="vpopmail")
    venv.chmod(0o755)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert refused.stderr.splitlines() == [
        "deploy: this host lacks what Deploy needs; nothing was changed:",
        f"  vpopmail cannot run {venv}/bin/qmail-updater: the virtual environment (and, for "
        "an editable install, the checkout) must be readable by vpopmail: install it where "
        "every user may read, such as /opt/qmail-updater, not under a 0700 home"], refused.stderr
    assert not (qmail / "control/validrcptto").exists()
    done = deploy(env, DAEMON_USER="vpopmail")
    assert done.returncode == 0, done.stdout + done.stderr
    own = qmail / "control/validrcptto"
    for s in ("qmail-updater", "validrcptto-smtpd", "validrcptto-policyd"):
        assert f"deploy: {s} restarted (its env/ changed)" in done.stdout, done.stdout
    assert "ok: nobody-here@deploy.test refused (553" in done.stdout, done.stdout
    vp = pwd.getpwnam("vpopmail")
    assert (own / "validrcptto.cdb").stat().st_uid == vp.pw_uid
    for s in ("validrcptto-smtpd", "validrcptto-policyd"):
        assert (qmail / f"supervise/{s}/env/VALIDRCPTTO_CDB").read_text() == \
            f"{own}/validrcptto.cdb\n"
    # a new address: the hook, run as vpopmail, reaches the moved daemon
    (qmail / "alias/.qmail-newbox").write_text("&root@example.org\n")
    hook = vpopmail / "etc/onchange"
    assert f"{own}/validrcptto.trigger" in hook.read_text()
    ran = subprocess.run([need("setpriv"), f"--reuid={vp.pw_uid}", f"--regid={vp.pw_gid}",
                          f"--groups={vp.pw_gid}", str(hook), "add_user",
                          "newbox@deploy.test", "-", ""], capture_output=True, text=True,
                         env={"PATH": os.environ["PATH"]})
    assert ran.returncode == 0 and ran.stderr == "", ran.stderr
    import socket

    def policyd_says() -> bytes:
        with socket.create_connection(("127.0.0.1", pport), timeout=10) as sock:
            sock.sendall(b"request=smtpd_access_policy\nprotocol_state=RCPT\n"
                         b"recipient=newbox@deploy.test\n\n")
            return sock.recv(200)
    deadline = time.monotonic() + 20
    while policyd_says().startswith(b"action=REJECT"):
        assert time.monotonic() < deadline, "policyd never accepted the new address"
        time.sleep(0.3)
    pid = svstat_up(services, "qmail-updater")           # the daemon runs as vpopmail
    assert pid and os.stat(f"/proc/{pid}").st_uid == vp.pw_uid
    rc = subprocess.run([need("swaks"), "--server", "::1", "--port", env["PORT"], "--from",
                         "check@example.org", "--to", "newbox@deploy.test", "--quit-after",
                         "RCPT", "--hide-all"]).returncode
    assert rc == 0                                  # validrcptto-smtpd accepts it too
    assert "newbox@deploy.test" in subprocess.run(
        [str(venv / "bin/qmail-updater"), "check", "--cdb", str(own / "validrcptto.cdb"),
         "newbox@deploy.test"], capture_output=True, text=True).stdout


@pytest.mark.skipif(os.geteuid() != 0 and not CI, reason="Deploy runs as root")
def test_a_host_that_lacks_what_deploy_needs_is_told_all_of_it(tmp_path: Path):
    """A qmail dir with no rcpthosts and no qmail-queue, users/assign without qmail-newu,
    no scanned directory and an unknown SMTPD_USER: one line each, exit 1, and nothing
    is created (no virtual environment, no service directory, no link)."""
    qmail = tmp_path / "qmail"
    (qmail / "users").mkdir(parents=True)
    (qmail / "users/assign").write_text(".\n")
    env = {"PATH": os.environ["PATH"], "PREFIX": str(tmp_path / "venv"), "QMAIL": str(qmail),
           "SERVICE": str(tmp_path / "service"), "TCPRULES": str(tmp_path / "tcp.smtp"),
           "SMTPD_USER": "no-such-user-here", "VPOPMAIL": ""}
    done = deploy(env)
    assert done.returncode == 1 and done.stdout == "", done.stdout
    lines = done.stderr.splitlines()
    assert lines[0] == "deploy: this host lacks what Deploy needs; nothing was changed:"
    for what in (f"{qmail}/control/rcpthosts:", f"{qmail}/bin/qmail-queue:",
                 f"{qmail}/bin/qmail-newu:", f"{tmp_path}/service:", "user no-such-user-here:"):
        assert sum(x.startswith("  " + what) for x in lines) == 1, (what, lines)
    assert len(lines) == 6, lines
    assert sorted(os.listdir(tmp_path)) == ["qmail"] and os.listdir(qmail) == ["users"]


@pytest.mark.skipif(os.geteuid() != 0 and not CI, reason="planting as another uid needs root")
def test_the_hook_is_never_installed_through_a_planted_link(tmp_path: Path):
    """Deploy's step 6 as root in ~vpopmail/etc, which the vpopmail user owns: a link
    it planted as the hook (to a file of root's, or dangling) is replaced, never written
    through; nothing appears where a dangling link points; a rerun changes nothing."""
    setpriv = need("setpriv")
    etc = tmp_path / "vpopmail/etc"
    etc.mkdir(parents=True)
    for p in [tmp_path, *tmp_path.parents]:
        if p in (Path("/tmp"), Path("/")):
            break
        p.chmod(p.stat().st_mode | 0o711)
    os.chown(etc, 65534, 65534)                     # the vpopmail user's own directory
    precious = tmp_path / "precious"
    precious.write_text("root's file\n")
    precious.chmod(0o600)
    nowhere = tmp_path / "created-through-a-link"
    hook = etc / "onchange"

    def plant(target: Path) -> None:
        subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
                        "ln", "-sfn", str(target), str(hook)], check=True)

    def install() -> subprocess.CompletedProcess:
        return subprocess.run([script("qmail-updater"), "install-hook", "--fifo",
                               "/var/qmail/control/validrcptto.trigger",
                               str(TOP / "service/onchange"), str(hook)],
                              capture_output=True, text=True, timeout=60)
    for target in (precious, nowhere):
        plant(target)
        done = install()
        assert done.returncode == 0 and done.stdout == f"installed {hook}\n", done.stderr
        assert precious.read_text() == "root's file\n" and precious.stat().st_mode & 0o777 == 0o600
        assert not nowhere.exists()
        st = hook.lstat()
        assert not hook.is_symlink() and st.st_mode & 0o777 == 0o755 and st.st_uid == 0
        assert 'FIFO="${UPDATER_FIFO:-/var/qmail/control/validrcptto.trigger}"' in hook.read_text()
    assert install().stdout == f"unchanged {hook}\n"
    assert [n for n in os.listdir(etc) if n != "onchange"] == []      # no temp file left
