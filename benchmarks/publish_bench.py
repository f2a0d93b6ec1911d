"""Install -> visible on a receiver (rsync to an rsync daemon on this host)."""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess

from run import Bench, QU, _listening, child, fmt_n, fmt_s, median, wait

import trees


def run(bench: Bench) -> None:
    publish(bench)


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
