"""Docs that cannot drift: README.md and docs/*.md checked against the code and results/.

Rules (each a test below; the helpers take a text so that tests can feed them a bad page):

* **paths** — a backticked path that starts at the repository (``mmneurons_utils/…``, ``tests/…``,
  ``notebooks/…``, ``docs/…``, ``results/…``, ``.ci/…``, ``pyproject.toml``, ``tasks.py``,
  ``environment.yml``), a package-relative ``.py`` path (``model/vlm.py``) or a bare module file
  (``trace.py``) exists; ``<placeholder>`` and ``*`` parts must match at least one file.
* **modules and names** — a backticked dotted ``mmneurons_utils.x.y`` resolves (module, then
  attributes). A backticked ``a.b…`` (optionally called, ``a.b(…)``) whose first part is the short name
  of a package module (``scoring``, ``metrics``, ``files``) or a public name the package defines
  (``VLM``, ``Edit``) resolves through ``getattr``, or, on a class, is an attribute its source sets on
  ``self``. A backticked call of a snake_case name (``find_neurons(…)``) names a function, class or
  method the package defines (a few formula names such as ``down_proj`` excepted). Import lines of
  ```` ```python ```` blocks are executed.
* **commands** — every ``mmneurons <sub> --flag``, ``python -m mmneurons_utils.<module> --flag`` and
  ``python3 tasks.py <command>`` in a code block or an inline code span names a subcommand and flags
  that its ``--help`` lists (each help text built once per session, in process).
* **links** — every relative markdown link and image exists (anchors stripped).
* **numbers** — outside fenced code blocks and command spans, every number with a decimal point or of
  four or more digits appears in a file under ``results/`` (exactly, or as the rounding of a longer
  number there) or is in :data:`ALLOWED`, whose entries say why and are themselves checked against the
  code. Versions and addresses (two or more dots) and numbers glued to a word (``LLaVA-1.5``,
  ``Qwen2.5``, ``L3.741``) are names, not quantities.
* **no test counts** — the docs do not say how many tests there are.
* **layers** — the arrow line in docs/architecture.md is the import-linter contract's order.
* **the README's example** — its Python block runs as written on tiny-llava.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import io
import json
import pkgutil
import re
import shlex
import subprocess
import sys
import tomllib
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mmneurons_utils"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
SPAN = re.compile(r"`([^`\n]+(?:\n[^`\n]+)?)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
NUMBER = re.compile(r"(?<![\w.\-/=<>~^@#$])(\d[\d,.]*\d|\d)(?![\w\-]|\.\d)")
FILE_SUFFIX = re.compile(r"\.(py|md|json|csv|png|toml|cfg|ipynb|parquet|html|yml|yaml|safetensors|pt|txt|npy)$")
REPO_ROOTS = ("mmneurons_utils/", "tests/", "notebooks/", "docs/", "results/", ".ci/")
REPO_FILES = ("pyproject.toml", "tasks.py", "environment.yml", "README.md")
FORMULA_NAMES = {"down_proj", "act_fn", "gate_proj", "up_proj"}


def _source(path: str, needle: str) -> bool:
    text = (ROOT / path).read_text(encoding="utf-8")
    return needle.replace(",", "") in text.replace("_", "").replace(",", "")


def _config(key: str) -> int:
    text = json.loads((PACKAGE / "tiny/weights/smol-llava/config.json").read_text())["text_config"]
    return text[key]


def _attribute(module: str, name: str):
    return getattr(importlib.import_module(module), name)


# Definitional constants the docs may quote without a results file: why, and the check that the
# code still says so. Keep it short: a measurement belongs in results/.
ALLOWED = {
    "49152": ("smol-llava's (SmolLM2's) vocabulary", lambda: _config("vocab_size") == 49152),
    "46080": ("smol-llava's candidate units, 30 layers × 1,536",
              lambda: _config("num_hidden_layers") * _config("intermediate_size") == 46080),
    "1536": ("smol-llava's units per layer", lambda: _config("intermediate_size") == 1536),
    "10000": ("the first training seed; lower seeds are held out",
              lambda: _attribute("mmneurons_utils.tiny.scenes", "TRAIN_SEED_BASE") == 10000),
    "100000": ("the --scenes cap", lambda: _attribute("mmneurons_utils.cli", "MAX_SCENES") == 100000),
    "0.01": ("chance 10 / V below which random units are no baseline (scorecard rule 2)",
             lambda: _attribute("mmneurons_utils.scorecard.claims", "CHANCE_NEGLIGIBLE") == 0.01),
    "3.10": ("the oldest Python the package supports", lambda: _source("pyproject.toml", '">=3.10"')),
    "2023": ("a citation year (Schwettmann et al. 2023)", lambda: True),
    "2024": ("a citation year (Pan et al. 2024)", lambda: True),
}


# --------------------------------------------------------------------------- parsing a page

def split(text: str) -> tuple[list[tuple[str, str]], str]:
    """``(fenced blocks as (language, code), the prose with the blocks blanked out)``."""
    blocks = [(m[1].lower(), m[2]) for m in FENCE.finditer(text)]
    prose = FENCE.sub(lambda m: "\n" * m[0].count("\n"), text)
    prose = re.sub(r"<!--.*?-->", " ", prose, flags=re.S)
    return blocks, prose


def spans(prose: str) -> list[str]:
    return [" ".join(m[1].split()) for m in SPAN.finditer(prose)]


def is_command(span: str) -> bool:
    return bool(re.search(r"(^|[\s/])mmneurons(\s|$)|-m mmneurons_utils\.|tasks\.py\s", span))


# --------------------------------------------------------------------------- paths and names

@functools.cache
def modules() -> dict[str, object]:
    """Every module of the package by dotted name (imported once)."""
    found = {"mmneurons_utils": importlib.import_module("mmneurons_utils")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for info in pkgutil.walk_packages([str(PACKAGE)], "mmneurons_utils."):
            if info.name.endswith("__main__"):
                continue
            found[info.name] = importlib.import_module(info.name)
    return found


@functools.cache
def short_names() -> dict[str, list[object]]:
    names: dict[str, list[object]] = {}
    for dotted, module in modules().items():
        names.setdefault(dotted.rsplit(".", 1)[-1], []).append(module)
    return names


@functools.cache
def defined() -> dict[str, list[object]]:
    """Public functions and classes the package defines, by name, and their methods' names."""
    names: dict[str, list[object]] = {}
    for dotted, module in modules().items():
        for name, value in vars(module).items():
            if name.startswith("_") or getattr(value, "__module__", None) != dotted:
                continue
            if inspect.isclass(value) or inspect.isfunction(value):
                names.setdefault(name, []).append(value)
            if inspect.isclass(value):
                for attr in vars(value):
                    if not attr.startswith("_"):
                        names.setdefault(attr, []).append(getattr(value, attr, None))
    return names


def _resolves(obj, parts: list[str]) -> bool:
    for part in parts:
        if hasattr(obj, part):
            obj = getattr(obj, part)
        elif inspect.isclass(obj) and _sets_on_self(obj, part):
            return part is parts[-1]
        else:
            return False
    return True


def _sets_on_self(cls, name: str) -> bool:
    for klass in cls.__mro__:
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        if re.search(rf"self\.{name}\s*(:[^=\n]+)?=", source) or re.search(rf"^\s+{name}\s*:", source, re.M):
            return True
    return False


def _glob(relative: str, base: Path) -> bool:
    pattern = re.sub(r"<[^>]+>", "*", relative)
    if "*" in pattern:
        return any(base.glob(pattern.rstrip("/")))
    return (base / pattern).exists()


def path_problem(span: str) -> str | None:
    """Why a backticked path does not exist (``None``: it does, or it is no repository path)."""
    if " " in span or "…" in span or "://" in span:
        return None
    if span.startswith(REPO_ROOTS) or span in REPO_FILES:
        return None if _glob(span, ROOT) else f"no such path: {span}"
    first = span.split("/", 1)[0]
    if "/" in span and span.endswith(".py") and (PACKAGE / first).is_dir():
        return None if _glob(span, PACKAGE) else f"no such module file: mmneurons_utils/{span}"
    if re.fullmatch(r"\w+\.py", span):
        hits = list(PACKAGE.rglob(span)) + list(ROOT.glob(span)) + list((ROOT / "tests").glob(span))
        return None if hits else f"no such module file: {span}"
    return None


def name_problem(span: str) -> str | None:
    """Why a backticked dotted name or call does not resolve (``None``: it does, or it is not ours)."""
    if FILE_SUFFIX.search(span):
        return None
    match = re.fullmatch(r"([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)(\(.*\))?", span)
    if not match:
        return None
    parts = match[1].split(".")
    if parts[0] in FORMULA_NAMES:
        return None
    if parts[0] == "mmneurons_utils":
        for cut in range(len(parts), 0, -1):
            dotted = ".".join(parts[:cut])
            if dotted in modules():
                return None if _resolves(modules()[dotted], parts[cut:]) else f"does not resolve: {span}"
        return f"no such module: {span}"
    if len(parts) == 1:
        if match[2] is None or "_" not in parts[0] or parts[0] in FORMULA_NAMES:
            return None
        return None if parts[0] in defined() else f"the package defines no {parts[0]}: {span}"
    candidates = short_names().get(parts[0], []) + defined().get(parts[0], [])
    top = getattr(modules()["mmneurons_utils"], parts[0], None)
    if top is not None:
        candidates.append(top)
    if not candidates:
        return None                       # not ours (ot.emd, PIL.Image.MAX_IMAGE_PIXELS, …)
    if any(_resolves(c, parts[1:]) for c in candidates):
        return None
    return f"does not resolve: {span}"


def import_lines(code: str) -> list[str]:
    return [line.strip() for line in code.splitlines()
            if re.match(r"\s*(from mmneurons_utils[\w.]* import |import mmneurons_utils)", line)]


# --------------------------------------------------------------------------- commands

@functools.cache
def help_text(program: str, sub: str | None = None) -> str | None:
    """``--help`` of ``mmneurons <sub>`` (``program`` ``"cli"``) or of ``python -m <program>``,
    built in process; ``None`` when there is no such subcommand or module."""
    if program in ("cli", "mmneurons_utils.cli"):
        from mmneurons_utils.cli import build_parser

        parser = build_parser()
        if sub is None:
            return parser.format_help()
        choices = next(a.choices for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
        return choices[sub].format_help() if sub in choices else None
    if program == "tasks.py":
        source = (ROOT / "tasks.py").read_text()
        return source if sub is None or f'command == "{sub}"' in source else None
    module = _module_or_none(program)
    if module is None:
        return None
    runs = Path(module.__file__)
    if runs.name == "__init__.py":
        runs = runs.with_name("__main__.py")
        if not runs.is_file():
            return None
    source = runs.read_text(encoding="utf-8")
    alias = re.search(r'"-m", "mmneurons_utils\.cli", "([\w-]+)"', source)
    if alias:                                   # an old entry point that becomes ``mmneurons <sub>``
        return help_text("cli", alias[1])
    helper = re.search(r"from (\.[\w.]*) import main\b", source)
    main = getattr(module, "main", None)
    if runs.name == "__main__.py":
        main = getattr(importlib.import_module(helper[1], program), "main", None) if helper else None
    if main is None:
        run = subprocess.run([sys.executable, "-m", program, "--help"], capture_output=True, text=True,
                             cwd=ROOT, timeout=300)
        return run.stdout + run.stderr
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            main(["--help"])
    except SystemExit:
        pass
    return out.getvalue()


def _module_or_none(dotted: str):
    try:
        return importlib.import_module(dotted)
    except ImportError:
        return None


def invocations(line: str) -> list[tuple[str, str | None, list[str]]]:
    """``(program, subcommand, flags)`` of each package command in a shell line."""
    line = re.split(r"\s(?:#|>|&&|\|\||;)\s", " " + line + " ")[0]
    try:
        tokens = shlex.split(line)
    except ValueError:
        tokens = line.split()
    found = []
    for i, token in enumerate(tokens):
        rest = tokens[i + 1:]
        if token == "mmneurons" or token.endswith("/mmneurons"):
            program, sub, rest = "cli", (rest[0] if rest else None), rest[1:]
        elif token == "-m" and rest and rest[0].startswith("mmneurons_utils"):
            program, rest = rest[0], rest[1:]
            sub = None
            if program == "mmneurons_utils.cli":
                program, sub, rest = "cli", (rest[0] if rest else None), rest[1:]
        elif token.endswith("tasks.py") and rest:
            program, sub, rest = "tasks.py", rest[0], rest[1:]
        else:
            continue
        if sub is not None and sub.startswith("-"):
            rest, sub = [sub, *rest], None
        flags = [t.split("=", 1)[0] for t in rest if re.fullmatch(r"--?[A-Za-z][\w-]*(=.*)?", t)]
        found.append((program, sub, flags))
        break
    return found


def command_problems(program: str, sub: str | None, flags: list[str]) -> list[str]:
    if "<" in program:
        return []                                    # a placeholder: mmneurons_utils.<module>
    if sub is not None and ("<" in sub or "…" in sub):
        return []                                    # a placeholder: mmneurons <sub> --flag
    subs = [None] if sub is None else sub.split("|")
    problems = []
    for one in subs:
        text = help_text(program, one)
        name = f"{'mmneurons' if program == 'cli' else program} {one or ''}".strip()
        if text is None:
            problems.append(f"no such command: {name}")
            continue
        if program == "tasks.py":
            if one in ("run", "refresh"):            # its extra arguments go to the notebook runner
                text = help_text("mmneurons_utils.companion.run_notebooks")
            else:
                continue                              # test: pytest's own flags
        for flag in flags:
            if flag in ("-h", "--help") or not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text):
                if flag not in ("-h", "--help"):
                    problems.append(f"{name}: no flag {flag}")
    return problems


def page_commands(text: str) -> list[tuple[str, str | None, list[str]]]:
    blocks, prose = split(text)
    lines = [s for s in spans(prose) if is_command(s)]
    for language, code in blocks:
        if language in ("", "bash", "sh", "shell", "console"):
            lines += code.replace("\\\n", " ").splitlines()
    return [inv for line in lines for inv in invocations(line)]


# --------------------------------------------------------------------------- numbers

@functools.cache
def result_numbers() -> tuple[frozenset[str], dict[int, frozenset[float]]]:
    exact, values = set(), []
    for path in sorted((ROOT / "results").rglob("*")):
        if not path.is_file() or path.suffix not in (".md", ".json", ".csv"):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for token in re.findall(r"-?\d[\d,]*(?:\.\d+)?(?:e-?\d+)?", text):
            plain = token.replace(",", "").lstrip("-")
            exact.add(plain)
            try:
                values.append(float(plain))
            except ValueError:
                pass
    rounded = {d: frozenset(round(v, d) for v in values) for d in range(1, 5)}
    return frozenset(exact), rounded


def quoted_numbers(text: str) -> list[str]:
    """The numbers a page quotes that need a source: decimals, or four or more digits."""
    _, prose = split(text)
    prose = LINK.sub(" ", prose)
    prose = re.sub(r"https?://\S+", " ", prose)
    prose = SPAN.sub(lambda m: " " if is_command(m[1]) else m[0], prose)
    found = []
    for match in NUMBER.finditer(prose):
        token = match[1].rstrip(".,")
        if token.count(".") > 1:
            continue                            # a version or an address
        plain = token.replace(",", "")
        if "." in plain or len(plain) >= 4:
            found.append(plain)
    return found


def number_problem(plain: str) -> str | None:
    if plain in ALLOWED:
        return None
    exact, rounded = result_numbers()
    if plain in exact:
        return None
    if "." in plain:
        decimals = len(plain.split(".")[1])
        if decimals in rounded and float(plain) in rounded[decimals]:
            return None
    return f"{plain} is in no file under results/ and not in ALLOWED"


# --------------------------------------------------------------------------- the checks

def problems(text: str, page: Path = ROOT / "README.md") -> list[str]:
    """Every problem of one page's text (``page`` locates its relative links)."""
    blocks, prose = split(text)
    found = []
    for span in spans(prose):
        if is_command(span):
            continue
        found += [p for p in (path_problem(span), name_problem(span)) if p]
    for target in LINK.findall(prose):
        if re.match(r"(https?|mailto):", target) or target.startswith("#"):
            continue
        if not (page.parent / target.split("#", 1)[0]).exists():
            found.append(f"broken link: {target}")
    for program, sub, flags in page_commands(text):
        found += command_problems(program, sub, flags)
    found += [p for p in map(number_problem, quoted_numbers(text)) if p]
    for claim in re.findall(r"\b\d[\d,]* (?:tests|passed|failed)\b", prose):
        found.append(f"a test count: {claim!r}")
    for language, code in blocks:
        if language == "python":
            for line in import_lines(code):
                try:
                    exec(line, {})
                except Exception as error:            # noqa: BLE001 - any failure is the finding
                    found.append(f"{line}: {type(error).__name__}: {error}")
    return found


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(ROOT).as_posix() for p in PAGES])
def test_page_names_only_what_exists(page):
    assert problems(page.read_text(encoding="utf-8"), page) == []


def test_the_readme_is_short_and_links_every_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in readme, f"README.md does not link docs/{page.name}"


def test_allowed_constants_are_what_the_code_says():
    for number, (why, check) in ALLOWED.items():
        assert check(), f"ALLOWED[{number!r}] ({why}) no longer holds in the code"


def test_the_layer_order_is_the_contract():
    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    layers = [name.split(".", 1)[1] for name in contract["layers"]]
    page = (ROOT / "docs/architecture.md").read_text(encoding="utf-8")
    line = next(line for line in page.splitlines() if line.startswith("`cli` →"))
    assert re.findall(r"`(\w+)`", line) == layers


def test_the_readme_example_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    code = next(code for language, code in split(readme)[0] if language == "python")
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(compile(code, "README.md", "exec"), namespace)
    edit, ident = namespace["edit"], namespace["ident"]
    assert {"layer", "unit", "polarity", "top_tokens"} <= set(ident.table.columns)
    assert ident.units("dog", 5).shape == (5, 2)
    assert "dog" in out.getvalue() and not edit.applied          # undone at the end of the example


# --------------------------------------------------------------------------- the checks can fail

@pytest.mark.parametrize("bad, expected", [
    ("see `mmneurons_utils/architectures.py`", "no such path"),
    ("see `model/architecture.py`", "no such module file"),
    ("`mmneurons_utils.method.scoring.unit_logit_lenz`", "does not resolve"),
    ("`datasets.SYNONYMS`", "does not resolve"),
    ("`find_neuronz(vlm, image)`", "defines no"),
    ("```python\nfrom mmneurons_utils.method.identify import find_neuronz\n```", "ImportError"),
    ("`mmneurons find --top-kk 5`", "no flag --top-kk"),
    ("```bash\nmmneurons frobnicate --json\n```", "no such command: mmneurons frobnicate"),
    ("`python -m mmneurons_utils.batch.results_readme --chek`", "no flag --chek"),
    ("`python3 tasks.py deploy`", "no such command: tasks.py deploy"),
    ("![scenes](docs/figures/00_scene.png)", "broken link"),
    ("the noun hit is 0.777123 on smol-llava", "0.777123 is in no file"),
    ("a vocabulary of 49,153 tokens", "49153 is in no file"),
    ("pytest collects 627 tests", "a test count"),
])
def test_a_bad_page_fails(bad, expected):
    assert any(expected in p for p in problems(bad)), problems(bad)


@pytest.mark.parametrize("good", [
    "LLaVA-1.5 and Qwen2.5-VL at 127.0.0.1, unit `L3.741 (−)`, `torch==2.13.0`",
    "a vocabulary of 49,152 tokens, Python 3.10 or later",
    "`mmneurons find --method noun_contrast --top-k 50 --scenes 1024`",
    "`python -m mmneurons_utils.batch.results_readme --check`",
])
def test_a_good_page_passes(good):
    assert problems(good) == []
