"""The rebuild daemon as a child process, and root without its file-reading powers."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading

from .tools import need, script
from .tree import Tree
from .wait import wait_for


def without_dac_override() -> list[str]:
    """root reads every file whatever its mode; drop that power (util-linux setpriv) so a
    mode-000 directory is unreadable, as it is to a non-root builder."""
    if os.geteuid() != 0:
        return []
    caps = "-dac_override,-dac_read_search"
    return [need("setpriv"), "--bounding-set", caps, "--inh-caps", caps]


class Running:
    """``qmail-updater run`` as a child process, its stderr collected line by line."""

    def __init__(self, tree: Tree, prefix: list[str] | None = None, **env: str):
        settings = dict(UPDATER_QUIET="0.3", UPDATER_MAX_DELAY="5", UPDATER_RETRY_MIN="0.5",
                        UPDATER_RETRY_MAX="1", UPDATER_MIN_INTERVAL="0")
        settings.update(env)
        self.proc = subprocess.Popen((prefix or []) + [script("qmail-updater"), "run"],
                                     env=tree.env(**settings), stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        self.wait(r"build \(start\)")
        self.wait(r"^qmail-updater: watching ")

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def count(self, pattern: str) -> int:
        return sum(1 for line in list(self.lines) if re.search(pattern, line))

    def wait(self, pattern: str, seconds: float = 15, count: int = 1) -> None:
        wait_for(lambda: self.count(pattern) >= count, seconds,
                 f"{count} x {pattern!r} in the log:\n" + "\n".join(self.lines))

    def builds(self) -> int:
        return self.count(r"^qmail-updater: build (\(|failed)")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(20)
        self.reader.join(5)
        return code
