"""The structure docs/architecture.md describes, held by the build: imports at module level
(function-level ones only with a stated reason, at most 20), no package importing the
scheduler entry point, and no module building a broker on import but the composition root."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("worker", "jobs", "monitoring", "db", "sandbox")
MAX_FUNCTION_LEVEL_IMPORTS = 20


def production_files() -> list[Path]:
    return sorted([p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")] + [ROOT / "scheduler.py"])


def _function_level_imports(tree: ast.AST) -> list[ast.stmt]:
    found: list[ast.stmt] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                if in_function:
                    found.append(child)
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                visit(child, True)
            else:
                visit(child, in_function)

    visit(tree, False)
    return found


def test_function_level_imports_are_few_and_explained():
    imports = {}
    for path in production_files():
        source = path.read_text()
        lines = source.splitlines()
        for node in _function_level_imports(ast.parse(source)):
            around = " ".join(lines[max(0, node.lineno - 3):node.end_lineno])
            imports[f"{path.relative_to(ROOT)}:{node.lineno}"] = "#" in around  # a comment says why
    assert len(imports) <= MAX_FUNCTION_LEVEL_IMPORTS, sorted(imports)
    unexplained = sorted(where for where, explained in imports.items() if not explained)
    assert unexplained == [], f"function-level imports without a reason next to them: {unexplained}"


def test_no_package_imports_the_scheduler_entry_point():
    offenders = []
    for path in production_files():
        if path.name == "scheduler.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "scheduler" or n.startswith("scheduler.") for n in names):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_only_the_composition_root_builds_a_broker_at_import():
    builders = []
    for path in production_files():
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only
            for call in ast.walk(node):
                if isinstance(call, ast.Call) and getattr(call.func, "id", getattr(call.func, "attr", "")) in (
                        "setup_broker", "build_broker", "set_broker", "declare_on"):
                    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                        builders.append(str(path.relative_to(ROOT)))
    assert set(builders) == {"jobs/app.py"}


def test_every_imported_package_is_a_declared_dependency():
    import re
    import sys
    import tomllib
    from importlib.metadata import packages_distributions

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[\[<>=!~ ;]", d, maxsplit=1)[0].lower().replace("_", "-")
                for d in project["dependencies"] + project["optional-dependencies"]["embedded"]}
    own = {*PACKAGES, "scheduler"}
    imported: set[str] = set()
    for path in production_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m not in own}
    distributions = packages_distributions()
    undeclared = sorted(m for m in third_party
                        if not {d.lower().replace("_", "-") for d in distributions.get(m, [m])} & declared)
    assert undeclared == []
