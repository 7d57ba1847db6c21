"""nbval settings for the notebooks, in the style of TransformerLens's ``demos/conftest.py``.

``python3 tasks.py test`` runs ``pytest tests notebooks --nbval --nbval-sanitize-with
notebooks/nbval_sanitize.cfg``: every notebook is re-executed and each cell's outputs are
compared with the outputs stored in git. Not compared:

* widget views (the whole output, ``text/plain`` repr included: it holds random model ids
  and live state), widget state, HTML (pandas' HTML duplicates its ``text/plain``, which is
  compared), JavaScript, images (figures are files; see ``mmneurons_utils.outputs``);
* ``stderr`` (warnings and progress bars);
* volatile pieces of the remaining text — timings, hex ids, progress bars, timestamps —
  which ``nbval_sanitize.cfg`` rewrites before comparing.

A cell whose text output is volatile as a whole is marked ``# NBVAL_IGNORE_OUTPUT``; a cell
that must not run in CI is marked ``# NBVAL_SKIP``.
"""

from __future__ import annotations

try:
    from nbval.plugin import IPyNbCell, IPyNbFile
except ImportError:  # nbval not installed: plain pytest runs never collect notebooks
    IPyNbCell = IPyNbFile = None

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
SKIP_COMPARE = (
    "stderr",
    "text/html",
    "application/javascript",
    "image/png",
    "image/jpeg",
    "image/svg+xml",
    WIDGET_VIEW,
    "application/vnd.jupyter.widget-state+json",
)


def _without_widgets(outputs):
    """Drop outputs that display a widget (their ``text/plain`` is a repr of live state)."""
    return [o for o in outputs if WIDGET_VIEW not in (o.get("data") or {})]


def pytest_collectstart(collector):
    if IPyNbFile is not None and isinstance(collector, IPyNbFile):
        collector.skip_compare += tuple(k for k in SKIP_COMPARE if k not in collector.skip_compare)


def pytest_collection_modifyitems(items):
    if IPyNbCell is None:
        return
    for item in items:
        if isinstance(item, IPyNbCell):
            item.add_marker("notebooks")      # the test tier (markers registered in pyproject.toml)
        if isinstance(item, IPyNbCell) and not getattr(item, "_mmneurons_wrapped", False):
            compare = item.compare_outputs

            def compare_without_widgets(test, ref, skip_compare=None, _compare=compare):
                return _compare(_without_widgets(test), _without_widgets(ref), skip_compare)

            item.compare_outputs = compare_without_widgets
            item._mmneurons_wrapped = True
