"""The package's layers, as stated by the import-linter contract in ``pyproject.toml``:
each folder imports only from the folders below it, nothing hides an import in a
function, and docs/architecture.md names every layer."""

import ast
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mmneurons_utils"
CONTRACT = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
LINT = ("import sys; from importlinter.cli import lint_imports; "
        "sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True))")
# the modules whose functions import: the package's __init__ loads the embedded scenes on first
# use of make_scenes, and tiny/registry.py on first use of load_images' scene source, so importing
# the method never does
LAZY = {"__init__.py", "tiny/registry.py"}


def _lint(root: Path, config: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LINT, str(config)], cwd=root, capture_output=True,
                          text=True, env={"PYTHONPATH": str(root), "PATH": ""})


def test_the_layers_contract_is_kept():
    out = _lint(ROOT, ROOT / "pyproject.toml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 kept, 0 broken" in out.stdout


def test_the_contract_catches_an_upward_import(tmp_path):
    """A copy of the package with one upward import (the model layer importing a widget)."""
    shutil.copytree(PACKAGE, tmp_path / "mmneurons_utils", ignore=shutil.ignore_patterns("weights", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    trace = tmp_path / "mmneurons_utils" / "model" / "trace.py"
    trace.write_text(trace.read_text() + "\nfrom ..widgets import panel\n")
    out = _lint(tmp_path, tmp_path / "pyproject.toml")
    assert out.returncode == 1
    assert "mmneurons_utils.model is not allowed to import mmneurons_utils.widgets" in out.stdout


def test_every_folder_and_top_module_is_a_layer():
    children = {p.stem for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    children |= {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert {name.removeprefix("mmneurons_utils.") for name in CONTRACT["layers"]} == children


def test_the_architecture_page_names_every_layer():
    page = (ROOT / "docs" / "architecture.md").read_text()
    for layer in CONTRACT["layers"]:
        name = layer.removeprefix("mmneurons_utils.")
        assert f"`{name}/`" in page or f"`{name}.py`" in page, name


def test_no_import_is_hidden_in_a_function():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if "weights" in path.parts or rel in LAZY:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and (inner.level or "mmneurons_utils" in (inner.module or "")):
                        offenders.append(f"{rel}:{inner.lineno}")
    assert offenders == []


def test_the_public_surface_is_at_the_top_level():
    code = ("from mmneurons_utils import load_vlm, make_scenes, find_neurons, find_neurons_by_method, "
            "metrics, causal, editing, load_images\n"
            "import inspect\n"
            "assert inspect.signature(metrics.specificity_scores).parameters.keys() >= "
            "{'vlm', 'scenes', 'ident'}\n"
            "assert callable(causal.causal_curves) and callable(editing.edit_token)\n"
            "from mmneurons_utils.cli import main\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "", "OMP_NUM_THREADS": "1"})
    assert out.stdout.strip() == "ok", out.stderr
