"""The bundled sample qmail tree that ``qmail-updater demo`` builds from.

It has one of everything: two local domains with system accounts and ~/.qmail-EXT
files, ~alias with a fastforward aliases.cdb, an alias domain, a vpopmail domain that
bounces unknown users (users, a valias, an ezmlm list), a vpopmail catch-all domain in
vpopmail's hashed directory layout, a routed domain, a single-address virtualdomains
entry, and a site exclude file.
"""

from __future__ import annotations

import os

VDELIVER = "| /home/vpopmail/bin/vdelivermail '' {bounce}\n"

# path (relative to the tree root) -> content; "{root}" is replaced by the tree root.
FILES: dict[str, str] = {
    "etc/passwd": (
        "root:x:0:0:root:/root:/bin/sh\n"
        "daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"
        "alias:x:201:200::{root}/var/qmail/alias:/bin/false\n"
        "vpopmail:x:89:89::{root}/home/vpopmail:/bin/false\n"
        "joe:x:1000:1000:Joe User:{root}/home/joe:/bin/sh\n"
        "alice:x:1001:1001:Alice:{root}/home/alice:/bin/sh\n"
        "Bob:x:1002:1002:capital letters get no mail:{root}/home/bob:/bin/sh\n"
    ),
    "home/joe/.qmail": "./Maildir/\n",
    "home/joe/.qmail-lists": "./Maildir/.lists/\n",
    "home/joe/.qmail-lists-default": "./Maildir/.lists/\n",
    "home/joe/.qmail-ceo": "./Maildir/.ceo/\n",
    "home/alice/.qmail": "./Maildir/\n",
    "home/bob/.qmail": "./Maildir/\n",
    "var/qmail/control/me": "mail.example.com\n",
    "var/qmail/control/rcpthosts": (
        "example.com\nmail.example.com\naliases.example.com\n"
        "vpop.example.net\ncatchall.example.org\npartner.example.biz\n"
    ),
    "var/qmail/control/locals": "example.com\nmail.example.com\n",
    "var/qmail/control/virtualdomains": (
        "aliases.example.com:alias\n"
        "vpop.example.net:vpop.example.net\n"
        "catchall.example.org:catchall.example.org\n"
        "ceo@partner.example.biz:joe\n"
    ),
    "var/qmail/control/smtproutes": "partner.example.biz:[192.0.2.25]\n",
    "var/qmail/control/validrcptto.exclude": (
        "# never accept mail for these, whatever else says so\n"
        "spamtrap@catchall.example.org\n"
    ),
    "var/qmail/users/assign": (
        "+vpop.example.net-:vpop.example.net:89:89:{root}/home/vpopmail/domains/"
        "vpop.example.net:-::\n"
        "+catchall.example.org-:catchall.example.org:89:89:{root}/home/vpopmail/domains/"
        "0/catchall.example.org:-::\n"
        ".\n"
    ),
    "var/qmail/alias/.qmail-postmaster": "joe\n",
    "var/qmail/alias/.qmail-mailer-daemon": "joe\n",
    "var/qmail/alias/.qmail-root": "joe\n",
    "var/qmail/alias/.qmail-default": "| fastforward -d {root}/etc/aliases.cdb\n",
    "home/vpopmail/domains/vpop.example.net/.qmail-default": VDELIVER.format(
        bounce="bounce-no-mailbox"),
    "home/vpopmail/domains/vpop.example.net/vpasswd": (
        "mary:$1$x$y:1:0:Mary:{root}/home/vpopmail/domains/vpop.example.net/mary:NOQUOTA\n"
        "pete:$1$x$y:1:0:Pete:{root}/home/vpopmail/domains/vpop.example.net/pete:NOQUOTA\n"
        "sales-team:$1$x$y:1:0:Sales:{root}/home/vpopmail/domains/vpop.example.net/"
        "sales-team:NOQUOTA\n"
    ),
    "home/vpopmail/domains/vpop.example.net/.qmail-info": "&mary@vpop.example.net\n",
    "home/vpopmail/domains/vpop.example.net/.qmail-news":
        "| /usr/bin/ezmlm-send '{root}/home/vpopmail/domains/vpop.example.net/news'\n",
    "home/vpopmail/domains/vpop.example.net/.qmail-news-default":
        "| /usr/bin/ezmlm-manage '{root}/home/vpopmail/domains/vpop.example.net/news'\n",
    "home/vpopmail/domains/vpop.example.net/.qmail-news-owner": "&mary@vpop.example.net\n",
    "home/vpopmail/domains/vpop.example.net/.qmail-news-return-default":
        "| /usr/bin/ezmlm-return -D '{root}/home/vpopmail/domains/vpop.example.net/news'\n",
    "home/vpopmail/domains/0/catchall.example.org/.qmail-default": VDELIVER.format(
        bounce="{root}/home/vpopmail/domains/0/catchall.example.org/postmaster"),
    "home/vpopmail/domains/0/catchall.example.org/vpasswd":
        "postmaster:$1$x$y:1:0:Postmaster:{root}/home/vpopmail/domains/0/"
        "catchall.example.org/postmaster:NOQUOTA\n",
}

# fastforward's aliases.cdb as setforward writes it: ":" + lowercased address.
ALIASES = {
    ":sales@example.com": "&joe@example.com",
    ":webmaster@": "&alice@example.com",
    ":hostmaster@mail.example.com": "&joe@example.com",
}

ADDRESSES = [
    "joe@example.com", "Joe-Lists-Python@Example.COM", "webmaster@mail.example.com",
    "postmaster", "mary@vpop.example.net", "news-subscribe@vpop.example.net",
    "nobody@vpop.example.net", "anyone@catchall.example.org",
    "spamtrap@catchall.example.org", "bob@example.com", "ceo@partner.example.biz",
]


def _own_homes(root: str) -> None:
    """qmail-getpw delivers only to an account that owns its home: as root, chown each
    home to its account; otherwise give the accounts our own uid."""
    path = os.path.join(root, "etc/passwd")
    lines = []
    with open(path) as f:
        for line in f:
            fields = line.rstrip("\n").split(":")
            home = fields[5]
            if home.startswith(root + "/") and os.path.isdir(home):
                if os.geteuid() == 0:
                    os.chown(home, int(fields[2]), int(fields[3]))
                else:
                    fields[2], fields[3] = str(os.getuid()), str(os.getgid())
            lines.append(":".join(fields) + "\n")
    with open(path, "w") as f:
        f.writelines(lines)


def make_tree(root: str) -> dict[str, str]:
    """Write the sample tree under ``root``; return the settings that point at it."""
    for rel, content in FILES.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(content.replace("{root}", root))
    _own_homes(root)
    import cdbx
    maker = cdbx.CDB.make(os.path.join(root, "etc", "aliases.cdb"))
    for key, value in ALIASES.items():
        maker.add(key.encode(), value.encode())
    maker.commit().close()
    return {
        "QMAIL_DIR": os.path.join(root, "var/qmail"),
        "VPOPMAIL_DIR": os.path.join(root, "home/vpopmail"),
        "UPDATER_PASSWD": os.path.join(root, "etc/passwd"),
    }
