"""The package's layout: no module of ``patchsvdd`` imports, directly or through others, a module that imports
it back (imports for type checking only do not count: they never run)."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "patchsvdd"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """The ``patchsvdd`` modules ``path`` imports anywhere (functions too), except under ``if TYPE_CHECKING``."""
    tree = ast.parse(path.read_text())
    typing_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and getattr(block.test, "id", "") == "TYPE_CHECKING"
        for statement in block.body
        for node in ast.walk(statement)
    }
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("patchsvdd"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("patchsvdd"))
    return names


def test_no_import_circle() -> None:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {name: {d for d in imported(path) if d in modules and d != name} for name, path in modules.items()}
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as exc:
        raise AssertionError(f"import circle: {' -> '.join(exc.args[1])}") from None


def test_the_experiment_life_cycle_and_the_manifest_import_no_engine() -> None:
    """patchsvdd.experiment drives any engine through an adapter; it and what it uses import none."""
    import subprocess
    import sys

    code = (
        "import sys, patchsvdd.experiment, patchsvdd.federated.manifest, patchsvdd.federated.progress\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'openfl', 'flwr', 'grpc'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr[-2000:]


def third_party(path: Path) -> set[str]:
    """The top-level names of the packages ``path`` imports anywhere (functions too)."""
    tree = ast.parse(path.read_text())
    names = {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    names |= {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    return names


def test_each_engine_is_imported_only_by_its_own_adapter() -> None:
    """flwr only under federated/flower, openfl only under federated/openfl, neither in the other's; the
    engine-neutral site modules import neither."""
    flower, openfl = PACKAGE / "federated" / "flower", PACKAGE / "federated" / "openfl"
    for path in PACKAGE.rglob("*.py"):
        uses = third_party(path)
        assert flower in path.parents or "flwr" not in uses, f"{path.relative_to(PACKAGE)} imports flwr"
        assert openfl in path.parents or "openfl" not in uses, f"{path.relative_to(PACKAGE)} imports openfl"
        if path.stem in ("site_tasks", "site_model", "manifest", "names", "progress", "rounds"):
            assert not uses & {"openfl", "flwr"}, f"{path.relative_to(PACKAGE)} imports an engine"
    for path in flower.glob("*.py"):  # and nothing it imports of the project's imports OpenFL
        for module in imported(path):
            target = PACKAGE.parent / Path(*module.split("."))
            source = target.with_suffix(".py") if target.with_suffix(".py").exists() else target / "__init__.py"
            if source.exists() and flower not in source.parents:
                assert "openfl" not in third_party(source), f"{path.name} imports {module}, which imports openfl"
