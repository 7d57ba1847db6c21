"""Every numbered notebook follows the conventions the runner and nbval rely on."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))
REQUIRED = ("model", "device", "dtype", "seed", "output_dir")
BUDGET_KB = 150   # figures are files; inline copies are compact (mmneurons_utils.companion.outputs)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_conventions(path):
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters' (papermill)"
    names = {line.split("=")[0].strip() for line in tagged[0].source.splitlines()
             if "=" in line and not line.lstrip().startswith("#")}
    assert not set(REQUIRED) - names, f"parameters cell lacks {sorted(set(REQUIRED) - names)}"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), \
        "stored copy not executed: nbval compares stored outputs (python3 tasks.py refresh --only NN)"
    assert "session = start(output_dir" in "\n".join(c.source for c in code), \
        "set up with mmneurons_utils.companion.session.start(output_dir, …): figures and tables " \
        "then go through its Outputs(output_dir)"
    size_kb = path.stat().st_size / 1024
    assert size_kb <= BUDGET_KB, f"{size_kb:.0f} KB stored: show figures with Outputs.figure"
