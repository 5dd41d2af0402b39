"""The package's layers, checked from the modules' own import statements.

graphprune/ is four layers: ir < infra < training < app. A module may import its
own layer and the layers below it, never one above; no module of the core imports
the pass library (``graphprune.passes``, source in passes/) or the package root (the public façade); and there
is no import loop anywhere, counting imports inside functions too.
"""

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "graphprune"
LAYERS = ["ir", "infra", "training", "app"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute, at any depth of its code."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module
            found.add(stem)
            # `from . import x` and `from .pkg import mod` may name modules
            found.update(f"{stem}.{alias.name}" for alias in node.names)
    return found


def core_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[0] == "graphprune" and parts[1] in LAYERS else None


def import_graph() -> nx.DiGraph:
    modules = core_modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        for target in imported_modules(path):
            if target in modules and target != name:
                graph.add_edge(name, target)
    return graph


def test_every_module_belongs_to_a_layer():
    loose = [m for m in core_modules() if m not in ("graphprune", "graphprune.__main__") and layer_of(m) is None]
    assert loose == [], f"modules outside the layers {LAYERS}: {loose}"
    for layer in LAYERS:
        doc = ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text()))
        assert doc and "import" in doc, f"graphprune.{layer} needs a docstring saying what it holds and may import"


def test_layers_import_only_downward():
    upward = []
    for source, target in import_graph().edges:
        if source in ("graphprune", "graphprune.__main__"):
            continue  # the public façade gathers every layer
        if layer_of(target) is None or layer_of(target) > layer_of(source):
            upward.append(f"{source} -> {target}")
    assert upward == []


def test_no_import_loops():
    cycles = list(nx.simple_cycles(import_graph()))
    assert cycles == []


@pytest.mark.parametrize("name", sorted(core_modules()))
def test_core_never_imports_the_pass_library(name):
    imports = imported_modules(core_modules()[name])
    assert not any(i == "graphprune.passes" or i.startswith("graphprune.passes.") for i in imports)


def test_checker_sees_relative_and_function_level_imports(tmp_path):
    # The rule above is only as good as the parser: prove it catches both forms.
    fake = PACKAGE / "ir" / "graph.py"
    found = imported_modules(fake)
    assert "graphprune.ir.checkpoint" in found
    assert "graphprune.ir.checkpoint.read_checkpoint" in found
    cli = imported_modules(PACKAGE / "app" / "cli.py")
    assert "graphprune.training.evaluate" in cli  # imported inside a function
