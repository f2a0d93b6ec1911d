"""Install -> visible on a receiver (rsync to an rsync daemon on this host)."""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import time

import trees
from run import QU, Bench, _listening, child, fmt_n, fmt_s, has_key, median, wait


def run(bench: Bench) -> None:
    publish(bench)
    publish_ssh(bench)


# ---- 4b. publishing to another MX
def publish(bench: Bench) -> None:
    """Install -> visible on a receiver: `qmail-updater publish` of a cdb that changed
    by one key to a local `rsync --daemon` (what the daemon runs after each install),
    against `cp` of the same file (the floor: one local copy)."""
    rsync = shutil.which("rsync")
    n = bench.sizes[-1]
    if rsync is None:
        bench.row(
            what=f"publish to a receiver, {fmt_n(n)} keys (median)",
            ours="n/a",
            reference="n/a",
            ratio=None,
            target="",
            met=None,
        )
        return
    env = bench.tree(n)
    child(QU + ["build"], env)
    recv = os.path.join(bench.root, "receiver")
    os.makedirs(recv)
    conf = os.path.join(bench.root, "rsyncd.conf")
    with open(conf, "w") as f:
        f.write(
            f"use chroot = false\n[mx]\npath = {recv}\nread only = false\n"
            f"uid = {os.getuid()}\ngid = {os.getgid()}\n"
        )

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    daemon = subprocess.Popen(
        [
            rsync,
            "--daemon",
            "--no-detach",
            "--address=127.0.0.1",
            f"--port={port}",
            f"--config={conf}",
        ]
    )
    try:
        wait(lambda: _listening(port), 10, "rsync --daemon")
        target = os.path.join(recv, "validrcptto.cdb")
        penv = {**env, "UPDATER_PUBLISH": f"rsync://127.0.0.1:{port}/mx/validrcptto.cdb"}
        child(QU + ["publish"], penv)
        vpasswd = os.path.join(
            env["VPOPMAIL_DIR"], "domains", trees.domain_dirs(env)[0][0], "vpasswd"
        )
        original = open(vpasswd, "rb").read()
        times = []
        for i in range(bench.runs_for(n)):
            with open(vpasswd, "ab") as f:
                f.write(b"pub%d:x:1:0::/d/p:NOQUOTA\n" % i)
            child(QU + ["build"], env)  # the install
            times.append(child(QU + ["publish"], penv).seconds)
            assert open(target, "rb").read() == open(env["VALIDRCPTTO_CDB"], "rb").read()
        with open(vpasswd, "wb") as f:
            f.write(original)
        ours = statistics.median(times)
        ref = median(
            lambda: child(["cp", env["VALIDRCPTTO_CDB"], target + ".cp"], env).seconds,
            bench.runs_for(n),
        )
    finally:
        daemon.terminate()
        daemon.wait()
    bench.row(
        what=f"install -> visible on a receiver (rsync), {fmt_n(n)} keys (median)",
        ours=fmt_s(ours),
        reference=fmt_s(ref),
        ratio=ours / ref,
        target="",
        met=None,
    )


# ---- 4c. over ssh, from the daemon: what a change costs a second MX
def _sshd(root: str) -> tuple[subprocess.Popen | None, dict[str, str], str]:
    """sshd on 127.0.0.1 with a key of its own and one for us (root only: sshd must be)."""
    sshd, keygen = shutil.which("sshd") or "/usr/sbin/sshd", shutil.which("ssh-keygen")
    if os.geteuid() != 0 or not os.path.exists(sshd) or not keygen or not shutil.which("ssh"):
        return None, {}, ""
    d = os.path.join(root, "sshd")
    os.makedirs(os.path.join(d, "mx"))
    for name in ("host_key", "client_key"):
        subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(d, name)],
                       check=True)
    shutil.copy(os.path.join(d, "client_key.pub"), os.path.join(d, "authorized_keys"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    host = open(os.path.join(d, "host_key.pub")).read().split()
    with open(os.path.join(d, "known_hosts"), "w") as f:
        f.write(f"[127.0.0.1]:{port} {host[0]} {host[1]}\n")
    with open(os.path.join(d, "sshd_config"), "w") as f:
        f.write(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\n"
                f"AuthorizedKeysFile {d}/authorized_keys\nPidFile none\nUsePAM no\n"
                "StrictModes no\nPermitRootLogin prohibit-password\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\nLogLevel ERROR\n")
    os.makedirs("/run/sshd", exist_ok=True)
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", os.path.join(d, "sshd_config")],
                            stderr=subprocess.DEVNULL)
    wait(lambda: _listening(port), 10, "sshd")
    env = {"UPDATER_SSH_PORT": str(port), "UPDATER_SSH_IDENTITY": os.path.join(d, "client_key"),
           "UPDATER_SSH_KNOWN_HOSTS": os.path.join(d, "known_hosts")}
    return proc, env, os.path.join(d, "mx", "validrcptto.cdb")


def _bytes_sent(env: dict[str, str], cdb: str) -> tuple[int, int]:
    """(bytes rsync sent, literal data among them) pushing ``cdb`` the daemon's way, from
    rsync's own --stats."""
    import re

    from updater.config import load
    from updater.publish import rsync_argv
    from updater.targets import parse_targets
    settings = load(environ=env)
    argv = rsync_argv(parse_targets(settings.publish)[0], cdb, settings)
    argv.insert(1, "--stats")
    out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout
    sent = re.search(r"Total bytes sent: ([\d,.]+)", out)
    literal = re.search(r"Literal data: ([\d,.]+)", out)

    def number(m: re.Match[str] | None) -> int:
        return int(m.group(1).replace(",", "").replace(".", "")) if m else -1
    return number(sent), number(literal)


def publish_ssh(bench: Bench) -> None:
    """A new mailbox (its vpasswd line, then ``add_user`` on the FIFO) until the second MX
    -- a real sshd on this host, reached by rsync over ssh as the daemon publishes --
    holds a cdb with it; and what one such push sends."""
    n = bench.sizes[-1]
    proc, ssh_env, received = _sshd(bench.root)
    if proc is None:
        bench.row(what=f"new mailbox -> live on a second MX over ssh, {fmt_n(n)}", ours="n/a")
        return
    from incremental_bench import _append, _request
    env = dict(bench.tree(n))
    root = os.path.dirname(env["VALIDRCPTTO_CDB"])
    env.update(ssh_env, UPDATER_PUBLISH=f"root@127.0.0.1:{received}",
               UPDATER_FIFO=os.path.join(root, "ssh.trigger"),
               UPDATER_STATUS=os.path.join(root, "ssh.status.json"))
    cdb = env["VALIDRCPTTO_CDB"]
    doms = trees.domain_dirs(env)
    log = open(os.path.join(root, "ssh-daemon.log"), "wb")
    daemon = subprocess.Popen(QU + ["run"], env=env, stderr=log, stdout=log)
    try:
        wait(lambda: os.path.exists(received), 600, "the first push")
        times = []
        for i in range(bench.runs_for(n)):
            domain, ddir = doms[(i * 53) % len(doms)]
            name = f"sshmbox{i}"
            _append(os.path.join(ddir, "vpasswd"), name)
            started = time.perf_counter()
            _request(env["UPDATER_FIFO"], f"add_user {name}@{domain}")
            wait(lambda: has_key(received, f"{name}@{domain}".encode()), 60, "the second MX")
            times.append(time.perf_counter() - started)
            time.sleep(2.5)
        # one more address through the daemon (an incremental install), then that file
        # pushed with rsync's statistics to a copy of what the second MX held before
        before = received + ".before"
        shutil.copyfile(received, before)
        domain, ddir = doms[1 % len(doms)]
        _append(os.path.join(ddir, "vpasswd"), "sshstats")
        _request(env["UPDATER_FIFO"], f"add_user sshstats@{domain}")
        wait(lambda: has_key(received, f"sshstats@{domain}".encode()), 60, "the second MX")
    finally:
        daemon.terminate()
        daemon.wait(60)
        log.close()
    try:
        lat = statistics.median(times)
        bench.row(what=f"new mailbox -> live on a second MX over ssh, {fmt_n(n)}",
                  ours=fmt_s(lat), target="<= 1.5 s; <= 300 ms", met=lat <= 1.5)
        sent, literal = _bytes_sent({**env, "UPDATER_PUBLISH": f"root@127.0.0.1:{before}"},
                                    cdb)
        size = os.path.getsize(cdb)
        goal = 0.01 * size
        bench.row(what=f"  bytes sent for a one-address change (rsync --stats), {fmt_n(n)}",
                  ours=f"{sent:,}", reference=f"{size:,}", ratio=sent / size,
                  target="<= 1 % of the file", met=sent <= goal)
        bench.row(what="    of which literal data (not matched by rsync's blocks)",
                  ours=f"{literal:,}", reference=f"{size:,}", ratio=literal / size,
                  target="", met=None)
    finally:
        proc.terminate()
        proc.wait(10)
