"""The daemon: trigger -> live with a full build, the `trigger` command, and a burst
of 1,000 triggers."""

from __future__ import annotations

import os
import statistics
import subprocess
import time

import trees
from run import QU, Bench, child, fmt_n, fmt_s, has_key, median, read_json, wait


def run(bench: Bench) -> None:
    daemon(bench)


# ---- 5. the daemon
def daemon(bench: Bench) -> None:
    n = bench.sizes[1] if len(bench.sizes) > 1 else bench.sizes[0]
    env = bench.tree(n)
    fifo = os.path.join(bench.root, "trigger")
    status = os.path.join(bench.root, "status.json")
    env = {
        **env,
        "UPDATER_FIFO": fifo,
        "UPDATER_STATUS": status,
        "UPDATER_QUIET": str(bench.quiet),
        "UPDATER_MAX_DELAY": "30",
        "UPDATER_MIN_INTERVAL": "0",
    }  # the debounce alone, no FIFO floor
    log = open(os.path.join(bench.root, "daemon.log"), "wb")
    daemon = subprocess.Popen(QU + ["run"], env=env, stderr=log, stdout=log)
    try:
        wait(lambda: (read_json(status) or {}).get("builds", 0) >= 1, 120, "first build")
        domain, ddir = trees.domain_dirs(env)[0]
        latencies, overheads, builds_s = [], [], []
        for i in range(bench.runs):
            key = f"latency{i}@{domain}".encode()
            before = read_json(status)["builds"]
            with open(os.path.join(ddir, "vpasswd"), "ab") as f:
                f.write(b"latency%d:x:1:0::/d:NOQUOTA\n" % i)
            started = time.perf_counter()
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # what onchange does
            os.write(fd, b"add_user latency\n")
            os.close(fd)
            wait(lambda: has_key(env["VALIDRCPTTO_CDB"], key), 60, "the new key")
            latency = time.perf_counter() - started
            wait(lambda: read_json(status)["builds"] > before, 10, "the status")
            build = read_json(status)["seconds"]
            latencies.append(latency)
            builds_s.append(build)
            overheads.append(latency - bench.quiet - build)
            time.sleep(bench.quiet + 0.5)
        lat, over = statistics.median(latencies), statistics.median(overheads)
        bench.row(
            what=f"trigger -> live, {fmt_n(n)} (ref: quiet {bench.quiet:g} s + build)",
            ours=fmt_s(lat),
            reference=fmt_s(bench.quiet + statistics.median(builds_s)),
            ratio=None,
            target="",
            met=None,
        )
        bench.row(
            what="  of which beyond quiet period + build time",
            ours=fmt_s(over),
            reference="",
            ratio=None,
            target="<= 100 ms",
            met=over <= 0.1,
        )
        trig = median(lambda: child(QU + ["trigger", "bench"], env).seconds, bench.runs)
        bench.row(
            what="`qmail-updater trigger` command (whole process)",
            ours=fmt_s(trig),
            reference="",
            ratio=None,
            target="",
            met=None,
        )
        # a burst: 1,000 triggers within one second
        time.sleep(bench.quiet + 0.5)
        before = read_json(status)["builds"]
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        started = time.perf_counter()
        for i in range(1000):
            os.write(fd, b"burst %d\n" % i)
            time.sleep(max(0.0, started + (i + 1) / 1000 - time.perf_counter()))
        os.close(fd)
        time.sleep(bench.quiet + 3 * read_json(status)["seconds"] + 1.0)
        builds = read_json(status)["builds"] - before
        bench.row(
            what="1,000 triggers in 1 s: builds",
            ours=str(builds),
            reference="",
            ratio=None,
            target="1 (<= 2)",
            met=1 <= builds <= 2,
        )
    finally:
        daemon.terminate()
        daemon.wait(30)
        log.close()
