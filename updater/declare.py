"""One declaration per setting, for every program: a dataclass field made by
``setting`` carries its default and type, and beside them its environment variable,
help, parser, bounds and choices (``Opt``).  ``declared`` reads them back, in field
order; argparse, ``--help``, the README tables and the shipped ``env/`` directories
are made from (or tested against) that, never from a second table.  Pure."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "yes", "true", "on"):
        return True
    if value in ("", "0", "no", "false", "off"):
        return False
    raise ValueError(f"expected 1/0, yes/no, true/false, got {text!r}")


def _float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise ValueError(f"must not be negative, got {text!r}")
    return value


def _int(text: str) -> int:
    value = int(text, 10)
    if value < 0:
        raise ValueError(f"must not be negative, got {text!r}")
    return value


def _mode(text: str) -> int:
    return int(text, 8)


def _str(text: str) -> str:
    return text


@dataclass(frozen=True)
class Opt:
    """One setting's declaration beyond its field (``setting``); ``name`` and
    ``default`` are filled from the field by ``declared``."""
    env: str             # environment variable (envdir file name; "": none)
    help: str
    parse: Callable[[str], Any] | None = None   # None: by the default's type
    flag: str = ""       # CLI flag; "" means --name-with-dashes
    group: str = "generate"
    derived: bool = False                # empty: derived from others in resolve()
    choices: tuple[str, ...] = ()
    positive: bool = False               # must be > 0
    metavar: str = ""
    repeat: bool = False                 # may be given more than once (a list)
    name: str = ""
    default: Any = None

    @property
    def cli(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def optional(self) -> bool:
        """An empty value means the default (one derived or looked up later)."""
        return self.derived or self.default is None

    def check(self, value: Any) -> None:
        """The bounds and choices (a ConfigError naming the variable)."""
        if self.choices and value not in self.choices:
            expected = ", ".join(self.choices[:-1]) + " or " + self.choices[-1]
            raise ConfigError(f"{self.env}: expected {expected}, got {value!r}")
        if self.positive and value <= 0:
            raise ConfigError(f"{self.env}: must be positive, got {value}")


_PARSERS: dict[type, Callable[[str], Any]] = {bool: _bool, int: _int, float: _float, str: _str}


def setting(default: Any, *, env: str, help: str, parse: Callable[[str], Any] | None = None,
            flag: str = "", group: str = "generate", derived: bool = False,
            choices: tuple[str, ...] = (), positive: bool = False, metavar: str = "",
            repeat: bool = False) -> Any:
    """A dataclass field with its declaration (see ``Opt``)."""
    return dataclasses.field(default=default, metadata={"opt": Opt(
        env, help, parse or _PARSERS.get(type(default), _str), flag, group, derived,
        choices, positive, metavar, repeat)})


def declared(cls: type) -> tuple[Opt, ...]:
    """The declarations of a settings dataclass, in field order, named and defaulted."""
    return tuple(dataclasses.replace(f.metadata["opt"], name=f.name, default=f.default)
                 for f in dataclasses.fields(cls) if "opt" in f.metadata)


def shown_default(opt: Opt) -> str:
    """The default as --help and the README show it ("" when the help text says it)."""
    d = opt.default
    if d is None or d == "" or opt.derived:
        return ""
    if opt.parse is _bool:
        return "on" if d else "off"
    if opt.parse is _mode:
        return f"{d:o}"
    if isinstance(d, float):
        return f"{d:g}"
    return str(d)
