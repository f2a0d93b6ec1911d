"""The package's layering: no import cycle inside updater/, counting the imports made
inside functions (a cycle broken only by a lazy import is still a cycle) and those
under ``if TYPE_CHECKING:`` (two modules that need each other's types are one concept
split badly)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "updater"


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                if f"{target}.{alias.name}" in known:
                    found.add(f"{target}.{alias.name}")
            if target in known:
                found.add(target)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
    found.discard(name)
    # a package's __init__ importing its own modules is not a cycle of the layers
    return {m for m in found if not (path.name == "__init__.py" and m.startswith(name + "."))}


def test_no_import_cycle():
    known = modules()
    graph = {n: imports(n, p, known) for n, p in known.items()}
    cycles = []

    def visit(node: str, stack: list[str], done: set[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in stack:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in done:
                done.add(nxt)
                visit(nxt, stack + [nxt], done)
    for n in sorted(graph):
        visit(n, [n], {n})
    shown = sorted({" -> ".join(c) for c in cycles})
    assert not cycles, "\n".join(shown[:20])


DESIGN = PKG.parent / "docs" / "design.md"
NAME = re.compile(r"^(\w+)(\.py|/)$")
DESCRIPTIONS = 20        # a line indented this far or more is a row's description


def picture(text: str) -> dict[str, int]:
    """docs/design.md's picture of the code, read as layers: each module (or a package
    whose modules the picture does not list) with the number of its row, bottom first.
    A row is a line indented less than DESCRIPTIONS whose first word is a module
    (``x.py``) or a package (``p/``); the words that follow while they are names are on
    the same row; the indentation says which package a name is in."""
    block = text.split("```\nupdater/\n", 1)[1].split("```", 1)[0]
    rows: dict[str, int] = {}
    stack: list[tuple[int, str]] = [(0, "updater")]
    for number, line in enumerate(block.splitlines()):
        words = line.split()
        indent = len(line) - len(line.lstrip())
        if not words or not NAME.match(words[0]) or indent >= DESCRIPTIONS:
            continue
        while stack[-1][0] >= indent:
            stack.pop()
        here = stack[-1][1]
        for word in words:
            m = NAME.match(word)
            if m is None:
                break
            name = f"{here}.{m.group(1)}"
            rows[name] = number
            if m.group(2) == "/":
                stack.append((indent, name))
    return rows


def row_of(module: str, rows: dict[str, int]) -> int | None:
    """A module's row: its own, or that of the nearest package the picture names."""
    parts = module.split(".")
    while parts:
        name = ".".join(parts)
        if name in rows:
            return rows[name]
        parts.pop()
    return None


def test_every_import_keeps_to_the_picture():
    """The picture in docs/design.md is the layering: no module imports from a row
    below its own (lazy imports included), every module is in it, and every name in it
    is a module or a package."""
    known = modules()
    rows = picture(DESIGN.read_text())
    packages = {n for n, p in known.items() if p.name == "__init__.py"}
    wrong = [f"{n}: not in the picture of docs/design.md" for n in sorted(known)
             if n != "updater" and n not in packages and n not in rows
             and not any(n.startswith(r + ".") and r in packages for r in rows)]
    wrong += [f"{n}: in the picture, but no module" for n in sorted(rows) if n not in known]
    for name, path in sorted(known.items()):
        mine = row_of(name, rows)
        for target in sorted(imports(name, path, known)):
            theirs = row_of(target, rows)
            if mine is not None and theirs is not None and theirs > mine:
                wrong.append(f"{name} -> {target}: a row below it in the picture")
    assert not wrong, "\n".join(wrong)


def test_the_picture_reader(tmp_path):
    """The reader itself: rows, packages by indentation, a description not taken for
    names."""
    text = ("```\nupdater/\n  a.py b.py  leaves\n  pkg/  a package\n    c.py   one\n"
            "                         words.py in a description\n    d.py\n  e.py the top\n```\n")
    rows = picture(text)
    assert rows == {"updater.a": 0, "updater.b": 0, "updater.pkg": 1, "updater.pkg.c": 2,
                    "updater.pkg.d": 4, "updater.e": 5}
    assert row_of("updater.pkg.sub.x", {"updater.pkg.sub": 3}) == 3


def test_the_cycle_detector_finds_one(tmp_path):
    """The detector itself: a lazy import that closes a loop is found."""
    known = {"updater.a": tmp_path / "a.py", "updater.b": tmp_path / "b.py"}
    known["updater.a"].write_text("from . import b\n")
    known["updater.b"].write_text("def f():\n    from .a import x\n")
    assert imports("updater.b", known["updater.b"], known) == {"updater.a"}
    assert imports("updater.a", known["updater.a"], known) == {"updater.b"}


MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def test_modules_and_functions_stay_small():
    """One job per module, one step per function: no module under updater/ over 400
    lines, no function over 60.  A module's top-level import statements do not count:
    ruff's import sorter lays a long list out one name a line, and the bound is on code."""
    too_long = []
    for path in sorted(PKG.rglob("*.py")):
        text = path.read_text()
        tree = ast.parse(text)
        imported = sum((n.end_lineno or n.lineno) - n.lineno + 1 for n in tree.body
                       if isinstance(n, (ast.Import, ast.ImportFrom)))
        if text.count("\n") - imported > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(PKG)}: {text.count(chr(10)) - imported} lines")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(PKG)}: {node.name}() {n} lines")
    assert not too_long, "\n".join(too_long)


# the rules and protocols the docs call pure: typed data in, typed data out, the clock
# passed in.  What the standard library gives them is held to this list (no time, os,
# socket, threading, select, subprocess, asyncio: the clock and I/O stay at the edges)
PURE = ["updater.daemon.rules", "updater.daemon.pending", "updater.daemon.events",
        "updater.daemon.onchange", "updater.daemon.window", "updater.daemon.pollclock",
        "updater.install.gate", "updater.build.routing", "updater.build.localdelivery",
        "updater.build.merge", "updater.postfix.protocol", *(
            f"updater.smtp.{m}" for m in ("addresses", "blast", "context", "envelope",
                                          "events", "framing", "received", "replies",
                                          "sasl", "session"))]
PURE_STDLIB = {"__future__", "dataclasses", "typing", "collections", "collections.abc", "re",
               "enum", "bisect", "binascii", "itertools", "functools"}
# (module, import): why it is no clock and no I/O
PURE_BUT = {("updater.smtp.received", "time"): "time.gmtime formats the time it is handed "
            "(the session's clock); it reads none"}


def stdlib_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level:
            found.add(node.module or "")
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m.split(".")[0] != "updater"}


def test_the_pure_modules_take_no_clock_and_do_no_io():
    known = modules()
    wrong = [f"{name} imports {m}" for name in PURE
             for m in sorted(stdlib_imports(known[name]) - PURE_STDLIB)
             if (name, m) not in PURE_BUT]
    assert not wrong, "\n".join(wrong)


def test_the_purity_check_finds_a_clock(tmp_path):
    bad = tmp_path / "m.py"
    bad.write_text("import dataclasses\n\ndef f():\n    import time\n    return time.time()\n")
    assert stdlib_imports(bad) - PURE_STDLIB == {"time"}
