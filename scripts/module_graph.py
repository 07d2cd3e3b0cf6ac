"""Print the import graph of the peftlab package, function-level imports included, and any cycle in it.

    python scripts/module_graph.py            # one line per module: what it imports from peftlab
    python scripts/module_graph.py --check    # exit 1 on a cycle, a layer importing above itself, a private name
                                              # imported from another module, or an import the graph cannot see

The package has three layers (see the README's *Layout*): the science modules, the experiment harness
(``peftlab.harness``), and the book's own machinery (``peftlab.book``). Science imports neither of the other
two; the harness does not import the book. A string that names a peftlab module (``"peftlab.harness.x"``) counts
as an import of it, since code can load it from there; ``importlib.import_module`` or ``__import__`` with a name
computed at run time is refused, since nothing could see what it imports.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "peftlab"

#: Layer of a module by its dotted name's prefix; a module may import only from its layer and those below.
LAYERS = {"peftlab.book": 2, "peftlab.harness": 1}


def layer(module: str) -> int:
    for prefix, level in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return level
    return 0


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


DOTTED = re.compile(r"peftlab(\.[A-Za-z_]\w*)+")
DYNAMIC = {"import_module", "__import__"}


def problems(path: Path, modules: set[str]) -> list[str]:
    """What the graph cannot vouch for in ``path``: private names imported from another peftlab module, and
    imports whose target is computed at run time."""
    return problems_in(path.read_text(), module_name(path), modules)


def problems_in(source: str, this: str, modules: set[str]) -> list[str]:
    """:func:`problems` of module ``this`` given its source text."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("peftlab") and node.module != this:
            for alias in node.names:
                if alias.name.startswith("_") and f"{node.module}.{alias.name}" not in modules:
                    out.append(f"private import: {this} imports {alias.name} from {node.module}")
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in DYNAMIC and not (node.args and isinstance(node.args[0], ast.Constant)):
                out.append(f"hidden import: {this} line {node.lineno} calls {name} with a computed name")
    return out


def imports(path: Path, modules: set[str]) -> set[str]:
    """The peftlab modules ``path`` imports, at any depth (``from peftlab import x`` counts as ``peftlab.x``),
    including those named in a string (what ``importlib`` could load)."""
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    return imports_in(path.read_text(), this, package, modules)


def imports_in(source: str, this: str, package: str, modules: set[str]) -> set[str]:
    """:func:`imports` of module ``this`` (in ``package``) given its source text."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and DOTTED.fullmatch(node.value):
            names = [node.value]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != this and name != "peftlab":
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports(p, modules) for p in paths}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle's smallest rotation, found by depth-first search (the graph is small)."""
    found: set[tuple[str, ...]] = set()

    def visit(start: str, node: str, path: list[str]) -> None:
        for nxt in sorted(g.get(node, ())):
            if nxt == start:
                i = path.index(min(path))
                found.add(tuple(path[i:] + path[:i]))
            elif nxt not in path and nxt > start:
                visit(start, nxt, path + [nxt])

    for start in sorted(g):
        visit(start, start, [start])
    return [list(c) for c in sorted(found)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail on cycles and on imports up the layers")
    args = parser.parse_args(argv)
    g = graph()
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    hidden = [line for p in paths for line in problems(p, modules)]
    for module in sorted(g):
        print(f"{module:<28} -> {', '.join(sorted(g[module])) or '(nothing in peftlab)'}")
    found = cycles(g)
    upward = [(a, b) for a in g for b in g[a] if layer(b) > layer(a)]
    for c in found:
        print("cycle:", " -> ".join(c + c[:1]))
    for a, b in sorted(upward):
        print(f"layering: {a} (layer {layer(a)}) imports {b} (layer {layer(b)})")
    for line in hidden:
        print(line)
    if not found and not upward and not hidden:
        print("no cycles; every module imports only from its own layer and those below, no private name crosses a "
              "module, and no import is hidden")
    return 1 if args.check and (found or upward or hidden) else 0


if __name__ == "__main__":
    sys.exit(main())
