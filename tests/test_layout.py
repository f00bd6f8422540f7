"""The package's shape: commands are imported by nothing, and the stage subpackages import each
other without cycles (data flows one way)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pricing"
COMMANDS = {"pricing.bench", "pricing.price", "pricing.plan", "pricing.profile", "pricing.quantize"}


def _imports() -> dict[str, set[str]]:
    """Module -> the pricing modules it imports (anywhere in its body, lazy imports included)."""
    edges: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "pricing":
                targets = [f"pricing.{a.name}" for a in node.names] if node.module == "pricing" else [node.module]
                edges[module].update(targets)
            elif isinstance(node, ast.Import):
                edges[module].update(a.name for a in node.names if a.name.split(".")[0] == "pricing")
    return edges


def _room(module: str) -> str:
    """The subpackage a module lives in, or the module itself at the top."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else module


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt, path)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [])):
            return found
    return None


def test_no_module_imports_a_command() -> None:
    offenders = {m: sorted(t & COMMANDS) for m, t in _imports().items() if t & COMMANDS}
    assert not offenders, f"command modules parse arguments and print; move what these use into a stage: {offenders}"


def test_subpackages_import_each_other_without_cycles() -> None:
    rooms: dict[str, set[str]] = defaultdict(set)
    for module, targets in _imports().items():
        rooms[_room(module)].update(_room(t) for t in targets if _room(t) != _room(module))
    assert _cycle(rooms) is None, f"import cycle between subpackages: {' -> '.join(_cycle(rooms) or [])}"
    assert _cycle(_imports()) is None


def _top_level_imports(path: Path) -> set[str]:
    """Top-level packages a module imports when it is imported (its body, not its functions')."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_every_package_imported_at_module_level_is_a_declared_dependency() -> None:
    """A wheel installed with its dependencies must import: scipy was once only a test extra."""
    import re
    import sys
    import tomllib
    from importlib.metadata import PackageNotFoundError, packages_distributions, requires

    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]
    def name(requirement: str) -> str:
        return re.split(r"[<>=!~;\[ (]", requirement, maxsplit=1)[0].lower().replace("_", "-")

    declared = {name(d) for d in project["dependencies"]}
    def brings(dist: str) -> set[str]:  # pydantic brings pydantic-core
        try:
            return {name(r) for r in requires(dist) or () if "extra ==" not in r}
        except PackageNotFoundError:
            return set()

    declared |= {r for d in declared for r in brings(d)}
    dist_of = packages_distributions()
    missing: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        for name in _top_level_imports(path) - {"pricing", "__future__"}:
            if name in sys.stdlib_module_names:
                continue
            dists = {d.lower().replace("_", "-") for d in dist_of.get(name, [name])}
            if not dists & declared:
                missing[name].add(str(path.relative_to(PACKAGE.parent)))
    assert not missing, f"imported at module level but not in [project].dependencies: {dict(missing)}"
