"""The package's layering: no import cycle inside updater/, counting the imports made
inside functions (a cycle broken only by a lazy import is still a cycle) and those
under ``if TYPE_CHECKING:`` (two modules that need each other's types are one concept
split badly)."""

from __future__ import annotations

import ast
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


# the packages' layers: what each may not import (the protocol core is pure; the
# serving machinery is shared by both servers, so it knows neither)
FORBIDDEN = {
    "updater.smtp.": ("updater.smtpd", "updater.serving", "updater.postfix"),
    "updater.serving.": ("updater.smtpd", "updater.postfix"),
    "updater.postfix.": ("updater.smtpd",),
}


def test_packages_keep_their_layers():
    known = modules()
    wrong = []
    for name, path in known.items():
        for prefix, banned in FORBIDDEN.items():
            if name.startswith(prefix):
                wrong += [f"{name} -> {m}" for m in sorted(imports(name, path, known))
                          if m.startswith(banned)]
    assert not wrong, "\n".join(wrong)


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
