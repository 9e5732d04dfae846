"""The house rules of the package, checked: no module over 250 lines, at most 8 modules at the top
level, imports that never run in a circle, and pb_utils only in the Triton glue."""

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parents[1] / "backends" / "qwen3vl_epd"
MODULES = sorted(PACKAGE.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The package modules this one imports, at any depth of the file (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qwen3vl_epd"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("qwen3vl_epd"))
    names = {module_name(p) for p in MODULES}
    return {n for n in found if n in names}


def test_no_module_is_over_250_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in MODULES if (n := len(p.read_text().splitlines())) > 250}
    assert not long, long


def test_at_most_8_modules_stand_at_the_top_level():
    top = [p.name for p in PACKAGE.glob("*.py")]
    assert len(top) <= 8, top


def test_imports_run_one_way():
    graph = {module_name(p): imports(p) - {module_name(p)} for p in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name, path):
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_only_the_triton_glue_imports_pb_utils():
    def uses(path):
        return any(isinstance(n, ast.Import) and any(a.name == "triton_python_backend_utils" for a in n.names)
                   for n in ast.walk(ast.parse(path.read_text())))

    users = {str(p.relative_to(PACKAGE)) for p in MODULES if uses(p)}
    assert users == {"triton_backend/adapter.py", "triton_backend/metrics.py"}, users
