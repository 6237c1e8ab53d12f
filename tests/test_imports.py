"""kdcore's import graph: the config and the names without torch, no import circles."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (nothing imported yet), from the repository root."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("module", ["kdcore", "kdcore.config", "kdcore.names", "kdcore.atomic",
                                    "kdcore.images"])
def test_module_imports_without_torch(module):
    done = _run(f"import sys, {module}; sys.exit('torch' in sys.modules)")
    assert done.returncode == 0, done.stderr or f"importing {module} imported torch"


def test_package_names_import_on_first_use():
    done = _run("import sys, kdcore\n"
                "assert 'torch' not in sys.modules\n"
                "from kdcore import TrialConfig, fit, load_data\n"
                "import kdcore.config, kdcore.data, kdcore.train\n"
                "assert TrialConfig is kdcore.config.TrialConfig and fit is kdcore.train.fit\n"
                "assert load_data is kdcore.data.load_data and 'fit' in dir(kdcore)\n")
    assert done.returncode == 0, done.stderr


def test_jpegpack_does_not_import_the_loader():
    """The image-file pieces live in kdcore.images: kdcore.jpegpack needs nothing of data."""
    done = _run("import sys, kdcore.jpegpack; sys.exit('kdcore.data' in sys.modules)")
    assert done.returncode == 0, done.stderr or "kdcore.jpegpack imported kdcore.data"


@pytest.mark.parametrize("module", ["search.study", "search.commands.cli", "search.store.files"])
def test_search_light_modules_import_neither_torch_nor_ray(module):
    """The study config (and the command line's parser) load without the training stack."""
    done = _run(f"import sys, {module}; sys.exit(sorted({{'torch', 'ray'}} & set(sys.modules)) "
                "or 0)")
    assert done.returncode == 0, done.stderr or f"importing {module} imported {done.stdout}"


def test_search_has_no_import_circles():
    """Every import between search's modules, at module level or inside a function, points
    one way (no cycle), so the folders' order says which way they depend."""
    import ast

    graph: dict[str, set[str]] = {}
    for path in (REPO / "search").rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts).removesuffix(".__init__")
        package = ".".join(parts[:-1])
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{up}.{base}" if base else up
                deps |= {base} | {f"{base}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[name] = deps
    modules = set(graph)
    for name, deps in graph.items():
        graph[name] = {d for d in deps if d in modules and d != name
                       and not name.startswith(f"{d}.")}  # a module's own package: not a cycle

    def visit(node: str, stack: tuple[str, ...]) -> None:
        assert node not in stack, " -> ".join((*stack, node))
        for dep in sorted(graph.get(node, ())):
            visit(dep, (*stack, node))

    for module in sorted(graph):
        visit(module, ())


def test_the_two_copies_of_the_names_agree():
    """``analysis`` imports no kdcore, so it keeps its own copy of the names (README,
    departures): the groups, terms and searchable parameters must be kdcore's."""
    import analysis.constants as tables
    import kdcore.names as names
    from kdcore.config import TrialConfig

    assert tables.GROUPS == names.GROUPS and tables.TERMS == names.TERMS
    fields = {f for f in TrialConfig.__dataclass_fields__}
    assert set(tables.PARAMS) <= fields and {f"w_{t}" for t in names.TERMS} <= set(tables.PARAMS)
