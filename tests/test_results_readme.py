"""results/README.md is generated from results/ and must match it."""

import json
import shutil
from pathlib import Path

from mmneurons_utils.batch import results_readme

RESULTS = Path(__file__).resolve().parents[1] / "results"


def test_the_committed_page_is_what_the_files_give():
    assert results_readme.main(["--check"]) == 0, "results/README.md is stale: regenerate it"


def test_a_changed_result_file_changes_the_page(tmp_path):
    copy = tmp_path / "results"
    shutil.copytree(RESULTS, copy)
    before = results_readme.render(copy)
    report = next((copy / "model_reports").glob("*.json"))
    data = json.loads(report.read_text())
    data["noun_hit"]["contribution"] = 0.123456
    report.write_text(json.dumps(data))
    after = results_readme.render(copy)
    assert before != after and "0.123" in after
    assert results_readme.main(["--results", str(copy), "--check"]) == 1
    assert results_readme.main(["--results", str(copy)]) == 0
    assert results_readme.main(["--results", str(copy), "--check"]) == 0
