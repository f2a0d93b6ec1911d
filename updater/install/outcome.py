"""What an install did (plain data, no behaviour beyond its log lines): what the builds,
the daemon's rules and the CLI report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..build.qmail import ENCODING, ERRORS
from ..ident import Ident
from .liverecord import Held


@dataclass
class InstallReport:
    path: str
    status: Literal["installed", "unchanged"]
    entries: int
    added: list[bytes] = field(default_factory=list)
    removed: list[bytes] = field(default_factory=list)
    changed: list[bytes] = field(default_factory=list)
    seconds: float = 0.0
    bytes_written: int = 0
    identity: Ident | None = None    # of the live file after this build (ident.identity)
    phases: dict[str, float] = field(default_factory=dict)   # seconds per step (incremental)
    held: dict[str, Held] = field(default_factory=dict)      # domains kept as they were
    compacted: bool = False          # the records an incremental install left are gone

    def line(self) -> str:
        held = f", {len(self.held)} domain(s) held" if self.held else ""
        held += ", compacted" if self.compacted else ""
        if self.status == "unchanged":
            return f"unchanged {self.path}: {self.entries} entries, {self.seconds:.2f}s{held}"
        changed = f" ~{len(self.changed)}" if self.changed else ""
        return (f"installed {self.path}: {self.entries} entries, +{len(self.added)} "
                f"-{len(self.removed)}{changed}, {self.seconds:.2f}s{held}")

    def diff_lines(self, limit: int | None = None) -> list[str]:
        """``+key`` / ``-key`` / ``~key``; at most ``limit`` of each kind."""
        def text(sign: str, keys: list[bytes]) -> list[str]:
            return [sign + k.decode(ENCODING, ERRORS) for k in keys[:limit]]
        return text("+", self.added) + text("-", self.removed) + text("~", self.changed)

    def changes_line(self, limit: int = 10) -> str | None:
        """One log line naming the first changes, or None when nothing changed."""
        shown = self.diff_lines(limit)
        if not shown:
            return None
        more = len(self.added) + len(self.removed) + len(self.changed) - len(shown)
        return "changes: " + " ".join(shown) + (f" (+{more} more)" if more > 0 else "")
