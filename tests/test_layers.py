"""Imports run one way: trainable <- search_spaces <- dashboards <- sweeps (a package imports only those to its
left), and no module imports a `__main__` module. Read from the source with ast, function-level imports included,
so a cycle cannot hide inside a function."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("trainable", "search_spaces", "dashboards", "sweeps")
# An entry point (`python -m trainable`) sits above every layer, as the sweeps' scripts do: it may use any.
ENTRY_POINTS = {"trainable/__main__.py"}


def imported_modules(path: Path, repo: Path = REPO) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `path`, relative ones resolved."""
    package = ".".join(path.relative_to(repo).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names
                      if alias.name == "__main__"]
    return found


def layer_violations(repo: Path = REPO) -> list[str]:
    problems = []
    for layer, package in enumerate(LAYERS):
        for path in sorted((repo / package).rglob("*.py")):
            name = path.relative_to(repo).as_posix()
            for line, module in imported_modules(path, repo):
                top = module.split(".")[0]
                if module.endswith("__main__") or ".__main__." in module:
                    problems.append(f"{name}:{line} imports the script module {module}")
                elif top in LAYERS and LAYERS.index(top) > layer and name not in ENTRY_POINTS:
                    problems.append(f"{name}:{line} imports {module}, a layer above {package}")
    return problems


def test_no_package_imports_a_layer_above_it_or_a_main_module():
    assert layer_violations() == []


@pytest.mark.parametrize("package, source, expected", [
    ("trainable", "from sweeps.tracking import connect\n", "imports sweeps.tracking, a layer above trainable"),
    ("dashboards", "def f():\n    import sweeps.runner\n", "imports sweeps.runner, a layer above dashboards"),
    ("sweeps", "from trainable.__main__ import main\n", "imports the script module trainable.__main__"),
    ("sweeps", "from trainable import __main__\n", "imports the script module trainable.__main__"),
])
def test_the_check_finds_an_upward_import_and_a_main_import(tmp_path, package, source, expected):
    for layer in LAYERS:
        (tmp_path / layer).mkdir()
    (tmp_path / package / "module.py").write_text(source)
    [problem] = layer_violations(tmp_path)
    assert problem.startswith(f"{package}/module.py:") and problem.endswith(expected), problem


# --- ARCHITECTURE.md's trial path stays true ---------------------------------------------------------------------

STEP = re.compile(r"^\s*\d+ (\S+\.py)\s")
LEAF = re.compile(r"\b((?:trainable|sweeps|dashboards|search_spaces)/\S+?\.py)\b")
PATH_ENTRY_POINTS = {"sweeps/run_ablation.py", "dashboards/ablation_report.py"}   # run by the user


def trial_path(text: str) -> list[tuple[str, list[str]]]:
    """(step module, its leaves) from the first fenced block under "One ablation trial"."""
    section = text[text.index("## One ablation trial"):]
    block = section.split("```")[1]
    steps: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        if (match := STEP.match(line)):
            steps.append((match.group(1), []))
        elif line.strip() and steps:
            steps[-1][1].extend(LEAF.findall(line))
    return steps


def imported_files(path: Path) -> set[str]:
    """The repository files `path` imports, `from package import module` included."""
    names = {module for _, module in imported_modules(path)}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    files = set()
    for name in names:
        base = REPO / Path(*name.split("."))
        files |= {p.relative_to(REPO).as_posix() for p in (base.with_suffix(".py"), base / "__init__.py")
                  if p.is_file()}
    return files


def test_architecture_trial_path_names_real_modules_each_imported_by_the_step_before():
    steps = trial_path((REPO / "ARCHITECTURE.md").read_text())
    assert 10 <= len(steps) <= 12, [module for module, _ in steps]
    seen: set[str] = set()
    for module, leaves in steps:
        imports = imported_files(REPO / module)
        assert module in PATH_ENTRY_POINTS or module in seen, f"{module}: no earlier step imports it"
        assert [leaf for leaf in leaves if leaf not in imports] == [], f"{module} does not import these leaves"
        seen |= imports
