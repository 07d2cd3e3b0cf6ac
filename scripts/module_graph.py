"""Print the import graph of the peftlab package, function-level imports included, and any cycle in it.

    python scripts/module_graph.py            # one line per module: what it imports from peftlab
    python scripts/module_graph.py --check    # exit 1 if there is a cycle or a layer imports above itself

The package has three layers (see the README's *Layout*): the science modules, the experiment harness
(``peftlab.harness``), and the book's own machinery (``peftlab.book``). Science imports neither of the other
two; the harness does not import the book.
"""

from __future__ import annotations

import argparse
import ast
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


def imports(path: Path, modules: set[str]) -> set[str]:
    """The peftlab modules ``path`` imports, at any depth (``from peftlab import x`` counts as ``peftlab.x``)."""
    found = set()
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
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
    for module in sorted(g):
        print(f"{module:<28} -> {', '.join(sorted(g[module])) or '(nothing in peftlab)'}")
    found = cycles(g)
    upward = [(a, b) for a in g for b in g[a] if layer(b) > layer(a)]
    for c in found:
        print("cycle:", " -> ".join(c + c[:1]))
    for a, b in sorted(upward):
        print(f"layering: {a} (layer {layer(a)}) imports {b} (layer {layer(b)})")
    if not found and not upward:
        print("no cycles; every module imports only from its own layer and those below")
    return 1 if args.check and (found or upward) else 0


if __name__ == "__main__":
    sys.exit(main())
