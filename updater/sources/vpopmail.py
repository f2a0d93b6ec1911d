"""vpopmail users of one domain, read directly from the domain's own files.

vpopmail keeps a domain's users in ``DOMAIN_DIR/vpasswd`` (the master; ``vuserinfo -D``
reads it) and compiles it into ``vpasswd.cdb`` (keys are the user names).  We read the
text file, fall back to the cdb, and only when asked (``--vuserinfo``) run
``vuserinfo -n -D DOMAIN`` for a domain whose files we may not read.
"""

from __future__ import annotations

import os
import subprocess

from ..errors import SourceError
from ..qmail import ENCODING, ERRORS, cdb_keys


def parse_vpasswd(text: str, path: str) -> list[str]:
    """User names from vpasswd lines ``name:pass:uid:gid:gecos:dir:quota[:clear]``."""
    names = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line or line[0] == "#":
            continue
        name, sep, rest = line.partition(":")
        if not sep or not name or rest.count(":") < 5:
            raise SourceError(f"expected 'name:pass:uid:gid:gecos:dir:quota': {line[:80]!r}",
                              path, number)
        names.append(name)
    return names


def read_users(domain_dir: str, domain: str, vuserinfo: str | None) -> tuple[str, list[str]]:
    """(origin, user names) for one vpopmail domain."""
    path = os.path.join(domain_dir, "vpasswd")
    try:
        with open(path, encoding=ENCODING, errors=ERRORS) as f:
            return f"vpasswd {path}", parse_vpasswd(f.read(), path)
    except FileNotFoundError:
        denied = None
    except PermissionError as err:
        denied = SourceError(f"cannot read: {err.strerror}", path)
    except OSError as err:
        raise SourceError(f"cannot read: {err.strerror}", path) from None
    if denied is None:
        cdb_path = path + ".cdb"
        try:
            keys = cdb_keys(cdb_path)
        except SourceError as err:
            if vuserinfo is None or not os.path.exists(cdb_path):
                raise
            denied = err
        else:
            if keys is not None:
                return f"vpasswd.cdb {cdb_path}", keys
            if vuserinfo is None:
                raise SourceError("vpopmail domain has neither vpasswd nor vpasswd.cdb "
                                  "(bounce-no-mailbox would reject every address)", domain_dir)
    if vuserinfo is None:
        raise denied
    return f"vuserinfo -D {domain}", run_vuserinfo(vuserinfo, domain)


def run_vuserinfo(program: str, domain: str) -> list[str]:
    argv = [program, "-n", "-D", domain]
    try:
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=300, check=False)
    except OSError as err:
        raise SourceError(f"cannot run: {err.strerror}", program) from None
    except subprocess.TimeoutExpired:
        raise SourceError(f"timed out listing {domain}", program) from None
    if done.returncode != 0:
        detail = done.stderr.decode(ENCODING, "replace").strip().splitlines()
        why = f": {detail[-1][:200]}" if detail else ""
        raise SourceError(f"-D {domain} exited {done.returncode}{why}", program)
    names = done.stdout.decode(ENCODING, ERRORS).split()
    return names
