"""Exceptions carrying the file and line they are about.

Nothing below the CLI prints: code raises these and ``cli`` turns each into one line
on stderr and an exit code.
"""

from __future__ import annotations


class UpdaterError(Exception):
    """Base class. ``str(err)`` is the one line the user sees."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None):
        self.message = message
        self.path = str(path) if path is not None else None
        self.line = line
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = ""
        if self.path is not None:
            where = self.path if self.line is None else f"{self.path}:{self.line}"
            where += ": "
        return where + self.message


class SourceError(UpdaterError):
    """A source could not be read or parsed; the whole build fails."""


class ConfigError(UpdaterError):
    """A setting (flag, environment variable) is unusable."""


class InstallRefused(UpdaterError):
    """The sanity gate refused the new list; the live cdb was left alone."""


class InstallError(UpdaterError):
    """Writing or replacing the cdb failed; the live cdb was left alone.  ``errno``: the
    system's error, when there was one (ENOSPC: retried as soon as there is room)."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None,
                 errno: int | None = None):
        super().__init__(message, path, line)
        self.errno = errno
