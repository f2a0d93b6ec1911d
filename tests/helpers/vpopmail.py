"""The real vpopmail (5.4.33 and 5.6.13), built from ../shared/reference with its own
script, changing a real vpopmail tree and calling our shipped onchange hook."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .tools import CI, ROOT, script

REFERENCE = ROOT.parent / "shared" / "reference"
VERSIONS = {"5.4.33": "vpopmail-5.4.33.tar.gz", "5.6.13": "vpopmail-5.6.13-17.tar.gz"}
# vpopmail compiles its home directory in: one fixed place per version, reused by every
# test (build-vpopmail skips a build whose stamp matches, and points the vpopmail
# account's home at the tree it is asked for)
BUILDS = Path(os.environ.get("VPOPMAIL_BUILDS", "/var/tmp/qmail-updater-vpopmail"))


def unavailable(why: str) -> None:
    if CI:
        pytest.fail(f"{why} (required under CI=true)")
    pytest.skip(f"{why}: the real vpopmail is built from ../shared/reference/build-vpopmail "
                "(netqmail-1.06 and the vpopmail tarballs beside it; as root, with gcc and "
                "make); set VPOPMAIL_BUILDS to choose where")


class Vpopmail:
    """A clean vpopmail tree of one version: ``qmail`` (control/, users/), ``vpop``
    (~vpopmail: bin/, domains/), our hook as etc/onchange, a passwd of its own."""

    def __init__(self, version: str):
        if os.geteuid() != 0:
            unavailable("building vpopmail needs root")
        build = REFERENCE / "build-vpopmail"
        tarball = REFERENCE / VERSIONS[version]
        if not build.exists() or not tarball.exists():
            unavailable(f"{build} or {tarball} is missing")
        if not shutil.which("gcc") or not shutil.which("make"):
            unavailable("gcc and make are needed to build vpopmail")
        self.version = version
        self.root = BUILDS / version
        done = subprocess.run([str(build), str(tarball), str(self.root)], capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        self.qmail = self.root / "qmail"
        self.vpop = self.root / "home"
        self.reset()

    def reset(self) -> None:
        """No domains, no users: the tree as build-vpopmail left it."""
        shutil.rmtree(self.vpop / "domains", ignore_errors=True)
        (self.vpop / "domains").mkdir()
        shutil.chown(self.vpop / "domains", "vpopmail", "vchkpw")
        for d in ("control", "users"):
            shutil.rmtree(self.qmail / d, ignore_errors=True)
            (self.qmail / d).mkdir()
        (self.qmail / "control/me").write_text("mx.example\n")
        (self.qmail / "alias").mkdir(exist_ok=True)
        self.passwd = self.root / "passwd"
        self.passwd.write_text(f"root:x:0:0:root:/root:/bin/sh\n"
                               f"alias:x:201:200::{self.qmail}/alias:/bin/false\n")
        hook = self.vpop / "etc/onchange"
        shutil.copy(ROOT / "service/onchange", hook)
        hook.chmod(0o755)
        self.reset_cdb()

    def reset_cdb(self) -> None:
        for stale in self.qmail.glob("control/validrcptto*"):
            stale.unlink()

    @property
    def cdb(self) -> Path:
        return self.qmail / "control/validrcptto.cdb"

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("UPDATER_", "VALIDRCPTTO_", "QMAIL_", "VPOPMAIL_"))}
        env.update(QMAIL_DIR=str(self.qmail), VPOPMAIL_DIR=str(self.vpop),
                   UPDATER_PASSWD=str(self.passwd))
        env.update(extra)
        return env

    def tool(self, name: str, *args: str, daemon: bool = True) -> subprocess.CompletedProcess:
        """One of vpopmail's own programs (it runs our hook, which writes the FIFO of the
        ``daemon`` running)."""
        done = subprocess.run([str(self.vpop / "bin" / name), *args], env=self.env(),
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{name} {args}: {done.stdout}{done.stderr}"
        if daemon:
            assert "onchange:" not in done.stderr, done.stderr    # the hook reached it
        return done

    def domain_dir(self, domain: str) -> Path:
        return self.vpop / "domains" / domain

    def build(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([script("qmail-updater"), "build", *args], env=self.env(),
                              capture_output=True, text=True, timeout=120)

    def accepts(self, *addresses: str) -> bool:
        """Whether the live cdb takes mail for every address (``qmail-updater check``)."""
        done = subprocess.run([script("qmail-updater"), "check", "--cdb", str(self.cdb),
                               *addresses], env=self.env(), capture_output=True, text=True,
                              timeout=60)
        return done.returncode == 0

    def refuses(self, *addresses: str) -> bool:
        return all(not self.accepts(a) for a in addresses)
