"""One declaration per setting, for every program: a dataclass field made by
``setting`` carries its default and type, and beside them its environment variable,
help, parser, bounds and choices (``Opt``).  ``declared`` reads them back, in field
order; argparse, ``--help``, the README tables and the shipped ``env/`` directories
are made from (or tested against) that, never from a second table; ``load`` is the one
loader every program's settings go through (as Postfix's ``get_mail_conf_*_table``):
a flag, else the variable, else the default, parsed and checked by the declaration.
Pure."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "yes", "true", "on"):
        return True
    if value in ("", "0", "no", "false", "off"):
        return False
    raise ValueError(f"expected 1/0, yes/no, true/false, got {text!r}")


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"not a number: {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"not a finite number: {text!r}")
    if value < 0:
        raise ValueError(f"must not be negative, got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise ValueError(f"not a whole number: {text!r}") from None
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
        """The bounds and choices (a ValueError saying what is wrong)."""
        if self.choices and value not in self.choices:
            expected = ", ".join(self.choices[:-1]) + " or " + self.choices[-1]
            raise ValueError(f"expected {expected}, got {value!r}")
        if self.positive and value <= 0:
            raise ValueError(f"must be positive, got {value}")

    def value(self, flags: object, environ: Mapping[str, str]) -> Any:
        """This setting's value: the flag's (argparse leaves an absent one None), else
        the variable's, else ``_UNSET`` (the default).  An empty variable (an empty
        ``env/`` file) is the default.  A value that does not parse or is out of bounds
        is a ConfigError naming where it came from."""
        given = getattr(flags, self.name, None)
        if given is not None:
            origin, raw = self.cli, given
        elif self.env and self.env in environ:
            origin, raw = f"${self.env}", environ[self.env]
            if not raw.strip():
                return _UNSET
        else:
            return _UNSET
        assert self.parse is not None
        try:
            if self.repeat:
                items = raw.split() if isinstance(raw, str) else list(raw)
                return [self.parse(x) for x in items]
            value = self.parse(raw if self.parse is _str else raw.strip())
            self.check(value)
        except ValueError as err:
            raise ConfigError(f"{origin}: {err}") from None
        return value


_UNSET: Any = object()


def load(cls: type[T], flags: object, environ: Mapping[str, str],
         error: Callable[[str], object] | None = None) -> T:
    """A settings dataclass from flags (an argparse namespace, or None), the environment
    and the defaults.  A bad value raises ConfigError; with ``error``, it is handed
    that line instead (argparse's ``error`` exits 2; the tcpserver front end's keeps
    the default: a bad server variable never costs a session)."""
    values: dict[str, Any] = {}
    for opt in declared(cls):
        try:
            value = opt.value(flags, environ)
        except ConfigError as err:
            if error is None:
                raise
            error(str(err))
            continue
        if value is not _UNSET:
            values[opt.name] = value
    return cls(**values)


_PARSERS: dict[type, Callable[[str], Any]] = {bool: _bool, int: _int, float: _float, str: _str}


def setting(default: Any, *, env: str, help: str, parse: Callable[[str], Any] | None = None,
            flag: str = "", group: str = "generate", derived: bool = False,
            choices: tuple[str, ...] = (), positive: bool = False, metavar: str = "",
            repeat: bool = False) -> Any:
    """A dataclass field with its declaration (see ``Opt``)."""
    return dataclasses.field(default=default, metadata={"opt": Opt(
        env, help, parse or _PARSERS.get(type(default), _str), flag, group, derived,
        choices, positive, metavar, repeat)})


def qmail_home(help: str) -> Any:
    """QMAIL_DIR, declared once for every program (each says what it reads there)."""
    return setting("/var/qmail", env="QMAIL_DIR", flag="--qmail-dir", metavar="DIR",
                   help=help)


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
