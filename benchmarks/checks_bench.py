"""RCPT checks in a fresh process at 1k vs the largest list, and the per-connection
work against reading a text list."""

from __future__ import annotations

import os
import sys
import time

import trees
from run import QU, SMTPD, Bench, child, clean_env, fmt_n, fmt_s, median


def run(bench: Bench) -> None:
    checks(bench)


# ---- 3. RCPT checks
def checks(bench: Bench) -> None:
    small = bench.tree(1000, min(bench.domains, 10))
    big = bench.tree(bench.sizes[-1])
    for env in (small, big):
        if not os.path.exists(env["VALIDRCPTTO_CDB"]):
            child(QU + ["build"], env)
    n = bench.sizes[-1]

    def smtp_script(env: dict[str, str]) -> bytes:
        user = f"user000000@{trees.domain_dirs(env)[0][0]}"
        return (
            f"HELO bench.example\r\nMAIL FROM:<a@bench.example>\r\nRCPT TO:<{user}>\r\n"
            f"RCPT TO:<nobody@{trees.domain_dirs(env)[0][0]}>\r\nQUIT\r\n"
        ).encode()

    def smtpd(env: dict[str, str]) -> float:
        run = child(SMTPD, {**env, "TCPREMOTEIP": "127.0.0.1"}, smtp_script(env))
        replies = run.out.split(b"\r\n")
        assert sum(r.startswith(b"250 ") for r in replies) == 3, run.out  # HELO MAIL RCPT
        assert sum(r.startswith(b"553 ") for r in replies) == 1, run.out  # the unknown one
        return run.seconds

    def check(env: dict[str, str]) -> float:
        user = f"user000000@{trees.domain_dirs(env)[0][0]}"
        return child(QU + ["check", user], env).seconds

    for what, fn in (("validrcptto-smtpd session", smtpd), ("`qmail-updater check`", check)):
        a, b = median(lambda: fn(small), bench.runs * 2), median(lambda: fn(big), bench.runs * 2)
        bench.row(
            what=f"{what}, fresh process, {fmt_n(n)} vs 1k entries",
            ours=fmt_s(b),
            reference=fmt_s(a),
            ratio=b / a,
            target="<= 1.2x",
            met=b / a <= 1.2,
        )

    # the work after start-up: open the cdb + look up, vs read + hash a text list
    from updater.checker import check as verdict
    from updater.checker import open_cdb

    lines = 100000
    text = os.path.join(bench.root, "validrcptto.txt")
    with open(text, "w") as f:
        f.write("".join(f"user{i:07d}@dom{i % 1000:04d}.example\n" for i in range(lines)))
    probes = [b"user0000001@dom0001.example", b"nobody@dom0001.example"]

    def cdb_way() -> float:
        started = time.perf_counter()
        db = open_cdb(big["VALIDRCPTTO_CDB"])
        for p in probes:
            verdict(db, p)
        db.close()
        return time.perf_counter() - started

    def text_way() -> float:
        started = time.perf_counter()
        with open(text, "rb") as f:
            valid = {line.strip().lower() for line in f}
        for p in probes:
            _ = p.lower() in valid
        return time.perf_counter() - started

    c, r = median(cdb_way, 51), median(text_way, 11)
    bench.row(
        what=f"per-connection work: cdb ({fmt_n(n)}) vs text list ({fmt_n(lines)})",
        ours=fmt_s(c),
        reference=fmt_s(r),
        ratio=r / c,
        target=">= 100x cheaper",
        met=r / c >= 100,
    )

    # start-up alone
    s = median(
        lambda: child(SMTPD, {**small, "TCPREMOTEIP": "127.0.0.1"}, b"QUIT\r\n").seconds,
        bench.runs * 2,
    )
    p = median(
        lambda: child([sys.executable, "-c", "pass"], clean_env()).seconds, bench.runs * 2
    )
    bench.row(
        what="validrcptto-smtpd start-up vs `python -c pass`",
        ours=fmt_s(s),
        reference=fmt_s(p),
        ratio=s / p,
        target="< 2x",
        met=s / p < 2,
    )
