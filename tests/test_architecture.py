"""The shape of the package: its modules import one another one way (no import cycle), whatever level the import
is written at. A function-level import that only dodges a cycle still counts here: put the shared piece below both."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "peftlab"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _skipped(node: ast.If) -> bool:
    """`if TYPE_CHECKING:` (annotations only) and `if __name__ == "__main__":` (a script's alias) import nothing at run time."""
    test = node.test
    if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING" or isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING":
        return True
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators))


def _imports(node: ast.AST):
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _skipped(child):
            yield from (i for n in child.orelse for i in _imports_of(n))
            continue
        yield from _imports_of(child)


def _imports_of(node: ast.AST):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    yield from _imports(node)


def import_graph() -> dict[str, set[str]]:
    """module -> the peftlab modules it imports (module level or inside functions)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.level and node.module else base if node.level else node.module
                # `from .pkg import name`: name is a submodule when such a file exists, else an attribute of pkg
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for target in targets:
                while target and target not in files:  # `import peftlab.x.y` of an attribute: its module
                    target = target.rpartition(".")[0]
                if target and target != mod and target.split(".")[0] == "peftlab":
                    graph[mod].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None. A package's __init__ importing its own submodules is not one
    (Python loads the package first), but a submodule importing back into its package's __init__ is followed."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if n.startswith(m + "."):  # package -> its own submodule
                continue
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert {"peftlab.cli", "peftlab.run", "peftlab.train", "peftlab.rundir"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_graph_sees_function_level_imports():
    """The check would be blind if it read only module-level imports: cli imports run inside cmd_train."""
    graph = import_graph()
    assert "peftlab.run" in graph["peftlab.cli"] and "peftlab.cli" not in graph["peftlab.run"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_entry_points_go_one_way():
    """`python -m peftlab` is the CLI; `python -m peftlab.run` stays an alias of `python -m peftlab train`."""
    for module in ("peftlab", "peftlab.run"):
        proc = subprocess.run([sys.executable, "-m", module, *([] if module == "peftlab.run" else ["train"]), "--help"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and "--launch PRESET" in proc.stdout, proc.stderr[-2000:]
