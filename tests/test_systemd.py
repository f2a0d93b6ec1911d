"""The shipped systemd units (service/systemd/): `systemd-analyze verify` accepts each,
and each ExecStart line, with its Environment= lines and an EnvironmentFile as systemd
reads them, starts a working service (the daemon builds, the SMTP server greets and
refuses, the policy service answers), and stops on SIGTERM with status 0."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from helpers.net import free_port
from helpers.smtp_client import T1, make_cdb
from helpers.tools import BIN, need
from helpers.tree import setup_tree
from helpers.wait import wait_for

UNITS = Path(__file__).resolve().parent.parent / "service/systemd"
NAMES = ("qmail-updater", "validrcptto-smtpd", "validrcptto-policyd")


def unit_text(name: str) -> str:
    """The unit, its programs taken from this installation instead of /opt/qmail-updater."""
    return (UNITS / f"{name}.service").read_text().replace("/opt/qmail-updater/bin", str(BIN))


@pytest.mark.parametrize("name", NAMES)
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path, name: str):
    analyze = need("systemd-analyze")
    unit = tmp_path / f"{name}.service"
    unit.write_text(unit_text(name))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    text = unit_text(name)
    assert "Restart=always" in text and f"EnvironmentFile=-/etc/qmail-updater/{name}.env" in text
    broken = tmp_path / f"broken-{name}.service"             # and it can say no
    broken.write_text(unit_text(name).replace("ExecStart=/", "ExecStart=relative/"))
    assert subprocess.run([analyze, "verify", str(broken)], capture_output=True,
                          timeout=60).returncode != 0


# what each unit's sandbox scores (systemd-analyze security: 0 safe .. 10 unsafe); the
# shipped units scored 9.6 UNSAFE before they had one
EXPOSURE = {"qmail-updater": 3.0, "validrcptto-smtpd": 3.0, "validrcptto-policyd": 3.0}


@pytest.mark.parametrize("name", NAMES)
def test_each_unit_runs_in_the_sandbox_its_work_allows(tmp_path: Path, name: str):
    analyze = need("systemd-analyze")
    unit = tmp_path / f"{name}.service"
    unit.write_text(unit_text(name))
    done = subprocess.run([analyze, "security", "--offline=yes", str(unit)],
                          capture_output=True, text=True, timeout=60)
    level = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", done.stdout).group(1))
    assert level <= EXPOSURE[name], done.stdout
    text = unit_text(name)
    assert "ProtectSystem=strict" in text and "PrivateTmp=yes" in text
    assert "CapabilityBoundingSet=" in text and "SystemCallFilter=@system-service" in text
    # the set-uid qmail-queue needs new privileges; the other two never gain any
    assert ("NoNewPrivileges=yes" in text) == (name != "validrcptto-smtpd")
    bare = tmp_path / f"bare-{name}.service"          # and the score can say no
    bare.write_text("\n".join(line for line in text.splitlines()
                               if not line.startswith(("Protect", "Private", "Restrict",
                                                       "SystemCall", "Capability",
                                                       "NoNewPrivileges", "ReadWrite"))))
    done = subprocess.run([analyze, "security", "--offline=yes", str(bare)],
                          capture_output=True, text=True, timeout=60)
    assert float(re.search(r"exposure level for \S+: ([\d.]+)", done.stdout).group(1)) > 9


def service_command(name: str, env_file: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """ExecStart as systemd runs it: Environment= lines, then the EnvironmentFile (which
    wins), ${VAR} replaced inside words."""
    env: dict[str, str] = {"PATH": os.environ["PATH"]}
    exec_start = ""
    for line in unit_text(name).splitlines():
        key, _, value = line.partition("=")
        if key == "Environment":
            env.update(word.split("=", 1) for word in shlex.split(value))
        elif key == "ExecStart":
            exec_start = value
    env.update(env_file)
    argv = [re.sub(r"\$\{(\w+)\}", lambda m: env.get(m.group(1), ""), word)
            for word in shlex.split(exec_start)]
    return argv, env


def run(argv: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, list[str]]:
    import threading
    lines: list[str] = []
    proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
    threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True).start()
    return proc, lines


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(60)


def test_the_daemon_units_execstart_builds(tree):
    setup_tree(tree)
    argv, env = service_command("qmail-updater", tree.env())
    assert argv == [str(BIN / "qmail-updater"), "run"]
    proc, lines = run(argv, env)
    try:
        wait_for(lambda: any("build (start): installed" in x for x in lines), 30, "a build")
    finally:
        assert stop(proc) == 0


def test_the_smtpd_units_execstart_serves(tmp_path: Path):
    from helpers.smtp_client import greeted, smtp_tree
    base = smtp_tree(tmp_path)
    port = free_port()
    argv, env = service_command("validrcptto-smtpd", {
        "QMAIL_DIR": base["QMAIL_DIR"], "VALIDRCPTTO_CDB": base["VALIDRCPTTO_CDB"],
        "IP": "127.0.0.1", "PORT": str(port), "SMTPD_USER": "", "TCPRULES": "",
        "WORKERS": "1"})
    assert argv == [str(BIN / "validrcptto-smtpd"), "--listen", f"127.0.0.1:{port}"]
    proc, lines = run(argv, env)
    try:
        c = greeted(port, wait=15)
        assert c.banner.startswith(b"220 ")
        c.cmd("HELO x")
        c.cmd("MAIL FROM:<a@b.example>")
        assert c.cmd("RCPT TO:<nobody@example.com>").startswith(b"553 ")
        assert c.cmd("RCPT TO:<joe@example.com>").startswith(b"250 ")
        c.close()
    finally:
        assert stop(proc) == 0


def test_the_policyd_units_execstart_answers(tmp_path: Path):
    control = tmp_path / "qmail/control"
    control.mkdir(parents=True)
    (control / "rcpthosts").write_text("example.com\n")
    make_cdb(control / "validrcptto.cdb", T1)
    port = free_port()
    argv, env = service_command("validrcptto-policyd", {
        "LISTEN": f"127.0.0.1:{port}", "QMAIL_DIR": str(tmp_path / "qmail"),
        "POLICYD_USER": ""})
    assert argv == [str(BIN / "validrcptto-policyd")]
    proc, lines = run(argv, env)
    try:
        wait_for(lambda: any("listening on" in x for x in lines), 15, "listening")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"request=smtpd_access_policy\nprotocol_state=RCPT\n"
                      b"recipient=nobody@example.com\n\n")
            assert s.recv(200).startswith(b"action=REJECT")
    finally:
        assert stop(proc) == 0
