"""The package's house rules, checked on its source: every import points the way the layout says, and none circles.

Rooms by kind (README, docs/architecture.md): core <- kernels <- server / client
/ bridge <- cli / tools, with testing used only by tools. Each module's imports,
at the top and inside functions alike, are read with ``ast``; an import of a
room the table does not allow, a third-party package a pure room may not load,
or a circle among modules fails with the lines that break the rule.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import jitrelay

PACKAGE = Path(jitrelay.__file__).resolve().parent

# Which rooms each room may import (itself included).
ALLOWED: dict[str, set[str]] = {
    "core": {"core"},
    "kernels": {"core", "kernels"},
    "server": {"core", "kernels", "server"},
    "client": {"core", "kernels", "client"},  # a package since the shared-memory reader: its modules import each other
    # The bridge is a daemon beside the relay: it serves its figures with the relay's exposition helpers.
    "bridge": {"core", "kernels", "client", "bridge", "server.exposition"},
    "tools": {"face", "core", "kernels", "server", "client", "bridge", "tools", "testing"},
    "testing": {"core", "kernels", "server", "client", "bridge", "testing"},
    "cli": {"face", "core", "kernels", "server", "client", "bridge", "tools", "cli"},
    "face": {"core", "client"},
}

# Third-party packages each room may load; the standard library is always allowed.
THIRD_PARTY: dict[str, set[str]] = {
    "core": {"numpy", "tomli", "tomli_w"},
    "kernels": {"numpy", "numba", "llvmlite"},
    "server": {"numpy", "prometheus_client", "uvloop"},
    "client": {"numpy"},
    "bridge": {"numpy", "nats", "prometheus_client", "uvloop"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def room(module: str) -> str:
    """The room a module lives in: ``jitrelay.server.engine`` -> ``server``."""
    parts = module.split(".")
    if len(parts) == 1:
        return "face"
    if parts[1] in ("cli", "__main__"):
        return "cli"
    return parts[1]


def imports(module: str) -> list[tuple[int, str]]:
    """(line, module) for every import in ``module``: jitrelay modules by full name, others by top-level name."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.append((node.lineno, candidate if candidate in MODULES else base))
    return found


def internal(target: str) -> str | None:
    """The jitrelay module an import names, or None for another package."""
    if target != "jitrelay" and not target.startswith("jitrelay."):
        return None
    while target not in MODULES:
        target = target.rpartition(".")[0]
    return target


def allowed(source: str, target: str) -> bool:
    rooms = ALLOWED[room(source)]
    return room(target) in rooms or any(target == f"jitrelay.{name}" for name in rooms if "." in name)


def test_the_layout_has_every_room() -> None:
    assert {room(m) for m in MODULES} == set(ALLOWED)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_the_way_the_layout_says(module: str) -> None:
    wrong = [
        f"{MODULES[module].relative_to(PACKAGE.parent)}:{line} imports {target} ({room(module)} -> {room(target)})"
        for line, name in imports(module)
        if (target := internal(name)) is not None and not allowed(module, target)
    ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if room(m) in THIRD_PARTY))
def test_pure_rooms_load_only_their_own_third_party_packages(module: str) -> None:
    own = THIRD_PARTY[room(module)]
    wrong = [
        f"{MODULES[module].relative_to(PACKAGE.parent)}:{line} imports {name}"
        for line, name in imports(module)
        if internal(name) is None
        and (top := name.split(".")[0]) not in sys.stdlib_module_names
        and top not in own
        and top != "__future__"
    ]
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_circle_back_to_itself() -> None:
    graph = {m: {t for _, name in imports(m) if (t := internal(name)) is not None and t != m} for m in MODULES}
    circles = []
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                circles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, "\n".join(circles)


def test_the_rules_catch_a_wrong_arrow_and_a_circle() -> None:
    assert not allowed("jitrelay.core.protocol", "jitrelay.kernels")
    assert not allowed("jitrelay.server.metrics", "jitrelay.tools.stats")
    assert not allowed("jitrelay.client", "jitrelay.testing.nats_cluster")
    assert not allowed("jitrelay.bridge.bridge", "jitrelay.server.engine")
    assert allowed("jitrelay.bridge.bridge", "jitrelay.server.exposition")
    assert allowed("jitrelay.tools.soak", "jitrelay.testing.processes")
