"""The house's layers: every import in the package (module-level and inside functions) points down, no folder
and no file imports itself back, and the config schema loads without torch or transformers."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "hsa_train"

# Bottom to top; a unit is a sub-package or a top-level module. An import may only reach its own unit or one below.
LAYERS = [
    ["types", "assets"],
    ["model"],
    ["data"],
    ["config"],
    ["agent"],
    ["training"],
    ["overrides", "sweep", "inspect", "generate", "diagnose", "serve", "rollout", "__main__", "(package)"],
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("hsa_train", *path.relative_to(PACKAGE).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _targets(module: str, path: Path, node: ast.AST, modules: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        if node.level:
            base = base[: len(base) - node.level + 1]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names]
    out = []
    for name in names:
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        if name in modules and name != module:
            out.append(name)
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports, at module level or inside functions (a package's own
    `__init__` is not counted as imported by its sub-modules: Python runs it, but they do not name it)."""
    modules = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[module].update(_targets(module, path, node, modules))
        graph.setdefault(module, set())
    return dict(graph)


def unit(module: str) -> str:
    parts = module.split(".")
    return "(package)" if len(parts) == 1 else parts[1]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_file_imports_itself_back():
    assert cycles(import_graph()) == []


def test_no_folder_imports_itself_back():
    folders: dict[str, set[str]] = defaultdict(set)
    for module, targets in import_graph().items():
        folders[unit(module)].update(unit(t) for t in targets if unit(t) != unit(module))
    assert cycles(dict(folders)) == []


def test_every_import_points_down_the_layers():
    level = {name: k for k, names in enumerate(LAYERS) for name in names}
    graph = import_graph()
    assert set(map(unit, graph)) <= set(level), f"units with no layer: {set(map(unit, graph)) - set(level)}"
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        if level[unit(target)] > level[unit(module)]
    )
    assert upward == []


def test_only_the_entry_point_imports_the_package_inside_functions():
    """An import of our own modules inside a function would hide an edge from a reader (and once hid cycles):
    only `python -m hsa_train` defers torch and training until its config is known to be good."""
    modules = _modules()
    nested = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top:
                nested += [f"{module} -> {t}" for t in _targets(module, path, node, modules)]
    assert nested and all(line.startswith("hsa_train.__main__ -> hsa_train.training.") for line in nested), nested


def test_the_cycle_finder_finds_a_cycle():
    """The checks above are only as good as this: a two-node and a three-node cycle, and a DAG."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []
    graph = import_graph()
    assert "hsa_train.types" in graph["hsa_train.config"]  # nested and module-level imports are both read
    assert len(graph) > 40


def test_the_config_schema_imports_neither_torch_nor_transformers():
    code = (
        "import sys; import hsa_train.config, hsa_train.types, hsa_train.model.settings; "
        "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
