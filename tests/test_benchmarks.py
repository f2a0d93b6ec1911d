"""The benchmark script runs end to end (small trees) and measures what it claims.

Timings are not asserted here (they belong to benchmarks/RESULTS.md); what is asserted
does not depend on the machine's speed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.tools import CI, need

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_prints_every_row_and_writes_results(tmp_path: Path):
    # every row needs its tools: the directory rows start MariaDB and slapd, the
    # second-MX rows an sshd (as root) and rsync
    for tool in ("cdbmake", "mariadbd", "mariadb-install-db", "mariadb", "slapd", "slapadd",
                 "ldapadd", "ldapsearch", "sshd", "ssh", "ssh-keygen", "rsync"):
        need(tool)
    if os.geteuid() != 0:
        if CI:
            pytest.fail("the benchmark's ssh rows start sshd: run the tests as root under CI")
        pytest.skip("the benchmark's ssh rows start sshd, which needs root: run as root")
    out = tmp_path / "RESULTS.md"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("UPDATER_", "VALIDRCPTTO_"))}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks/run.py"), "--quick",
                           "--out", str(out)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr       # (it fails if our cdb and cdbmake's differ)
    rows = [line.split() for line in done.stdout.splitlines()[1:]]
    assert len(rows) == 42, done.stdout
    table = out.read_text()
    assert table.startswith("# Benchmark results\n") and "| measurement | ours |" in table
    for what in ("full rebuild, 10k", "cdb write alone", "validrcptto-smtpd session",
                 "`qmail-updater check`", "per-connection work", "validrcptto-smtpd start-up",
                 "trigger -> live", "1,000 triggers in 1 s", "peak RSS, full build",
                 "install -> visible on a receiver", "one address installed with 8%",
                 "new mailbox -> live (add_user, incremental)", "  of which cdb",
                 "  with vpopmail 5.6's line", "live cdb deleted by hand -> back",
                 "1,000 add_user in 10 s: builds", "peak RSS of the daemon",
                 "new mailbox -> live while another domain is held",
                 "new mailbox -> live, vpopmail on MariaDB", "LDAP poll after one new entry",
                 "new LDAP entry -> live (polling every 1 s)",
                 "new mailbox -> live on a second MX over ssh",
                 "  bytes sent for a one-address change (rsync --stats)"):
        assert f"| {what}" in table, what
    # a no-change rebuild writes nothing; a full one writes the whole file
    line = next(l for l in table.splitlines() if "no-change rebuild, 10k: bytes" in l)
    cells = [c.strip() for c in line.split("|")]
    assert cells[2] == "0" and int(cells[3]) > 10000 * 30 and cells[6] == "yes"
    # a burst of a thousand triggers is debounced into one or two builds
    line = next(l for l in table.splitlines() if "1,000 triggers" in l)
    assert line.split("|")[2].strip() in ("1", "2")
