"""The package's imports go one way: no module imports another that (through others) imports it back, and no module
imports another's private name. Function-local imports count too, as they are where a cycle used to hide."""

import ast
from pathlib import Path

import qwen_sft

PACKAGE = Path(qwen_sft.__file__).parent


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path, name: str, modules: set[str]):
    """(module imported, name imported or None) for each package import in the file, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top = name.partition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            yield from ((alias.name, None) for alias in node.names if alias.name.partition(".")[0] == top)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.partition(".")[0] != top:
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                yield (submodule, None) if submodule in modules else (source, alias.name)


def import_graph(root: Path) -> tuple[dict[str, set[str]], list[str]]:
    """Each module's package imports, and the private names imported across modules ("a imports b._name")."""
    files = {module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    graph, private = {}, []
    for name, path in files.items():
        graph[name] = set()
        for source, imported in imported_names(path, name, set(files)):
            if source != name:
                graph[name].add(source)
            if imported and imported.startswith("_") and not imported.startswith("__") and source != name:
                private.append(f"{name} imports {source}.{imported}")
    return graph, private


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as the modules along it (the first repeated at the end), or None."""
    done, path = set(), []

    def visit(module: str):
        if module in path:
            return path[path.index(module):] + [module]
        if module in done or module not in graph:
            return None
        path.append(module)
        for target in sorted(graph[module]):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(module)
        return None

    return next(filter(None, map(visit, sorted(graph))), None)


def test_the_package_has_no_import_cycle():
    graph, _ = import_graph(PACKAGE)
    assert "qwen_sft.cli" in graph and "qwen_sft.settings" in graph["qwen_sft.cli"]  # the graph is read at all
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_module_imports_another_modules_private_name():
    _, private = import_graph(PACKAGE)
    assert private == []


FORMER_DATA_MODULES = ("mixing", "sources", "rows", "planning", "preparation", "parquet_rows", "row_reading")


def test_the_data_stage_is_the_mix_sub_package_that_no_other_module_imports():
    """The data stage lives in qwen_sft/mix, one module per step; the rest of the package (training, evaluation)
    never imports it, and none of the former flat data modules is back."""
    graph, _ = import_graph(PACKAGE)
    mix_modules = {name for name in graph if name.startswith("qwen_sft.mix.")}
    assert {"qwen_sft.mix.stage", "qwen_sft.mix.rows", "qwen_sft.mix.sources", "qwen_sft.mix.plan"} <= mix_modules
    assert "qwen_sft.mix.rows" in graph["qwen_sft.mix.drawing"]  # relative imports inside the sub-package are seen
    assert [name for name in graph if not name.startswith("qwen_sft.mix") and graph[name] & mix_modules] == []
    assert [name for name in FORMER_DATA_MODULES if f"qwen_sft.{name}" in graph] == []


def test_a_cycle_hidden_in_a_function_and_a_private_import_are_found(tmp_path):
    """Negative control: the checks above see a function-local import that closes a cycle, and `from .x import _y`,
    also from a sub-package (`from ..x import _y`)."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "low.py").write_text("from .high import _helper\n")
    (package / "high.py").write_text("def load():\n    from pkg import low\n\n\ndef _helper():\n    pass\n")
    (package / "alone.py").write_text("from . import high\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "deep.py").write_text("from ..high import _helper\nfrom . import near\n")
    (package / "sub" / "near.py").write_text("")
    graph, private = import_graph(package)
    assert find_cycle(graph) in (["pkg.high", "pkg.low", "pkg.high"], ["pkg.low", "pkg.high", "pkg.low"])
    assert sorted(private) == ["pkg.low imports pkg.high._helper", "pkg.sub.deep imports pkg.high._helper"]
    assert graph["pkg.sub.deep"] == {"pkg.high", "pkg.sub.near"}
    del graph["pkg.high"]
    assert find_cycle(graph) is None
