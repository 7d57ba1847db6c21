"""Execute every numbered notebook with papermill; collect figures, tables and timings.

    python -m mmneurons_utils.companion.run_notebooks --out outputs
    python -m mmneurons_utils.companion.run_notebooks --out gpu-run -p model llava-hf/llava-1.5-7b-hf -p device cuda -p dtype bfloat16

Executed copies go to ``<out>/notebooks/``; each notebook, given ``output_dir``, writes
its figures as PNG to ``<out>/figures/`` and its tables as CSV to ``<out>/tables/``
(``mmneurons_utils.companion.outputs.Outputs``); per-notebook wall times go to
``<out>/timings.json``; then the paper-claims scorecard (``mmneurons_utils.scorecard``) is
written from the tables to ``<out>/claims.csv`` and ``<out>/claims.md``. Parameters are given as ``-p NAME VALUE`` (as papermill's own
command line) or ``-p NAME=VALUE``; values are read as JSON when they parse (numbers,
booleans, quoted strings), else as plain strings.

Before papermill starts, every ``-p`` name is checked against the notebooks' ``parameters``
cells (a misspelt name is refused, naming the closest) and its value against the default's
type (an integer where the default is one, ≥ 1 where the default is positive; a model an
embedded name, a folder or a hub id; a path parameter an existing path). A notebook that fails
is one line naming the executed copy that holds its traceback (exit 1); bad parameters, an
``--only`` that matches nothing or a missing notebooks folder exit 2 before any folder is made;
Ctrl-C exits 130.

Progress goes to stderr, one bar per notebook (``01_identification: cell 12/31``): on a terminal a
bar that disappears when the notebook is done, elsewhere (a log, CI) a line at most every
``PROGRESS_EVERY_S`` seconds; stdout holds one line per notebook and the summary. Kernels are
started with CurveZMQ transport encryption (jupyter_client's ``KernelManager.transport_encryption
= "auto"``, honoured when the kernel declares it, as ipykernel ≥ 7 does), so they do not warn that
they run over TCP without encryption.

``--refresh`` re-executes the notebooks *in place* with their default parameters and
strips what git should not hold (widget state, papermill's per-cell timestamps): these
stored outputs are what nbval compares in ``python3 tasks.py test``.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
import time
from pathlib import Path

from ..model.vlm import EMBEDDED
from ..store.files import atomic_write_text, os_error_exit_code, os_error_line
from ..store.notebooks import parameter_defaults
from ..scorecard.claims import write_scorecard


class ParameterError(ValueError):
    """A ``-p`` parameter, ``--only`` or notebooks folder that cannot be run (one line)."""


class NotebookFailed(RuntimeError):
    """A notebook raised; the message names its executed copy (which holds the traceback)."""


def _value(text: str):
    try:
        return json.loads(text)            # numbers, booleans, quoted strings
    except json.JSONDecodeError:
        return text                        # bare strings: model ids, paths, devices


def _parameter(words: list[str]) -> tuple[str, object]:
    if len(words) == 1 and "=" in words[0]:
        name, _, value = words[0].partition("=")
    elif len(words) == 2:
        name, value = words
    else:
        raise SystemExit(f"error: -p takes NAME VALUE or NAME=VALUE, got {' '.join(words)!r}")
    if not name or (value == "" and len(words) == 1):   # "NAME VALUE" may set "" (e.g. compare_model)
        raise SystemExit(f"error: -p takes NAME VALUE or NAME=VALUE, got {' '.join(words)!r}")
    return name, _value(value)


PATH_PARAMETERS = ("images", "annotations", "encoder", "bleurt_checkpoint", "model", "compare_model")


def _absolute_paths(parameters: dict) -> dict:
    """Path parameters that name something under the caller's folder, made absolute: each
    notebook runs inside its own folder, where a relative path would point elsewhere."""
    out = dict(parameters)
    for name in PATH_PARAMETERS:
        value = out.get(name)
        if isinstance(value, str) and value and Path(value).exists() and not Path(value).is_absolute():
            out[name] = str(Path(value).resolve())
    return out


def notebook_parameters(path: Path) -> dict:
    """``{name: default}`` of the notebook's ``parameters`` cell (its literal assignments)."""
    return parameter_defaults(path)


MODEL_PARAMETERS = ("model", "compare_model", "pretrained_model")
EXISTING_PATHS = ("images", "annotations", "encoder", "bleurt_checkpoint")


def check_parameters(paths: list[Path], parameters: dict) -> dict:
    """``parameters`` checked against the ``parameters`` cells of the notebooks ``paths`` (see the
    module docstring) and converted to the defaults' types (``-p device 0`` is the string
    ``"0"`` where the default is a string); :class:`ParameterError` naming the first bad one."""
    defaults: dict = {}
    for path in paths:
        for name, value in notebook_parameters(path).items():
            defaults.setdefault(name, value)
    checked = {}
    for name, value in parameters.items():
        if name not in defaults:
            close = difflib.get_close_matches(name, defaults, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ParameterError(f"-p {name}: no notebook run here has a parameter {name!r}; {hint}"
                                 f"parameters: {', '.join(sorted(defaults))}")
        checked[name] = _checked_value(name, value, defaults[name])
    return checked


def _checked_value(name: str, value, default):
    """``value`` as the type of ``default`` (see :func:`check_parameters`)."""
    def bad(expected: str):
        return ParameterError(f"-p {name} expects {expected} (default {default!r}), got {value!r}")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("an integer")
        if value < (1 if default > 0 else 0):
            raise bad("a positive integer" if default > 0 else "a non-negative integer")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise bad("a number")
    elif isinstance(default, list):
        if not isinstance(value, list):
            raise bad("a JSON list, e.g. [1, 10]")
    elif isinstance(default, str):
        if not isinstance(value, str):
            value = json.dumps(value)           # -p device 0: the text as typed
        if name in MODEL_PARAMETERS:
            _check_model(name, value, default)
    if name in EXISTING_PATHS and value and not Path(str(value)).expanduser().exists():
        raise ParameterError(f"-p {name}: {value} does not exist")
    return value


def _check_model(name: str, value: str, default: str) -> None:
    """A model parameter names an embedded model, a folder or a hub id (``""``: skip, where the
    default names one and its comment says so)."""
    if value == "" and name != "model":
        return
    if value in EMBEDDED or Path(value).expanduser().is_dir():
        return
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", value) and not value.startswith((".", "/", "~")):
        return                                   # a hub id (fetched by the notebook when named)
    raise ParameterError(f"-p {name}: unknown model {value!r}; use an embedded model "
                         f"({', '.join(EMBEDDED)}), a checkpoint folder or a hub id such as "
                         "llava-hf/llava-1.5-7b-hf")


PROGRESS_EVERY_S = 30      # without a terminal: a progress line at most this often per notebook


class _Lines:
    """A file for tqdm where no terminal is: each refresh is a line of its own (no carriage
    returns piling up in a log), the same line never twice in a row."""

    def __init__(self, stream):
        self.stream, self.last = stream, None

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line and line != self.last:
            self.stream.write(line + "\n")
            self.last = line

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(name: str, stream=None) -> dict:
    """papermill's ``progress_bar`` (tqdm's keywords) for the notebook ``name``: cells done of all,
    on ``stream`` (stderr); see the module docstring."""
    stream = sys.stderr if stream is None else stream
    tty = getattr(stream, "isatty", lambda: False)()
    if tty:
        return dict(desc=name, file=stream, leave=False, dynamic_ncols=True,
                    bar_format="{desc}: cell {n_fmt}/{total_fmt} {bar} {elapsed}")
    return dict(desc=name, file=_Lines(stream), mininterval=PROGRESS_EVERY_S, ncols=80,
                bar_format="{desc}: cell {n_fmt}/{total_fmt} ({elapsed})")


def kernel_config():
    """Config for the kernel manager papermill's client starts each kernel with: CurveZMQ keys
    provisioned by the manager where the kernel spec declares support (ipykernel ≥ 7 does), so
    the kernel's traffic is encrypted and it does not warn "Kernel is running over TCP without
    encryption" (a kernel without that support runs as before)."""
    from traitlets.config import Config

    return Config({"KernelManager": {"transport_encryption": "auto"}})


def execute(path: Path, copy: Path, **kwargs):
    """``papermill.execute_notebook`` with this runner's progress bar and kernel settings."""
    import papermill as pm

    return pm.execute_notebook(str(path), str(copy), cwd=str(path.parent),
                               progress_bar=progress_bar(path.stem), config=kernel_config(), **kwargs)


def notebook_paths(notebooks: Path, only: list[str] | None = None) -> list[Path]:
    """The numbered notebooks (``NN_name.ipynb``) in order, optionally only those with a prefix."""
    paths = sorted(notebooks.glob("[0-9][0-9]_*.ipynb"))
    if only:
        paths = [p for p in paths if any(p.name.startswith(o) for o in only)]
    return paths


def run_all(notebooks: Path, out: Path, parameters: dict, only: list[str] | None = None,
            kernel_name: str | None = None) -> dict:
    """Run the notebooks in order; returns ``{notebook: seconds, …, "total": seconds}``.

    ``timings.json`` is rewritten after every notebook, so a failed run keeps the times of
    the notebooks that finished; the failing notebook's executed copy (with the error in
    it) is in ``<out>/notebooks/``.
    """
    from papermill.exceptions import PapermillExecutionError

    paths = checked_paths(notebooks, only)       # before any folder is made
    parameters = check_parameters(paths, parameters)
    out = out.resolve()
    for folder in ("notebooks", "figures", "tables"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    timings: dict = {}

    def write():
        timings.pop("total", None)            # keep "total" last
        timings["total"] = round(sum(timings.values()), 1)
        atomic_write_text(out / "timings.json", json.dumps(timings, indent=1) + "\n")

    for path in paths:
        start = time.perf_counter()
        copy = out / "notebooks" / path.name
        try:
            execute(path, copy, parameters={"output_dir": str(out), **parameters}, kernel_name=kernel_name)
        except PapermillExecutionError as exc:
            evalue = " ".join(str(exc.evalue).split())[:300]
            raise NotebookFailed(f"{path.name} failed in cell {exc.exec_count}: {exc.ename}: {evalue}; "
                                 f"its traceback is in {copy}") from None
        finally:
            timings[path.name] = round(time.perf_counter() - start, 1)
            write()
        print(f"{path.name}: {timings[path.name]} s", flush=True)
    return timings


def checked_paths(notebooks: Path, only: list[str] | None = None) -> list[Path]:
    """:func:`notebook_paths`, or :class:`ParameterError` when the folder is missing or nothing
    matches ``only`` (naming what is there)."""
    if not Path(notebooks).is_dir():
        raise ParameterError(f"--notebooks {notebooks} is not a folder"
                             + ("" if Path(notebooks).exists() else " (it does not exist)"))
    paths = notebook_paths(notebooks, only)
    if not paths:
        there = [p.name[:2] for p in notebook_paths(notebooks)]
        raise ParameterError(f"no numbered notebooks (NN_name.ipynb) in {notebooks}"
                             + (f" start with {' or '.join(only)} (there are: {', '.join(there) or 'none'})"
                                if only else ""))
    return paths


def strip_for_git(path: Path) -> int:
    """Remove widget state and papermill's run metadata from a notebook; returns its size in bytes.

    Outputs stay (nbval compares them); widget views stay as views (their state is live-only).
    """
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    nb.metadata.pop("widgets", None)
    nb.metadata.pop("papermill", None)
    for cell in nb.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
    nbformat.write(nb, str(path))
    return path.stat().st_size


def refresh(notebooks: Path, only: list[str] | None = None, kernel_name: str | None = None,
            budget_kb: int = 100) -> dict:
    """Re-execute notebooks in place (default parameters) and strip them for git."""
    paths = notebook_paths(notebooks, only)
    if not paths:
        raise SystemExit(f"no numbered notebooks found in {notebooks}")
    timings = {}
    for path in paths:
        start = time.perf_counter()
        execute(path, path, kernel_name=kernel_name)
        timings[path.name] = round(time.perf_counter() - start, 1)
        size = strip_for_git(path) / 1024
        note = "" if size <= budget_kb else (f"  (over {budget_kb} KB: show figures with "
                                             "Outputs.figure, not plt.show or display of a PIL image)")
        print(f"{path.name}: {timings[path.name]} s, {size:.0f} KB{note}", flush=True)
    return timings


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--notebooks", type=Path, default=Path("notebooks"))
    parser.add_argument("--out", type=Path, default=Path("outputs"))
    parser.add_argument("-p", "--parameter", nargs="+", action="append", default=[],
                        metavar="NAME VALUE", help="papermill parameter for every notebook "
                        "(NAME VALUE or NAME=VALUE), e.g. -p model llava-hf/llava-1.5-7b-hf")
    parser.add_argument("--only", nargs="*", help="notebook name prefixes, e.g. 00 01")
    parser.add_argument("--kernel", default=None, help="Jupyter kernel name (default: the notebook's)")
    parser.add_argument("--refresh", action="store_true",
                        help="re-execute the notebooks in place (default parameters) and strip "
                        "widget state: the stored outputs nbval compares")
    parser.add_argument("--strip", action="store_true",
                        help="only strip widget state and papermill metadata from the notebooks "
                        "(after running them in place yourself)")
    args = parser.parse_args(argv)
    if args.strip:
        for path in notebook_paths(args.notebooks, args.only):
            print(f"{path.name}: {strip_for_git(path) / 1024:.0f} KB")
        return
    if args.refresh:
        if args.parameter:
            raise SystemExit("error: --refresh runs the notebooks' default parameters; drop -p")
        refresh(args.notebooks, args.only, args.kernel)
        return
    try:
        parameters = _absolute_paths(dict(_parameter(words) for words in args.parameter))
    except SystemExit as error:            # a -p that is not NAME VALUE: bad input, exit 2
        print(f"run_notebooks: {error}", file=sys.stderr)
        sys.exit(2)
    try:
        timings = run_all(args.notebooks, args.out, parameters, args.only, args.kernel)
    except ParameterError as error:
        print(f"run_notebooks: error: {error}", file=sys.stderr)
        sys.exit(2)
    except NotebookFailed as error:
        print(f"run_notebooks: error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"run_notebooks: interrupted; the times of the finished notebooks are in "
              f"{args.out / 'timings.json'}: rerun (with --only) to go on", file=sys.stderr)
        sys.exit(130)
    except OSError as error:
        print(f"run_notebooks: error: {os_error_line(error)}", file=sys.stderr)
        sys.exit(os_error_exit_code(error))
    figures = sorted((args.out / "figures").glob("*.png"))
    tables = sorted((args.out / "tables").glob("*.csv"))
    print(f"all notebooks: {timings['total']} s; {len(figures)} figures in {args.out / 'figures'}, "
          f"{len(tables)} tables in {args.out / 'tables'}; times in {args.out / 'timings.json'}")
    try:                                   # the paper-claims scorecard, from the tables just written

        csv_path, md_path = write_scorecard(args.out)
        print(f"claims scorecard: {md_path} and {csv_path}")
    except Exception as error:             # never let the summary hide a finished run
        print(f"claims scorecard not written: {type(error).__name__}: {error}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
