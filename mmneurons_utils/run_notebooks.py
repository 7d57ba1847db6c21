"""Execute every numbered notebook with papermill and collect figures and timings.

    python -m mmneurons_utils.run_notebooks --out outputs
    python -m mmneurons_utils.run_notebooks --out gpu-run -p model llava-hf/llava-1.5-7b-hf -p device cuda

Executed copies go to ``<out>/notebooks/``, figures to ``<out>/figures/`` (each
notebook saves its own there, given ``output_dir``), per-notebook wall times to
``<out>/timings.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _parameter(text: str) -> tuple[str, object]:
    name, _, value = text.partition("=") if "=" in text else (text, "", "")
    if not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    try:
        return name, json.loads(value)     # numbers, booleans, quoted strings
    except json.JSONDecodeError:
        return name, value                 # bare strings


def run_all(notebooks: Path, out: Path, parameters: dict, only: list[str] | None = None) -> dict:
    import papermill as pm

    out = out.resolve()
    (out / "notebooks").mkdir(parents=True, exist_ok=True)
    paths = sorted(p for p in notebooks.glob("[0-9][0-9]_*.ipynb"))
    if only:
        paths = [p for p in paths if any(p.name.startswith(o) for o in only)]
    if not paths:
        raise SystemExit(f"no numbered notebooks found in {notebooks}")
    timings = {}
    for path in paths:
        start = time.perf_counter()
        pm.execute_notebook(str(path), str(out / "notebooks" / path.name),
                            parameters={"output_dir": str(out), **parameters},
                            cwd=str(path.parent), progress_bar=False)
        timings[path.name] = round(time.perf_counter() - start, 1)
        print(f"{path.name}: {timings[path.name]} s", flush=True)
    timings["total"] = round(sum(timings.values()), 1)
    (out / "timings.json").write_text(json.dumps(timings, indent=1))
    return timings


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--notebooks", type=Path, default=Path("notebooks"))
    parser.add_argument("--out", type=Path, default=Path("outputs"))
    parser.add_argument("-p", "--parameter", type=_parameter, action="append", default=[],
                        metavar="NAME=VALUE", help="papermill parameter for every notebook")
    parser.add_argument("--only", nargs="*", help="notebook name prefixes, e.g. 00 01")
    args = parser.parse_args(argv)
    timings = run_all(args.notebooks, args.out, dict(args.parameter), args.only)
    print(f"all notebooks: {timings['total']} s; figures in {args.out / 'figures'}")


if __name__ == "__main__":
    main()
