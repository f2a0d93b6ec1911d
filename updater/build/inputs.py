"""What a build read, and whether it has changed since: the memory an incremental
build starts from.

Every file or directory the delivery chain reads for a domain is *touched* first: its
identity (device, inode, size, mtime and ctime in ns) is taken before it is read, so a
change made while the build runs shows up as a difference next time, never as a change
silently absorbed.  A directory's identity changes when an entry is created, removed or
renamed in it (a new ``.qmail-alias``, a vpasswd replaced by rename); a file's when it is
written.  Two writes of the same size within one timestamp tick are the blind spot; the
onchange request names the domain anyway, and the safety-net full build catches the rest.
"""

from __future__ import annotations

import os
import stat

from ..ident import Ident, identity


def dotqmail_files(home: str, names: list[str]) -> frozenset[str]:
    """Of a directory's ``names``, the regular files (symlinks followed) named
    ``.qmail*``: what qmail-local can find in a home."""
    found = []
    for name in names:
        if name.startswith(".qmail"):
            try:
                if stat.S_ISREG(os.stat(os.path.join(home, name)).st_mode):
                    found.append(name)
            except OSError:
                pass
    return frozenset(found)


def _listing(home: str) -> frozenset[str] | None:
    try:
        return dotqmail_files(home, os.listdir(home))
    except OSError:
        return None


class Inputs:
    """The one record of what a build read: per domain, the paths it read for it, each
    with its identity before the read (what an incremental build consults), and every
    home and file the delivery chain looked at (what the daemon watches).

    ``domain`` is the domain being worked on (set by the build); touches outside any
    domain are not recorded (the global inputs are compared separately).  A build that
    needs no record is given ``Inputs(recording=False)``, which records nothing."""

    def __init__(self, recording: bool = True) -> None:
        self.recording = recording
        self.ident: dict[str, Ident | None] = {}
        self.paths: dict[str, set[str]] = {}          # domain -> paths read for it
        self.names: dict[str, frozenset[str]] = {}    # home -> its .qmail files, as read
        self.homes: dict[str, str] = {}               # every home looked at -> how found
        self.files: set[str] = set()                  # other files read (fastforward cdbs)
        self.domain: str | None = None

    def touch(self, path: str) -> None:
        if self.domain is None or not self.recording:
            return
        path = os.path.abspath(path)
        if path not in self.ident:
            self.ident[path] = identity(path)
        self.paths.setdefault(self.domain, set()).add(path)

    def listed(self, home: str, how: str, names: frozenset[str] | None) -> None:
        """The ``.qmail`` files found in ``home`` (touched before it was listed; None:
        it could not be listed): when the directory changes but not these (vpasswd
        replaced by a rename), the domains that only looked for ``.qmail`` files there
        are not redone.  ``how``: how the home was found (``account NAME``, ...)."""
        if not self.recording:
            return
        self.homes.setdefault(home, how)
        if names is not None:
            self.names.setdefault(os.path.abspath(home), names)

    def read(self, path: str) -> None:
        """A file other than a home's own (a fastforward cdb) was read."""
        if self.recording:
            self.files.add(os.path.abspath(path))
            self.touch(path)

    def changed(self) -> set[str]:
        """The domains any of whose inputs is not what it was when it was read."""
        moved = {p for p, was in self.ident.items() if identity(p) != was}
        moved = {p for p in moved if p not in self.names or _listing(p) != self.names[p]}
        if not moved:
            return set()
        return {d for d, ps in self.paths.items() if not ps.isdisjoint(moved)}

    def sharing(self, domains: set[str], names: tuple[str, ...] = ("vpasswd",)) -> set[str]:
        """Other domains that read the same user list as one of ``domains`` (vpopmail
        alias domains share their real domain's directory): a request for one is a
        request for all of them."""
        wanted = {p for d in domains for p in self.paths.get(d, ())
                  if os.path.basename(p) in names}
        if not wanted:
            return set()
        return {d for d, ps in self.paths.items() if not ps.isdisjoint(wanted)}

    def domains_of(self, path: str) -> set[str]:
        """The domains that read ``path``, or (for a ``.qmail`` file) that looked for
        ``.qmail`` files in its directory."""
        path = os.path.abspath(path)
        parent, name = os.path.split(path)
        listing = name.startswith(".qmail")
        return {d for d, ps in self.paths.items() if path in ps or (listing and parent in ps)}

    def replace(self, other: Inputs, redone: set[str]) -> Inputs:
        """A new record: this one with the ``redone`` domains' entries taken from
        ``other`` (the incremental build that redid them)."""
        out = Inputs()
        out.homes = {**self.homes, **other.homes}
        out.files = self.files | other.files
        out.paths = {d: ps for d, ps in self.paths.items() if d not in redone}
        # a path a domain that was not redone also reads keeps its old identity: if it
        # moved, the next build redoes every domain that reads it (never a change missed)
        old: set[str] = set().union(*out.paths.values()) if out.paths else set()
        out.paths.update((d, ps) for d, ps in other.paths.items() if d in redone)
        for ps in out.paths.values():
            for p in ps:
                if p not in out.ident:
                    source = self if p in old else other
                    out.ident[p] = source.ident[p]
                    if p in source.names:
                        out.names[p] = source.names[p]
        return out
