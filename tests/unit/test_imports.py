"""The house's arrows point down: no import cycle in exp, and training never imports the command-line tools."""

import ast
from pathlib import Path

from ..conftest import ROOT

PACKAGE = ROOT / "exp"
# Command-line tools over a run's results: a run must not need them (nor the CLI layer above it).
CLI_MODULES = ("exp.job", "exp.report", "exp.sweep", "exp.export", "exp.generate", "exp.repeat", "exp.eval.cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str], name: str | None = None) -> set[str]:
    """Every exp module `path` (module `name`) imports, at module level or inside a function: a lazy import
    is still an arrow."""
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x / from .y import z
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # exp.checkpoint.Checkpointer -> exp.checkpoint
                target = target.rpartition(".")[0]
            if target.startswith("exp") and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    # a package's __init__ re-exporting its submodules is not a cycle; a submodule importing its package is
    return {module_name(p): imports_of(p, modules) for p in paths}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def reachable(edges: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in edges.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def test_exp_has_no_import_cycle():
    assert cycles(graph()) == []


def test_a_run_does_not_import_the_command_line_tools():
    edges = graph()
    reached = reachable(edges, "exp.run")
    assert not {m for m in reached if m.startswith(CLI_MODULES)}, sorted(reached)
    # and only the CLI layer imports the run
    assert {m for m, targets in edges.items() if "exp.run" in targets} <= {"exp.job"}


def test_the_walk_finds_cycles_and_lazy_imports(tmp_path):
    # the checks have teeth: a cycle through a function-level import is one
    edges = {"exp.a": {"exp.b"}, "exp.b": {"exp.a"}, "exp.c": set()}
    assert cycles(edges) == [["exp.a", "exp.b"]]
    (tmp_path / "mod.py").write_text("def f():\n    from exp.run import train\n")
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    assert "exp.run" in imports_of(tmp_path / "mod.py", modules, name="exp.mod")


def test_no_function_in_exp_is_over_100_lines():
    """A function a reader must hold in mind at once stays short; create_app was 506 lines once."""
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 100:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
