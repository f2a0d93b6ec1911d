"""A qmail installation in a temp dir: control files, accounts, vpopmail domains."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .tools import script


def low(text: str) -> str:
    """qmail's case_lowers: A-Z only."""
    return text.translate({c: c + 32 for c in range(65, 91)})


def newu(qmail: Path) -> None:
    """users/assign -> users/cdb, as qmail-newu writes it (qmail has no Debian package)."""
    import cdbx
    wild = ""
    maker = cdbx.CDB.make(str(qmail / "users/cdb"))
    seen = set()
    for line in (qmail / "users/assign").read_text().splitlines():
        if line.startswith("."):
            break
        i = line.index(":")
        if line[0] == "+":
            key = "!" + low(line[1:i])
            if i >= 2 and line[i - 1] not in wild:
                wild += line[i - 1]
        else:
            key = "!" + low(line[1:i]) + "\0"
        data = line[i + 1:].split(":")[:6]
        if key not in seen:                 # cdb: the first of equal keys is found
            seen.add(key)
            maker.add(key.encode(), "\0".join(data).encode())
    maker.add(b"", wild.encode())
    maker.commit().close()


def own(path: Path, uid: int, gid: int) -> None:
    """chown when we can (as root, which CI is); qmail-getpw only delivers to an
    account that owns its home directory."""
    if os.geteuid() == 0:
        os.chown(path, uid, gid)


class Tree:
    """A qmail installation in a temp dir: control files, accounts, vpopmail domains."""

    def __init__(self, root: Path):
        self.root = root
        self.qmail = root / "var/qmail"
        self.vpop = root / "home/vpopmail"
        self.passwd_lines = ["root:x:0:0:root:/root:/bin/sh",
                             f"alias:x:201:200::{self.qmail}/alias:/bin/false"]
        (self.qmail / "control").mkdir(parents=True)
        (self.qmail / "users").mkdir()
        (self.qmail / "alias").mkdir()
        own(self.qmail / "alias", 201, 200)         # as qmail's install leaves it
        self.assign_lines: list[str] = []
        self._flush_passwd()

    # ---- writing
    def write(self, rel: str, content: str | bytes, mode: int | None = None) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        if mode is not None:
            path.chmod(mode)
        return path

    def control(self, name: str, content: str) -> Path:
        return self.write(f"var/qmail/control/{name}", content)

    def _flush_passwd(self) -> None:
        self.write("etc/passwd", "\n".join(self.passwd_lines) + "\n")

    def account(self, name: str, uid: int = 1000, files: tuple[str, ...] = (),
                home: bool = True) -> Path:
        path = self.root / "home" / name
        self.passwd_lines.append(f"{name}:x:{uid}:{uid}::{path}:/bin/sh")
        self._flush_passwd()
        if home:
            path.mkdir(parents=True, exist_ok=True)
            own(path, uid, uid)                      # qmail-getpw: the home is the user's
            for f in files:
                (path / f).write_text("./Maildir/\n")
        return path

    def vpop_domain(self, domain: str, users: tuple[str, ...] = (), files: tuple[str, ...] = (),
                    default: str | None = "| /home/vpopmail/bin/vdelivermail '' bounce-no-mailbox",
                    sub: str = "", vpasswd: bool = True) -> Path:
        d = self.vpop / "domains" / sub / domain if sub else self.vpop / "domains" / domain
        d.mkdir(parents=True, exist_ok=True)
        if vpasswd:
            (d / "vpasswd").write_text("".join(
                f"{u}:$1$xx$yy:1:0:{u}:{d}/{u}:NOQUOTA\n" for u in users))
        if default is not None:
            (d / ".qmail-default").write_text(default + "\n")
        for f in files:
            (d / f).write_text("&someone@example.com\n")
        self.assign_lines.append(f"+{domain}-:{domain}:89:89:{d}:-::")
        self.write("var/qmail/users/assign", "\n".join(self.assign_lines) + "\n.\n")
        newu(self.qmail)                  # as vpopmail's vadddomain runs qmail-newu
        return d

    # ---- running
    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("UPDATER_", "VALIDRCPTTO_", "QMAIL_", "VPOPMAIL_"))}
        env.update(QMAIL_DIR=str(self.qmail), VPOPMAIL_DIR=str(self.vpop),
                   UPDATER_PASSWD=str(self.root / "etc/passwd"))
        env.update(extra)
        return env

    def run(self, *args: str, prog: str = "qmail-updater", env: dict | None = None,
            **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([script(prog), *args], env=env or self.env(**extra),
                              capture_output=True, text=True, timeout=120)

    def keys(self, *args: str, **extra: str) -> list[str]:
        done = self.run("generate", *args, **extra)
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    @property
    def cdb(self) -> Path:
        return self.qmail / "control/validrcptto.cdb"


def setup_tree(tree: Tree, users: int = 3) -> Path:
    tree.control("me", "mail.example.com\n")
    tree.control("rcpthosts", "example.com\nvpop.example\n")
    tree.control("locals", "example.com\n")
    tree.control("virtualdomains", "vpop.example:vpop.example\n")
    tree.account("joe")
    d = tree.vpop_domain("vpop.example", users=tuple(f"u{i}" for i in range(users)))
    return d


def keys_of(path: Path) -> set[str]:
    """The keys lookups in the cdb find (an incremental install leaves records behind
    that only a walk of the records, as cdbdump's, would show)."""
    from updater.install.stablecdb import read_items
    return {k.decode() for k, _ in read_items(str(path))}


def found(path: Path) -> dict[bytes, bytes]:
    """What lookups in the cdb find, key -> value."""
    from updater.install.stablecdb import read_items
    return dict(read_items(str(path)))
