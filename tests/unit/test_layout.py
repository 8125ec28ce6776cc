"""The package's shape, as README describes it: every import arrow points down.

Module-level imports only (a function may import lazily to keep a start fast; those are
listed in LAZY_UPWARD when they point up on purpose).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "hoshikage_sd"
#: what the launcher's protocol module may import: it runs under python3 -I -S
BUILT_IN = {"_socket", "posix", "time"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool = True) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {i for i in imports(path) if i in modules and i != name}
            for name, path in modules.items()}


def test_no_import_cycle() -> None:
    edges = graph()
    # A package's __init__ may re-export its submodules (manifest does): not a cycle.
    for name, targets in edges.items():
        edges[name] = {t for t in targets if not (name.startswith(t + ".") and
                                                   edges[t] and name in edges[t])}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                cycle = [*path[path.index(target):], target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_the_launcher_protocol_imports_only_built_in_modules() -> None:
    used = {name.split(".")[0] for name in imports(PACKAGE / "protocol.py", False)}
    assert used - {"__future__"} <= BUILT_IN, used - BUILT_IN
    assert set(sys.builtin_module_names) | {"time"} >= BUILT_IN


def test_arrows_point_down() -> None:
    """The speakers of systemd know nothing of the launcher or the router; the policy
    knows nothing of staging, the units' programs or the router; the manifest knows only
    itself."""
    edges = graph()
    rules = {
        "hoshikage_sd.sd": ("hoshikage_sd.model_unit", "hoshikage_sd.router",
                            "hoshikage_sd.policy", "hoshikage_sd.manifest"),
        "hoshikage_sd.policy": ("hoshikage_sd.staging", "hoshikage_sd.model_unit",
                                "hoshikage_sd.router", "hoshikage_sd.watch",
                                "hoshikage_sd.commands", "hoshikage_sd.cache"),
        "hoshikage_sd.manifest": ("hoshikage_sd.policy", "hoshikage_sd.sd",
                                  "hoshikage_sd.runtime", "hoshikage_sd.router",
                                  "hoshikage_sd.model_unit", "hoshikage_sd.resolve"),
    }
    wrong = [f"{name} imports {target}" for name, targets in edges.items()
             for prefix, forbidden in rules.items() if name.startswith(prefix)
             for target in targets if target.startswith(forbidden)]
    assert not wrong, wrong


def test_no_module_is_a_test_or_bench_helper() -> None:
    """The shipped package holds no test helpers (they live in testbed/)."""
    for path in PACKAGE.rglob("*.py"):
        assert not {"pytest", "testbed", "tests"} & {
            i.split(".")[0] for i in imports(path, False)}, path
