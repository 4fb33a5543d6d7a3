"""The package's house rules, checked on its source: every import points the way the layout says, and none circles.

Rooms by kind (README, docs/architecture.md): core <- kernels <- server / client
/ bridge <- cli / tools, with testing used only by tools. Each module's imports,
at the top and inside functions alike, are read with ``ast``; an import of a
room the table does not allow, a third-party package a pure room may not load,
or a circle among modules fails with the lines that break the rule.
"""

from __future__ import annotations

import ast
import re
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
    "client": {"core", "kernels", "client"},
    # The bridge is a daemon beside the relay: it serves its figures with the relay's exposition helpers.
    "bridge": {"core", "kernels", "client", "bridge", "server.exposition"},
    "tools": {"face", "core", "kernels", "server", "client", "bridge", "tools", "testing"},
    "testing": {"core", "kernels", "server", "client", "bridge", "testing"},
    "cli": {"face", "core", "kernels", "server", "client", "bridge", "tools", "cli"},
    "face": {"core", "kernels", "client"},
}

# The package's face beyond ``jitrelay/__init__.py``: modules users import by name (``from jitrelay import records``).
FACE_MODULES = {"jitrelay.records"}

# Third-party packages each room may load; the standard library is always allowed.
THIRD_PARTY: dict[str, set[str]] = {
    "core": {"numpy", "tomli", "tomli_w"},
    "kernels": {"numpy", "numba", "llvmlite"},
    "server": {"numpy", "prometheus_client", "uvloop"},
    "client": {"numpy", "pandas"},  # pandas only inside RecordBatch.to_pandas, an optional extra
    "bridge": {"numpy", "nats", "prometheus_client", "uvloop"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def room(module: str) -> str:
    """The room a module lives in: ``jitrelay.server.engine`` -> ``server``."""
    parts = module.split(".")
    if len(parts) == 1 or module in FACE_MODULES:
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


# --- sizes: one module, one job; a function that fits on a screen ---------------------------------------------------

MAX_MODULE_LINES = 800
MAX_FUNCTION_LINES = 80  # from its first decorator to its last line
# Modules allowed past MAX_MODULE_LINES, each with the reason it must stay whole for now.
LONG_MODULES: dict[str, str] = {}
# Functions allowed past MAX_FUNCTION_LINES ("module.function"), each with its reason.
LONG_FUNCTIONS: dict[str, str] = {}


def functions(module: str) -> list[tuple[str, int, int]]:
    """(qualified name, first line, lines) of every function and method in ``module``."""
    tree = ast.parse(MODULES[module].read_text())
    found = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([child.lineno] + [d.lineno for d in child.decorator_list])
                assert child.end_lineno is not None
                found.append((f"{prefix}{child.name}", start, child.end_lineno - start + 1))
                walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                walk(child, f"{prefix}{child.name}.")

    walk(tree, "")
    return found


def test_no_module_is_longer_than_the_rule_allows() -> None:
    long = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
    over = [f"{m}: {n} lines" for m, n in long.items() if n > MAX_MODULE_LINES and m not in LONG_MODULES]
    assert not over, f"modules over {MAX_MODULE_LINES} lines (split them by job, or justify in LONG_MODULES):\n" + (
        "\n".join(over)
    )
    stale = [m for m in LONG_MODULES if m not in MODULES or long[m] <= MAX_MODULE_LINES]
    assert not stale, f"LONG_MODULES names modules that no longer need it: {stale}"


def test_no_function_is_longer_than_the_rule_allows() -> None:
    found = {f"{m}.{name}": (line, n) for m in MODULES for name, line, n in functions(m)}
    over = [
        f"{name} (line {line}): {n} lines"
        for name, (line, n) in found.items()
        if n > MAX_FUNCTION_LINES and name not in LONG_FUNCTIONS
    ]
    assert not over, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(over)
    stale = [f for f in LONG_FUNCTIONS if f not in found or found[f][1] <= MAX_FUNCTION_LINES]
    assert not stale, f"LONG_FUNCTIONS names functions that no longer need it: {stale}"


# --- docstrings name files that exist ---------------------------------------------------------------------------------

REPOSITORY = PACKAGE.parent
_FILE_NAME = re.compile(r"(?<![\w./-])((?:[\w.-]+/)*[\w-]+\.(?:py|md|toml|ipynb|sh|json))\b")
# Files that docstrings name but that are not this repository's: other projects' sources cited for a design.
FOREIGN_FILES = {"_receivebuffer.py", "_connection.py", "_state.py", "_readers.py", "_writers.py", "asv.conf.json"}


def _exists(name: str) -> bool:
    if "/" in name:
        return any((base / name).exists() for base in (REPOSITORY, PACKAGE, PACKAGE.parent / "docs"))
    return (
        name in FOREIGN_FILES
        or any(
            True
            for folder in ("jitrelay", "tests", "benchmarks", "scripts", "docs", "notebooks")
            for _ in (REPOSITORY / folder).rglob(name)
        )
        or (REPOSITORY / name).exists()
    )


def docstrings(module: str) -> list[tuple[int, str]]:
    """(line, text) of the module's docstring and every class's and function's."""
    tree = ast.parse(MODULES[module].read_text())
    found = []
    for node in [tree, *ast.walk(tree)]:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node, clean=False)
            if text:
                found.append((getattr(node, "lineno", 1), text))
    return found


@pytest.mark.parametrize("module", sorted(MODULES))
def test_docstrings_name_only_files_that_exist(module: str) -> None:
    stale = [
        f"{MODULES[module].relative_to(REPOSITORY)}:{line} names {name}"
        for line, text in docstrings(module)
        for name in _FILE_NAME.findall(text)
        if not _exists(name)
    ]
    assert not stale, "\n".join(stale)


def test_the_size_and_docstring_rules_catch_what_they_are_for() -> None:
    assert not _exists("jitrelay/server/no_such_module.py") and not _exists("no_such_page.md")
    assert _exists("jitrelay/server/engine.py") and _exists("engine.py") and _exists("docs/protocol.md")
    assert _FILE_NAME.findall("see ``kernels/loops.py`` and docs/protocol.md, not x.rs") == [
        "kernels/loops.py",
        "docs/protocol.md",
    ]


# --- the public API explains itself ---------------------------------------------------------------------------------

# Rooms whose public names users build on: the package's face, the pure core, the client, the kernels' face.
PUBLIC_ROOMS = ("face", "core", "client")
PUBLIC_MODULES = ("jitrelay.kernels",)


def undocumented(module: str) -> list[str]:
    """Public classes, functions and methods of ``module`` without a docstring (properties and dunders aside)."""
    tree = ast.parse(MODULES[module].read_text())
    missing = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
            if ast.get_docstring(node) is None:
                missing.append(f"{node.name} (line {node.lineno})")
            if isinstance(node, ast.ClassDef):
                missing += [
                    f"{node.name}.{m.name} (line {m.lineno})"
                    for m in node.body
                    if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))
                    and not m.name.startswith("_")
                    and ast.get_docstring(m) is None
                    and not any(isinstance(d, (ast.Name, ast.Attribute)) for d in m.decorator_list)
                ]
    return missing


@pytest.mark.parametrize("module", sorted(m for m in MODULES if room(m) in PUBLIC_ROOMS or m in PUBLIC_MODULES))
def test_every_public_class_and_function_has_a_docstring(module: str) -> None:
    missing = undocumented(module)
    assert not missing, f"{module}: public names without a docstring:\n" + "\n".join(missing)
