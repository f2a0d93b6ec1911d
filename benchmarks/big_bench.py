"""Ten million addresses (``--big``: 1,000 domains x 10,000; not in the default run, it
takes about ten minutes and 2 GB): the cold build against awk + cdbmake, a new mailbox
through the daemon until the live cdb answers (with where the time went), what one push
of that change sends (rsync's own --stats, its delta algorithm as over ssh), and the
daemon's memory."""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import time

import trees
from incremental_bench import MB, _append, _request, _vm_hwm_kb
from run import QU, fmt_n, fmt_s, has_key, read_json, wait

BIG = 10_000_000


def run(bench) -> None:
    env = dict(bench.tree(BIG))
    cold = bench.full_build(env).seconds
    ref = bench.reference_build(env)
    bench.row(what=f"full rebuild, {fmt_n(BIG)} addresses (cold `build`)", ours=fmt_s(cold),
              reference=fmt_s(ref), ratio=cold / ref, target="<= 0.6x", met=cold / ref <= 0.6)
    root = os.path.dirname(env["VALIDRCPTTO_CDB"])
    fifo, status = os.path.join(root, "big.trigger"), os.path.join(root, "big.status.json")
    env.update(UPDATER_FIFO=fifo, UPDATER_STATUS=status)
    cdb = env["VALIDRCPTTO_CDB"]
    log = open(os.path.join(root, "big-daemon.log"), "wb")
    daemon = subprocess.Popen(QU + ["run"], env=env, stderr=log, stdout=log)
    try:
        wait(lambda: (read_json(status) or {}).get("builds", 0) >= 1, 900, "first build")
        doms = trees.domain_dirs(env)
        times, phases = [], []
        before_push = os.path.join(root, "before-push.cdb")
        for i in range(3):
            if i == 2:
                shutil.copyfile(cdb, before_push)    # what another MX holds before it
            domain, ddir = doms[(i * 41) % len(doms)]
            name = f"bigmbox{i}"
            builds = read_json(status)["builds"]
            _append(os.path.join(ddir, "vpasswd"), name)
            started = time.perf_counter()
            _request(fifo, f"add_user {name}@{domain}")
            wait(lambda: has_key(cdb, f"{name}@{domain}".encode()), 120, "the new mailbox")
            times.append(time.perf_counter() - started)
            wait(lambda: read_json(status)["builds"] > builds, 30, "the status")
            st = read_json(status)
            if st.get("incremental"):
                phases.append(st.get("phases") or {})
            time.sleep(3)
        hwm = _vm_hwm_kb(daemon.pid)
        steady = _vm_rss_kb(daemon.pid)
    finally:
        daemon.terminate()
        daemon.wait(120)
        log.close()
    lat = statistics.median(times)
    bench.row(what=f"new mailbox -> live (add_user, incremental), {fmt_n(BIG)}",
              ours=fmt_s(lat), reference=fmt_s(cold), ratio=lat / cold, target="<= 1.0 s",
              met=lat <= 1.0)
    for step in ("check", "read", "merge", "cdb", "install"):
        values = [p.get(step, 0.0) for p in phases]
        if values:
            bench.row(what=f"  of which {step}", ours=fmt_s(statistics.median(values)))
    sent, literal = _rsync_stats(cdb, before_push)
    size = os.path.getsize(cdb)
    bench.row(what=f"  bytes one push sends for it (rsync --stats), {fmt_n(BIG)}",
              ours=f"{sent:,}", reference=f"{size:,}", ratio=sent / size, target="<= 5 MB",
              met=sent <= 5_000_000)
    bench.row(what="    of which literal data (not matched by rsync's blocks)",
              ours=f"{literal:,}", reference=f"{size:,}", ratio=literal / size)
    bench.row(what=f"peak RSS of the daemon, {fmt_n(BIG)} (full + incremental builds)",
              ours=f"{hwm // MB} MB", target="<= 1 GB", met=hwm <= 1024 * MB)
    bench.row(what=f"  RSS between builds, {fmt_n(BIG)}", ours=f"{steady // MB} MB",
              target="", met=None)


def _vm_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _rsync_stats(new: str, old: str) -> tuple[int, int]:
    """(bytes sent, literal data) bringing ``old`` up to ``new`` with rsync's delta
    transfer (--no-whole-file: what it does between hosts)."""
    out = subprocess.run(["rsync", "--stats", "--no-whole-file", new, old],
                         capture_output=True, text=True, check=True).stdout

    def number(what: str) -> int:
        m = re.search(what + r": ([\d,.]+)", out)
        return int(m.group(1).replace(",", "").replace(".", "")) if m else -1
    return number("Total bytes sent"), number("Literal data")
