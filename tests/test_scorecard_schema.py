"""The scorecard's tables are declared once (``mmneurons_utils.scorecard.schema.TABLES``): every
claim names a table of the schema, no other module of the scorecard names a table's file, and a
table missing a declared column is refused naming the file and the column."""

import ast
import re
from pathlib import Path

import pandas as pd
import pytest

from mmneurons_utils.scorecard import CLAIMS, NOT_MEASURED, TABLES, schema_markdown, scorecard
from mmneurons_utils.scorecard.schema import Unusable, require

PACKAGE = Path(__file__).resolve().parents[1] / "mmneurons_utils" / "scorecard"


def test_every_claim_reads_a_declared_table():
    for claim in CLAIMS:
        assert claim.table in TABLES and claim.source == f"{TABLES[claim.table].stem}.csv"


def test_no_module_but_the_schema_names_a_tables_file():
    stems = {t.stem for t in TABLES.values()}
    pattern = re.compile(r"\b\d\d_[a-z_]+")
    for path in PACKAGE.glob("*.py"):
        if path.name == "schema.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                named = set(pattern.findall(node.value)) & stems
                assert not named, f"{path.name} names {named}: use the schema's key"


def test_the_schema_markdown_lists_every_table():
    text = schema_markdown()
    assert all(f"tables/{t.stem}.csv" in text for t in TABLES.values())


def test_a_missing_column_is_refused_naming_the_file_and_the_column(tmp_path):
    frame = pd.DataFrame(dict(method=["contribution"], k=[5], margin_drop=[1.0]))
    with pytest.raises(Unusable, match=r"04_curves_over_k\.csv lacks column\(s\) noun_removed"):
        require({"causal_curves": frame}, "causal_curves")
    with pytest.raises(Unusable, match=r"tables/04_curves_over_k\.csv not found \(run notebook 04\)"):
        require({}, "causal_curves")
    (tmp_path / "tables").mkdir()
    frame.to_csv(tmp_path / "tables" / "04_curves_over_k.csv", index=False)
    row = scorecard(tmp_path / "tables", model="m").set_index("claim_id").loc["causal_effect"]
    assert row["verdict"] == NOT_MEASURED and "lacks column(s) noun_removed" in row["detail"]
