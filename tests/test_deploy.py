"""The README's Deploy block, run as written: a virtual environment, the service
directories, users/cdb and the rules compiled, the first list, qmail-smtpd's service
replaced, both services up under a real svscan, and an unknown recipient refused from
an address that is not a relay client.  Only the variables at its top point into a
temporary root (and qmail-newu, which has no Debian package, is a stand-in)."""

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

from helpers.tools import need, script, CI
from helpers.net import free_port

HERE = Path(__file__).resolve().parent
TOP = HERE.parent


def block(heading: str) -> str:
    readme = (TOP / "README.md").read_text()
    section = readme[readme.index(f"\n## {heading}\n"):]
    return re.search(r"```sh\n(.*?)```", section, re.S).group(1)


def deploy_block() -> str:
    return block("Deploy")


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
def test_the_readme_deploy_block_as_written(tmp_path: Path):
    for tool in ("svscan", "svstat", "svc", "tcprules", "swaks", "envdir", "multilog"):
        need(tool)
    root = tmp_path / "root"
    qmail = root / "var/qmail"
    for d in ("control", "users", "alias", "supervise", "bin"):
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
    for p in [tmp_path, *tmp_path.parents]:        # nobody (SMTPD_USER) walks down to it
        if p in (Path("/tmp"), Path("/")):
            break
        p.chmod(p.stat().st_mode | 0o711)
    for p in (root, root / "var", qmail, qmail / "control"):
        p.chmod(0o755)
    services = root / "service"
    services.mkdir()
    old = qmail / "supervise/qmail-smtpd"          # the service Deploy replaces, linked
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
        done = subprocess.run(["bash", "-e", "-c", deploy_block()], cwd=TOP, env=env,
                              capture_output=True, text=True, timeout=600)
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
        again = subprocess.run(["bash", "-e", "-c", deploy_block()], cwd=TOP, env=env,
                               capture_output=True, text=True, timeout=600)
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
    finally:
        for s in ("validrcptto-smtpd", "qmail-updater", "validrcptto-policyd"):
            d = qmail / "supervise" / s
            if d.exists():
                subprocess.run([need("svc"), "-dx", str(d), str(d / "log")])
        os.killpg(scan.pid, signal.SIGTERM)
        scan.wait(10)
        time.sleep(1)
        shutil.rmtree(tmp_path / "venv", ignore_errors=True)


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
