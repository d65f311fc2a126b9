"""Check the package's shape: module, function and class sizes, and layered imports.

    python scripts/check_structure.py [src/emoprompt]

Exits 1 and lists every breach. Limits: a module at most MAX_MODULE_LINES lines, a
function (or method) at most MAX_FUNCTION_LINES, a class at most MAX_CLASS_LINES. Each
subpackage (and top-level module) belongs to a layer (LAYERS, lowest first); a module
may import from its own layer or the ones below, never above, and the modules' import
graph has no cycle. Imports inside functions count too.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80
MAX_CLASS_LINES = 300
PACKAGE = "emoprompt"
# Lowest first. A module may import from its own layer and every layer below it.
LAYERS: list[set[str]] = [
    {"infra", "labels"},
    {"data"},
    {"prompting"},
    {"models"},
    {"inference"},
    {"evaluation", "training"},
    {"reporting", "tracking", "plan"},
    {"bench"},
]


def layer_of(module: str) -> int:
    """The layer of a dotted module name inside the package."""
    parts = module.split(".")
    unit = parts[1] if len(parts) > 1 else ""
    for level, units in enumerate(LAYERS):
        if unit in units:
            return level
    if unit in ("", "__init__"):
        return len(LAYERS)  # the package itself sits above everything
    raise KeyError(f"{module}: not in any layer of scripts/check_structure.py")


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import of this package's modules."""
    here = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name.split(".")[0] != PACKAGE:
                continue
            yield node.lineno, name
            for alias in node.names:  # `from . import x` imports a module x
                yield node.lineno, f"{name}.{alias.name}"


def sizes(tree: ast.AST, path: Path, lines: int) -> Iterator[str]:
    if lines > MAX_MODULE_LINES:
        yield f"{path}: module has {lines} lines (at most {MAX_MODULE_LINES})"
    for node in ast.walk(tree):
        span = (node.end_lineno or node.lineno) - node.lineno + 1 if hasattr(node, "lineno") else 0
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and span > MAX_FUNCTION_LINES:
            yield (
                f"{path}:{node.lineno}: function {node.name} has {span} lines "
                f"(at most {MAX_FUNCTION_LINES})"
            )
        if isinstance(node, ast.ClassDef) and span > MAX_CLASS_LINES:
            yield (
                f"{path}:{node.lineno}: class {node.name} has {span} lines "
                f"(at most {MAX_CLASS_LINES})"
            )


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def check(root: Path) -> list[str]:
    problems: list[str] = []
    modules = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text, filename=str(path))
        problems += sizes(tree, path, len(text.splitlines()))
        try:
            level = layer_of(name)
        except KeyError as exc:
            problems.append(str(exc))
            continue
        for line, target in imported_modules(tree, name, path.name == "__init__.py"):
            if target not in modules or target == name:
                continue  # a name imported from a module, not a module itself
            graph[name].add(target)
            if target == PACKAGE:
                continue
            if layer_of(target) > level:
                problems.append(
                    f"{path}:{line}: {name} (layer {level}) imports {target} "
                    f"(layer {layer_of(target)}): imports must go down the layers"
                )
    # Package __init__ files re-export their modules; importing a package means its
    # modules, so the cycle check looks at modules alone.
    plain = {n: {t for t in ts if modules[t].name != "__init__.py"} for n, ts in graph.items()}
    cycle = find_cycle(plain)
    if cycle:
        problems.append("import cycle: " + " -> ".join(cycle))
    return problems


def main(argv: list[str]) -> int:
    root = Path(argv[1] if len(argv) > 1 else Path(__file__).resolve().parents[1] / "src" / PACKAGE)
    problems = check(root)
    for problem in problems:
        print(problem)
    if not problems:
        print(f"{root}: structure ok")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
