"""What ``python3 tasks.py run`` / ``test`` print: a progress line per notebook that shows the run
is alive, no kernel warning the user must learn to ignore, and the Chromium plan said first."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_without_a_terminal_is_one_short_line_per_refresh():
    from tqdm import tqdm

    from mmneurons_utils.companion.run_notebooks import progress_bar

    stream = _Stream(tty=False)
    options = progress_bar("01_identification", stream)
    assert options["mininterval"] >= 10                      # a log gets a line now and then
    options["mininterval"] = 0                               # here: every refresh
    with tqdm(total=3, **options) as bar:
        for _ in range(3):
            bar.update(1)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert [line.split(" (")[0] for line in lines] == [f"01_identification: cell {n}/3" for n in range(4)]
    assert all(len(line) < 80 for line in lines)


def test_progress_on_a_terminal_is_a_bar_that_goes_away():
    from mmneurons_utils.companion.run_notebooks import progress_bar

    stream = _Stream(tty=True)
    options = progress_bar("00_setup", stream)
    assert options["file"] is stream and options["leave"] is False and options["desc"] == "00_setup"


@pytest.mark.notebooks
def test_kernels_start_encrypted_and_do_not_warn(tmp_path, capfd):
    """papermill's kernels get CurveZMQ keys from the kernel manager, so ipykernel does not
    print "Kernel is running over TCP without encryption" (once per notebook before)."""
    import nbformat

    from mmneurons_utils.companion.run_notebooks import execute, kernel_config

    assert kernel_config().KernelManager.transport_encryption == "auto"
    path = tmp_path / "99_probe.ipynb"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "from ipykernel.kernelapp import IPKernelApp\n"
        "print(IPKernelApp.instance().curve_secretkey is not None)")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(path))
    done = execute(path, tmp_path / "out.ipynb")
    err = capfd.readouterr().err
    assert "without encryption" not in err, err
    assert done.cells[0].outputs[0]["text"].strip() == "True"        # the kernel's sockets use Curve
    assert "99_probe: cell 1/1" in err


def test_tasks_test_says_first_what_it_does_about_chromium():
    code = ("import os, tasks; tasks.chromium_path = lambda: None; os.geteuid = lambda: 0; "
            "tasks.shutil.which = lambda name: '/usr/bin/' + name; tasks.announce_chromium()")
    run = lambda env: subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                                     text=True, env={"PATH": "/usr/bin:/bin", **env}, check=True).stdout
    will = run({})
    assert "apt-get install -y chromium" in will and "MMNEURONS_NO_APT=1" in will
    skip = run({"MMNEURONS_NO_APT": "1"})
    assert "apt-get install" not in skip and "tests/test_browser.py will be skipped" in skip
