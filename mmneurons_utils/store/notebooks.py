"""What a notebook file says about its own run: the defaults of its ``parameters`` cell.

Read as JSON (no kernel, no nbformat), so both the notebook runner and the scorecard (which
attributes a run's tables to the model a notebook ran on) read the same defaults the same way.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path


def parameter_defaults(notebook: dict | str | Path) -> dict:
    """``{name: default}`` of the notebook's cell tagged ``parameters`` (its literal assignments;
    a value that is not a literal reads as ``None``). ``notebook``: a path or the notebook's
    JSON as a dict. ``OSError`` / ``ValueError`` for an unreadable file, ``SyntaxError`` for a
    cell that is not Python."""
    if not isinstance(notebook, dict):
        notebook = json.loads(Path(notebook).read_text(encoding="utf-8"))
    defaults = {}
    for cell in notebook.get("cells", []):
        if cell.get("cell_type") == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            source = cell.get("source", "")
            for node in ast.parse(source if isinstance(source, str) else "".join(source)).body:
                if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                    try:
                        defaults[node.targets[0].id] = ast.literal_eval(node.value)
                    except ValueError:
                        defaults[node.targets[0].id] = None   # not a literal: any value
    return defaults
