"""The two site files: addresses always accepted, and addresses/@domains always rejected.

One address (``user@domain``, ``user-default@domain``, ``@domain`` or a bare local part)
per line; blank lines and ``#`` comments are ignored.  Included keys are written as
found; excluded keys are written with the value ``-``, which makes the checker reject
them even where a ``-default`` or ``@domain`` entry would accept, and an excluded
``@domain`` removes every other key of that domain.
"""

from __future__ import annotations

from collections.abc import Iterator

from ...errors import SourceError
from ..qmail import lower_ascii, read_control
from . import Found


def parse_site_file(lines: list[tuple[int, str]], path: str) -> list[str]:
    keys = []
    for number, line in lines:
        key = lower_ascii(line.strip())
        if any(c.isspace() for c in key) or key.count("@") > 1 or key.endswith("@"):
            raise SourceError(f"not an address, -default address or @domain: {line!r}",
                              path, number)
        keys.append(key)
    return keys


def site_entries(include: str, exclude: str) -> Iterator[Found]:
    for path, reject in ((include, False), (exclude, True)):
        keys = parse_site_file(read_control(path), path)
        if keys:
            yield Found(f"{'exclude' if reject else 'include'} file {path}", keys, reject)
