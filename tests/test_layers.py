"""The floors of docs/ARCHITECTURE.md, checked on every import statement of the package (parsed, not grepped).

cli: agmae.cli.*, may import everything. stages: agmae.discovery, agmae.train, agmae.eval: import their own
stage, agmae.data and the plumbing, never another stage. data: agmae.data, imports itself and the plumbing.
plumbing: every other agmae module (store, checkpoint, paths, distributed, hardware, ...): imports only
the plumbing. A stage can then only break another through the two files between them. Above them all, the
experiment layer (experiments/, run from the repository root, not installed) may import the package; nothing in the
package imports it.
"""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = {"agmae": REPO / "pipeline", "agmae.data": REPO / "data", "agmae.discovery": REPO / "discovery",
           "agmae.train": REPO / "train", "agmae.eval": REPO / "eval", "experiments": REPO / "experiments"}
STAGES = ("agmae.discovery", "agmae.train", "agmae.eval")


def floor(module: str) -> str:
    """'experiments', 'cli', a stage's package name, 'data' or 'plumbing'; '' for modules outside the package."""
    if module == "experiments" or module.startswith("experiments."):
        return "experiments"
    if module != "agmae" and not module.startswith("agmae."):
        return ""
    if module == "agmae.cli" or module.startswith("agmae.cli."):
        return "cli"
    for stage in STAGES:
        if module == stage or module.startswith(stage + "."):
            return stage
    if module == "agmae.data" or module.startswith("agmae.data."):
        return "data"
    return "plumbing"


def allowed(importer: str, imported: str) -> bool:
    mine, theirs = floor(importer), floor(imported)
    if theirs == "experiments" or mine == "experiments":
        return mine == "experiments"
    if theirs == "" or mine == "cli":
        return True
    if mine in STAGES:
        return theirs in (mine, "data", "plumbing")
    if mine == "data":
        return theirs in ("data", "plumbing")
    return theirs == "plumbing"


def modules():
    """(module name, path) of every source file of the package."""
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[0] in ("data", "discovery", "train", "eval") and package == "agmae":
                continue  # not in pipeline/; listed under its own package
            name = ".".join((package, *parts)).removesuffix(".__init__")
            yield name, path


def imported_modules(module: str, path: Path):
    """Every module an import statement of the file names (function-level imports included), with its line."""
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join([*anchor, base] if base else anchor)
            yield base, node.lineno
            for alias in node.names:  # `from agmae import train` imports the module agmae.train
                candidate = f"{base}.{alias.name}"
                if floor(candidate) not in ("", "plumbing") or candidate.startswith(("agmae.cli", "experiments")):
                    yield candidate, node.lineno


def test_every_package_module_is_found():
    names = dict(modules())
    assert {"agmae", "agmae.store", "agmae.cli.train", "agmae.train.engine", "agmae.eval.knn",
            "agmae.discovery.tokencut", "agmae.data.folder", "experiments.plan", "experiments.steps"} <= set(names)


def test_no_import_crosses_a_floor_the_rule_forbids():
    violations = [f"{path.relative_to(REPO)}:{line}: {module} ({floor(module)}) imports {imported} ({floor(imported)})"
                  for module, path in modules() for imported, line in imported_modules(module, path)
                  if not allowed(module, imported)]
    assert violations == []


@pytest.mark.parametrize("importer, imported, ok", [
    ("agmae.cli.train", "agmae.train.engine", True),
    ("agmae.train.engine", "agmae.store", True),
    ("agmae.train.engine", "agmae.data.folder", True),
    ("agmae.train.engine", "agmae.eval.knn", False),
    ("agmae.eval.features", "agmae.cli.eval", False),
    ("agmae.store", "agmae.data.folder", False),
    ("agmae.data.demo", "agmae.paths", True),
    ("agmae.data.demo", "agmae.discovery.oracle", False),
    ("experiments.plan", "agmae.train.config", True),
    ("experiments.demo", "experiments.steps", True),
    ("agmae.cli.train", "experiments.plan", False),
    ("agmae.eval.report", "experiments.results", False),
    ("agmae.paths", "experiments", False),
])
def test_the_rule_itself(importer, imported, ok):
    assert allowed(importer, imported) is ok


def test_a_forbidden_function_level_import_is_caught(tmp_path):
    source = tmp_path / "engine.py"
    source.write_text("def f():\n    from agmae.eval import knn\n    from ..eval.linear import x\n")
    found = list(imported_modules("agmae.train.engine", source))
    assert ("agmae.eval.knn", 2) in found and ("agmae.eval.linear", 3) in found
    assert not all(allowed("agmae.train.engine", name) for name, _ in found)
