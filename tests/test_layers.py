"""Imports flow one way (docs/development.md, Layout): nothing below the study layer imports `infalign.study`, not
even inside a function, and no module imports one that imports it back (issue 29: 0 import cycles). The trainer, the
models, the method's math and the plumbing run without the research tools."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "infalign"
BELOW_STUDY = ("core", "theory", "models", "trainer", "runtime", "config")


def imported_modules(path: Path, src: Path = SRC) -> list[str]:
    """Every module `path` (a file of the package at `src`) imports, at its top or anywhere inside (relative
    imports resolved)."""
    package = path.relative_to(src.parent).with_suffix("").parts[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            module = ".".join(filter(None, [base, node.module]))
            found += [module, *(f"{module}.{alias.name}" for alias in node.names)]
    return found


@pytest.mark.parametrize("layer", BELOW_STUDY)
def test_nothing_below_the_study_layer_imports_it(layer):
    files = sorted((SRC / layer).rglob("*.py"))
    assert files, f"no modules under {SRC / layer}"
    offenders = {str(f.relative_to(SRC)): m for f in files for m in imported_modules(f)
                 if m == "infalign.study" or m.startswith("infalign.study.")}
    assert not offenders, f"imports of infalign.study below it: {offenders}"


def test_the_scan_finds_lazy_and_relative_imports(tmp_path):
    root = tmp_path / "infalign"
    (root / "trainer").mkdir(parents=True)
    module = root / "trainer" / "x.py"
    module.write_text("def f():\n    from infalign.study import runs\n\nfrom ..study.sweep import summary\n")
    assert {"infalign.study.runs", "infalign.study.sweep.summary"} <= set(imported_modules(module, root))


def import_cycles(src: Path = SRC) -> list[list[str]]:
    """The cycles among the package's modules, function-level imports included: one module list per cycle."""
    files = {".".join(f.relative_to(src.parent).with_suffix("").parts).removesuffix(".__init__"): f
             for f in src.rglob("*.py")}
    graph = {m: {i for i in imported_modules(f, src) if i in files and i != m} for m, f in files.items()}
    index, low, stack, cycles = {}, {}, [], []

    def visit(m: str) -> None:  # Tarjan's strongly connected components
        index[m] = low[m] = len(index)
        stack.append(m)
        for n in graph[m]:
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            component = []
            while (n := stack.pop()) != m:
                component.append(n)
            if component:
                cycles.append(sorted([m, *component]))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    return cycles


def test_no_import_cycles():
    assert not import_cycles(), f"import cycles: {import_cycles()}"


def test_the_cycle_scan_finds_a_lazy_cycle(tmp_path):
    root = tmp_path / "infalign"
    (root / "study").mkdir(parents=True)
    (root / "study" / "a.py").write_text("from infalign.study.b import f\n")
    (root / "study" / "b.py").write_text("def f():\n    from infalign.study import a\n")
    assert import_cycles(root) == [["infalign.study.a", "infalign.study.b"]]
