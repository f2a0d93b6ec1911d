"""Synthetic vpopmail trees for the benchmarks: N domains, M addresses in vpasswd files."""

from __future__ import annotations

import os


def make_tree(root: str, domains: int, addresses: int) -> dict[str, str]:
    """A qmail + vpopmail tree with ``addresses`` users spread over ``domains`` domains,
    every domain listed (bounce-no-mailbox), users/assign pointing at each domain dir.
    Returns the environment for qmail-updater."""
    qmail = os.path.join(root, "var/qmail")
    vpop = os.path.join(root, "home/vpopmail")
    for d in ("control", "users", "alias", "bin"):
        os.makedirs(os.path.join(qmail, d), exist_ok=True)
    names = [f"dom{i:04d}.example" for i in range(domains)]
    per = addresses // domains
    extra = addresses - per * domains
    assign = []
    for i, dom in enumerate(names):
        ddir = os.path.join(vpop, "domains", dom)
        os.makedirs(ddir, exist_ok=True)
        with open(os.path.join(ddir, ".qmail-default"), "w") as f:
            f.write("| /home/vpopmail/bin/vdelivermail '' bounce-no-mailbox\n")
        n = per + (1 if i < extra else 0)
        with open(os.path.join(ddir, "vpasswd"), "w") as f:
            f.write("".join(
                f"user{j:06d}:$1$Xy7pQ2aZ$Gk3oV9bW2sLq8eN1rT5uH0:1:0:User Number {j}:"
                f"{ddir}/user{j:06d}:10485760S\n" for j in range(n)))
        assign.append(f"+{dom}-:{dom}:89:89:{ddir}:-::")
    with open(os.path.join(qmail, "control/rcpthosts"), "w") as f:
        f.write("".join(d + "\n" for d in names))
    with open(os.path.join(qmail, "control/virtualdomains"), "w") as f:
        f.write("".join(f"{d}:{d}\n" for d in names))
    with open(os.path.join(qmail, "control/me"), "w") as f:
        f.write("mx.example.net\n")
    with open(os.path.join(qmail, "control/locals"), "w") as f:
        f.write("")
    with open(os.path.join(qmail, "users/assign"), "w") as f:
        f.write("\n".join(assign) + "\n.\n")
    import cdbx  # users/cdb, as qmail-newu compiles it
    maker = cdbx.CDB.make(os.path.join(qmail, "users/cdb"))
    for line in assign:
        prefix, _, data = line[1:].partition(":")
        maker.add(b"!" + prefix.encode(), "\0".join(data.split(":")[:6]).encode())
    maker.add(b"", b"-")
    maker.commit().close()
    passwd = os.path.join(root, "etc/passwd")
    os.makedirs(os.path.dirname(passwd), exist_ok=True)
    with open(passwd, "w") as f:
        f.write(f"alias:x:201:200::{qmail}/alias:/bin/false\n")
    return {"QMAIL_DIR": qmail, "VPOPMAIL_DIR": vpop, "UPDATER_PASSWD": passwd}


def domain_dirs(env: dict[str, str]) -> list[tuple[str, str]]:
    base = os.path.join(env["VPOPMAIL_DIR"], "domains")
    return [(d, os.path.join(base, d)) for d in sorted(os.listdir(base))]
