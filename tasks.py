#!/usr/bin/env python3
"""The project's two commands (stdlib only, so a bare Python 3.11 + pip is enough).

    python3 tasks.py run    # set up if needed, execute every notebook → outputs/
    python3 tasks.py test   # set up if needed, run pytest and the notebooks under nbval

Set-up makes ``.venv`` with the CPU build of torch (``torch==2.13.0``) and this
package in editable mode with its notebook and test extras. It is redone only when
``pyproject.toml`` changes. Extra arguments are passed on (to the notebook runner
or to pytest).
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
STAMP = VENV / ".mmneurons-installed"
TORCH_CPU = "torch==2.13.0"


def setup() -> None:
    if not PYTHON.exists():
        print(f"creating {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    if STAMP.exists() and STAMP.stat().st_mtime >= (ROOT / "pyproject.toml").stat().st_mtime:
        return
    pip = [str(PYTHON), "-m", "pip", "install", "--quiet"]
    subprocess.run(pip + [TORCH_CPU], check=True)
    subprocess.run(pip + ["-e", f"{ROOT}[dev,notebooks]"], check=True)
    STAMP.touch()


def main() -> int:
    command, extra = (sys.argv[1] if len(sys.argv) > 1 else ""), sys.argv[2:]
    if command == "run":
        args = ["-m", "mmneurons_utils.run_notebooks", "--notebooks", "notebooks", "--out", "outputs"]
    elif command == "test":
        args = ["-m", "pytest", "tests", "notebooks", "--nbval",
                "--nbval-sanitize-with", "notebooks/nbval_sanitize.cfg"]
    else:
        print(__doc__, file=sys.stderr)
        return 2
    setup()
    return subprocess.run([str(PYTHON), *args, *extra], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
