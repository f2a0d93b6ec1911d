"""Publishing the installed cdb to the other MX hosts: the real rsync, over the real
sshd (a temp host key, an authorized key) and to a real ``rsync --daemon``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from helpers.tools import BIN, ROOT, need, script
from helpers.tree import Tree, keys_of, setup_tree
from helpers.wait import wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class Sshd:
    def __init__(self, d: Path):
        keygen = need("ssh-keygen")
        need("ssh")
        self.dir = d
        d.mkdir()
        for name in ("host_key", "client_key"):
            subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)],
                           check=True)
        (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
        self.port = free_port()
        host = (d / "host_key.pub").read_text().split()
        self.known_hosts = d / "known_hosts"
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host[0]} {host[1]}\n")
        self.identity = d / "client_key"
        (d / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\n"
            f"AuthorizedKeysFile {d}/authorized_keys\nPidFile none\nUsePAM no\n"
            "StrictModes no\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nLogLevel ERROR\n")
        os.makedirs("/run/sshd", exist_ok=True)           # privilege separation directory
        self.proc = subprocess.Popen([need("sshd"), "-D", "-e", "-f", str(d / "sshd_config")],
                                     stderr=subprocess.DEVNULL)
        wait_for(lambda: listening(self.port), 10, "sshd")
        self.target_dir = d / "mx"
        self.target_dir.mkdir()

    def target(self) -> str:
        return f"root@127.0.0.1:{self.target_dir}/validrcptto.cdb"

    def env(self) -> dict[str, str]:
        return dict(UPDATER_SSH_PORT=str(self.port), UPDATER_SSH_IDENTITY=str(self.identity),
                    UPDATER_SSH_KNOWN_HOSTS=str(self.known_hosts))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class Rsyncd:
    def __init__(self, d: Path):
        self.rsync = need("rsync")
        self.dir = d
        d.mkdir()
        self.target_dir = d / "mx"
        self.target_dir.mkdir()
        self.port = free_port()
        (d / "rsyncd.conf").write_text(
            f"use chroot = false\n[mx]\npath = {self.target_dir}\nread only = false\n"
            "uid = root\ngid = root\n")
        self.proc = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen([self.rsync, "--daemon", "--no-detach",
                                      "--address=127.0.0.1", f"--port={self.port}",
                                      f"--config={self.dir / 'rsyncd.conf'}",
                                      f"--log-file={self.dir / 'log'}"])
        wait_for(lambda: listening(self.port), 10, "rsync --daemon")

    def target(self) -> str:
        return f"rsync://127.0.0.1:{self.port}/mx/validrcptto.cdb"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def sshd(tmp_path: Path):
    server = Sshd(tmp_path / "sshd")
    yield server
    server.stop()


@pytest.fixture
def rsyncd(tmp_path: Path):
    server = Rsyncd(tmp_path / "rsyncd")
    yield server
    server.stop()


def publish_env(sshd: Sshd, rsyncd: Rsyncd, **extra: str) -> dict[str, str]:
    return dict(UPDATER_PUBLISH=f"{sshd.target()}, {rsyncd.target()}",
                UPDATER_PUBLISH_TIMEOUT="5", **sshd.env(), **extra)


def cdbget(path: Path, key: str) -> bool:
    with open(path, "rb") as f:
        return subprocess.run([need("cdbget"), key], stdin=f,
                              capture_output=True).returncode == 0


# --------------------------------------------------------------------------- rules

def test_targets_and_the_rsync_command():
    from updater import config
    from updater.errors import ConfigError
    from updater.publish import rsync_argv
    from updater.targets import Target, parse_targets
    assert parse_targets("mx2:/var/qmail/control/validrcptto.cdb, "
                         "rsync://mx3:8730/qmail/validrcptto.cdb  root@[::1]:/x/v.cdb") == [
        Target("mx2:/var/qmail/control/validrcptto.cdb", "ssh"),
        Target("rsync://mx3:8730/qmail/validrcptto.cdb", "rsyncd"),
        Target("root@[::1]:/x/v.cdb", "ssh")]
    for bad in ("mx2", "mx2:relative/path", "http://mx2/x", "rsync://mx2"):
        with pytest.raises(ConfigError):
            parse_targets(bad)
    s = config.load(None, {"UPDATER_PUBLISH": "mx2:/v.cdb", "UPDATER_SSH_PORT": "2222",
                           "UPDATER_SSH_IDENTITY": "/k", "UPDATER_SSH_KNOWN_HOSTS": "/kh"})
    argv = rsync_argv(parse_targets(s.publish)[0], "/var/qmail/control/validrcptto.cdb", s)
    assert argv[0] == "rsync" and "--checksum" in argv and "--inplace" not in argv
    ssh = argv[argv.index("-e") + 1]
    assert "BatchMode=yes" in ssh and "StrictHostKeyChecking=yes" in ssh
    assert "-p 2222" in ssh and "-i /k" in ssh and "UserKnownHostsFile=/kh" in ssh
    assert argv[-2:] == ["/var/qmail/control/validrcptto.cdb", "mx2:/v.cdb"]


def test_malformed_target_is_a_usage_error(tree: Tree):
    setup_tree(tree)
    done = tree.run("build", UPDATER_PUBLISH="nowhere")
    assert done.returncode == 2 and "UPDATER_PUBLISH: 'nowhere' is neither" in done.stderr


# --------------------------------------------------------------------------- by hand

def test_build_and_publish_reach_both_receivers(tree: Tree, sshd: Sshd, rsyncd: Rsyncd):
    setup_tree(tree)
    env = publish_env(sshd, rsyncd)
    done = tree.run("build", **env)
    assert done.returncode == 0, done.stderr
    assert f"published to {sshd.target()}" in done.stderr
    assert f"published to {rsyncd.target()}" in done.stderr
    local = tree.cdb.read_bytes()
    for d in (sshd.target_dir, rsyncd.target_dir):
        got = d / "validrcptto.cdb"
        assert got.read_bytes() == local and cdbget(got, "u1@vpop.example")
        assert not [p for p in d.iterdir() if p.name != "validrcptto.cdb"]   # no temp left
    # unchanged: the receivers' files are not rewritten (checksum)
    inodes = [(d / "validrcptto.cdb").stat().st_ino for d in (sshd.target_dir,
                                                              rsyncd.target_dir)]
    done = tree.run("publish", **env)
    assert done.returncode == 0, done.stderr
    assert inodes == [(d / "validrcptto.cdb").stat().st_ino for d in (sshd.target_dir,
                                                                      rsyncd.target_dir)]


def test_publish_never_prompts_for_an_unknown_host(tree: Tree, sshd: Sshd, rsyncd: Rsyncd):
    setup_tree(tree)
    assert tree.run("build").returncode == 0
    sshd.known_hosts.write_text("")
    started = time.monotonic()
    done = subprocess.run([script("qmail-updater"), "publish"], stdin=subprocess.DEVNULL,
                          env=tree.env(**publish_env(sshd, rsyncd)), capture_output=True,
                          text=True, timeout=60)
    assert time.monotonic() - started < 15
    assert done.returncode == 1
    assert f"publish to {sshd.target()} failed: rsync exited" in done.stderr
    assert f"published to {rsyncd.target()}" in done.stderr


# --------------------------------------------------------------------------- the daemon

def test_daemon_under_supervise_publishes_each_install(tree: Tree, sshd: Sshd, rsyncd: Rsyncd,
                                                        tmp_path: Path):
    svscan, svok, svc = (need(t) for t in ("svscan", "svok", "svc"))
    d = setup_tree(tree)
    services = tmp_path / "services"
    svcdir = services / "qmail-updater"
    shutil.copytree(ROOT / "service/qmail-updater", svcdir)
    prom = tmp_path / "prom"
    prom.mkdir()
    for name, value in dict(QMAIL_DIR=tree.qmail, VPOPMAIL_DIR=tree.vpop,
                            UPDATER_PASSWD=tree.root / "etc/passwd", UPDATER_QUIET="0.3",
                            UPDATER_PROM_FILE=prom / "qmail_updater.prom",
                            PATH=f"{BIN}:/usr/bin:/bin", **publish_env(sshd, rsyncd)).items():
        (svcdir / "env" / name).write_text(f"{value}\n")
    scan = subprocess.Popen([svscan, str(services)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    receivers = [sshd.target_dir / "validrcptto.cdb", rsyncd.target_dir / "validrcptto.cdb"]
    try:
        wait_for(lambda: subprocess.run([svok, str(svcdir)]).returncode == 0, 15, "svok")
        wait_for(lambda: all(p.exists() for p in receivers), 30, "the first publish")
        with open(d / "vpasswd", "a") as f:
            f.write("newbie:x:1:0::/d/newbie:NOQUOTA\n")
        started = time.monotonic()
        wait_for(lambda: all(p.exists() and cdbget(p, "newbie@vpop.example")
                             for p in receivers), 0.3 + 2 + 5, "newbie on both receivers")
        assert time.monotonic() - started < 0.3 + 2 + 5
        status = tree.qmail / "control/validrcptto.status"
        wait_for(lambda: all(t["up_to_date"] for t in
                             json.loads(status.read_text()).get("publish", {}).values()), 10,
                 "the status")
        text = (prom / "qmail_updater.prom").read_text()
        assert f'qmail_updater_publish_up_to_date{{target="{rsyncd.target()}"}} 1.0' in text
    finally:
        scan.terminate()
        scan.wait()
        subprocess.run([svc, "-dx", str(svcdir), str(svcdir / "log")])


def test_a_dead_receiver_delays_nothing_and_catches_up(tree: Tree, sshd: Sshd, rsyncd: Rsyncd):
    d = setup_tree(tree)
    env = tree.env(UPDATER_QUIET="0.2", UPDATER_RETRY_MIN="1", UPDATER_RETRY_MAX="2",
                   UPDATER_MIN_INTERVAL="0", **publish_env(sshd, rsyncd))
    daemon = subprocess.Popen([script("qmail-updater"), "run"], env=env,
                              stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(daemon.stderr), daemon=True).start()
    ssh_file = sshd.target_dir / "validrcptto.cdb"
    rsync_file = rsyncd.target_dir / "validrcptto.cdb"
    status = tree.qmail / "control/validrcptto.status"
    try:
        wait_for(lambda: ssh_file.exists() and rsync_file.exists(), 30, "the first publish")
        rsyncd.stop()
        for name in ("late1", "late2"):
            with open(d / "vpasswd", "a") as f:
                f.write(f"{name}:x:1:0::/d/{name}:NOQUOTA\n")
            started = time.monotonic()
            wait_for(lambda: f"{name}@vpop.example" in keys_of(tree.cdb), 5, "the install")
            wait_for(lambda: cdbget(ssh_file, f"{name}@vpop.example"), 5, "the ssh receiver")
            assert time.monotonic() - started < 5
        def published() -> dict:
            return json.loads(status.read_text()).get("publish") or {}
        wait_for(lambda: published().get(rsyncd.target(), {}).get("last_error") and
                 published().get(sshd.target(), {}).get("up_to_date"), 15,
                 "the error and the other target's success in the status")
        st = published()
        assert st[rsyncd.target()]["up_to_date"] is False and st[sshd.target()]["up_to_date"]
        shown = subprocess.run([script("qmail-updater"), "status"], env=env,
                               capture_output=True, text=True).stdout
        assert f"publish:      {rsyncd.target()}: behind by" in shown
        rsyncd.start()
        wait_for(lambda: rsync_file.read_bytes() == tree.cdb.read_bytes(), 15,
                 "the newest list on the revived receiver")
        assert cdbget(rsync_file, "late2@vpop.example")
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(20) == 0


def complete_cdb(data: bytes) -> bool:
    """A whole cdb: its 256 hash tables end exactly at the end of the file."""
    if len(data) < 2048:
        return False
    end = 2048
    for i in range(256):
        pos, slots = struct.unpack_from("<LL", data, i * 8)
        if pos < 2048:
            return False
        end = max(end, pos + slots * 8)
    return end == len(data)


def test_a_reader_on_the_receiver_never_sees_a_partial_cdb(tree: Tree, rsyncd: Rsyncd):
    d = setup_tree(tree, users=200)
    env = dict(UPDATER_PUBLISH=rsyncd.target(), UPDATER_PUBLISH_TIMEOUT="5")
    received = rsyncd.target_dir / "validrcptto.cdb"
    versions: set[bytes] = set()
    seen: list[bytes] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                data = received.read_bytes()
            except FileNotFoundError:
                continue
            if not seen or seen[-1] != data:
                seen.append(data)
    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(50):
            with open(d / "vpasswd", "a") as f:        # grows: never refused by the gate
                f.write("".join(f"r{i}x{j}:x:1:0::/d/r:NOQUOTA\n" for j in range(1 + i % 7)))
            done = tree.run("build", **env)
            assert done.returncode == 0, done.stderr
            versions.add(tree.cdb.read_bytes())
    finally:
        stop.set()
        t.join()
    assert len(seen) >= 40                    # the reader saw the file change many times
    assert all(complete_cdb(v) and v in versions for v in seen)
