"""The tables the scorecard reads, declared once: which CSV, written by which notebook, laid
out how, with which columns (or rows) and which model(s) it is about.

Every table lies at ``<output_dir>/tables/<stem>.csv`` (``Outputs.table`` / ``save_table``
write them so). The claims name a table by its key (``TABLES["noun_hits"]``), never by its file
name; :func:`read_tables` reads them all, :func:`require` checks one before a claim reads it,
and :func:`schema_markdown` prints this schema for the docs.

Layouts:

* ``summary``: a ``summarize_ci`` long table, one row per (``model``,) ``method``, ``metric``
  with ``mean``, ``low``, ``high`` (the 95 % interval), ``n`` and ``n_clusters`` (images);
  ``metrics`` lists the metric rows the claims read;
* ``by-row``: one row per observation (``columns`` are the ones read);
* ``by-model-column``: one column per model, one row per layer (index column ``layer``);
* ``by-model-row-labels``: one column per model, the first column naming each row; ``rows``
  lists the row names read.

Which model a table is about (``models``): ``column`` (a ``model`` column; where absent, the
notebook's model), ``columns`` (one column per model) or ``run`` (one model per run: the
notebook's, see :func:`~mmneurons_utils.scorecard.evidence.notebook_model`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

SUMMARY_COLUMNS = ("method", "metric", "mean")                   # and, when present:
SUMMARY_OPTIONAL = ("model", "low", "high", "n", "n_clusters")
EDITOR_AXES = ("success", "m_generality", "m_locality")


class Unusable(ValueError):
    """A table that is present but cannot answer (missing columns or rows): the reason."""


@dataclass(frozen=True)
class Table:
    """One table the scorecard reads (see the module docstring for ``layout`` and ``models``)."""

    key: str
    stem: str
    notebook: str
    layout: str
    models: str
    columns: tuple[str, ...] = ()      # required columns
    optional: tuple[str, ...] = ()     # columns read when present
    metrics: tuple[str, ...] = ()      # summary: the metric rows read
    rows: tuple[str, ...] = ()         # by-model-row-labels: the row names read (the first two required)
    required_rows: tuple[str, ...] = ()
    description: str = ""

    @property
    def file(self) -> str:
        return f"{self.stem}.csv"


_TABLES = (
    Table("model_summary", "00_model_summary", "00", "by-model-row-labels", "columns",
          description="the model's facts; only its first model column's name is read (which model "
                      "a run's single-model tables are about)"),
    Table("layer_distribution", "01_layer_distribution", "01", "by-model-column", "columns",
          optional=("layer",), description="share of the top-k contribution units per layer, per model"),
    Table("speed", "01_speed", "01", "by-model-row-labels", "columns",
          rows=("overhead_ratio", "gradient_speedup", "gradient_image_speedup", "contribution_ms_per_noun",
                "gradient_ms_per_noun", "gradient_image_ms_per_noun", "n_nouns", "repeats"),
          required_rows=("overhead_ratio", "gradient_speedup"),
          description="identification timings (mmneurons bench's ratios)"),
    Table("noun_hits", "02_noun_hits_summary", "02", "summary", "column",
          SUMMARY_COLUMNS, SUMMARY_OPTIONAL,
          metrics=("noun_hit", "noun_rank", "chance", "hit_where_nameable", "noun_hit_no_hubs", "nameable"),
          description="semantic sensitivity: the noun among the units' top tokens"),
    Table("specificity", "02_specificity_summary", "02", "summary", "column",
          SUMMARY_COLUMNS, SUMMARY_OPTIONAL,
          metrics=("mass_in_box_centred", "mass_in_box", "box_share", "auroc", "occlusion_signed_in_box"),
          description="specificity: activation maps against the object's box, selectivity AUROC"),
    Table("region", "03_region_summary", "03", "summary", "column",
          SUMMARY_COLUMNS, SUMMARY_OPTIONAL, metrics=("retained", "noun_kept", "caption_same"),
          description="region invariance: top units kept after shuffling the image tokens"),
    Table("cross_image", "03_cross_image_summary", "03", "summary", "column",
          SUMMARY_COLUMNS, SUMMARY_OPTIONAL, metrics=("jaccard_same", "jaccard_different", "top_unit_share"),
          description="cross-image invariance: Jaccard of one noun's top-unit sets across images"),
    Table("causal_curves", "04_curves_over_k", "04", "by-row", "run",
          ("method", "k", "margin_drop", "noun_removed"), ("perturbation", "n"),
          description="the causal curves: one row per (perturbation, method, k)"),
    Table("edit_summary", "05_edit_summary", "05", "by-row", "run",
          ("units", "n_neurons", "success", "locality", "n_pairs"), ("n_applied",),
          description="edits per (units, n_neurons): success, locality, pairs"),
    Table("editors_summary", "05_editors_summary", "05", "by-row", "column",
          ("model", "method", "k", "n_pairs", *EDITOR_AXES,
           *(f"{a}_{s}" for a in EDITOR_AXES for s in ("low", "high"))),
          description="every editor on the same pairs (summarize_editors per model, 95 % bootstrap intervals)"),
)
TABLES: dict[str, Table] = {t.key: t for t in _TABLES}


def read_tables(tables_dir: str | Path) -> dict[str, pd.DataFrame | None]:
    """Every table of :data:`TABLES` under ``tables_dir``, by key (``None``: missing or not a CSV)."""
    tables_dir = Path(tables_dir)
    tables = {}
    for key, table in TABLES.items():
        path = tables_dir / table.file
        try:
            tables[key] = pd.read_csv(path) if path.is_file() else None
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
            tables[key] = None
    return tables


def require(tables: dict, key: str) -> pd.DataFrame:
    """The table ``key``, checked against its schema: :class:`Unusable` naming the file when it
    is missing or lacks a required column or row."""
    table, frame = TABLES[key], tables.get(key)
    if frame is None:
        raise Unusable(f"tables/{table.file} not found (run notebook {table.notebook})")
    missing = [c for c in table.columns if c not in frame.columns and not (c == frame.index.name)]
    if missing:
        raise Unusable(f"{table.file} lacks column(s) {', '.join(sorted(missing))}")
    if table.required_rows:
        labels = set(frame.iloc[:, 0]) if len(frame.columns) else set()
        missing = [r for r in table.required_rows if r not in labels]
        if missing:
            raise Unusable(f"{table.file} lacks row(s) {', '.join(sorted(missing))}")
    return frame


def schema_markdown() -> str:
    """The schema as a markdown table (for the docs)."""
    lines = ["| table | notebook | layout | models | columns read (required; *optional*) | metrics / rows read |",
             "|---|---|---|---|---|---|"]
    for t in _TABLES:
        columns = ", ".join([f"`{c}`" for c in t.columns] + [f"*`{c}`*" for c in t.optional]) or "—"
        read = ", ".join(f"`{m}`" for m in (t.metrics or t.rows)) or "—"
        lines.append(f"| `tables/{t.file}` | {t.notebook} | {t.layout} | {t.models} | {columns} | {read} |")
    return "\n".join(lines)
