"""The paper-claims scorecard: each claim of Pan et al. (2024), the number that tests it, a verdict.

    from mmneurons_utils.scorecard import scorecard, write_scorecard
    card = scorecard("outputs/tables")          # one row per (model, claim)
    csv_path, md_path = write_scorecard("outputs")   # outputs/claims.csv, outputs/claims.md
    python -m mmneurons_utils.scorecard outputs      # the same, from a shell

It reads only the CSV tables the notebooks already write under ``<output_dir>/tables/``
(``Outputs.table``), so nothing is re-executed; which tables, with which columns, is declared
once in :mod:`.schema` (:data:`~mmneurons_utils.scorecard.schema.TABLES`). Every claim is
declared once, in :data:`CLAIMS`, with the table it reads (its key in the schema), the metric,
and its rule **as data**: a short
human-readable sentence (``Claim.rule``, printed in the scorecard) and the function that
applies it (``Claim.judge``). Verdicts are ``holds`` (direction, size and interval all
pass), ``partly`` (the direction holds — ours beats the baseline on the point estimate —
but a size or interval condition fails), ``does not hold`` and ``not measured`` (the table
is missing, lacks the model or the rows the rule needs; the reason is given, and no
number is filled in). A missing interval fails an interval condition: the rule then gives
at most ``partly``.

Which model a row is about is the schema's ``models``: a ``model`` column (the summary tables
of notebooks 02 and 03, the editors' summary), a column per model (layer distribution, speed),
or one model per run (the tables of notebooks 04 and 05), *the notebook's model*: read from the
executed copy ``<output_dir>/notebooks/NN_*.ipynb`` (papermill's parameters), else from the
first model column of the model summary / speed table (every notebook of a run gets the same
``model``), else the ``model`` argument.

Section labels are the paper's coarse parts as the notebooks cite them (§3 the method,
§4 the experiments); they are not checked sub-section numbers.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from ..interventions.editors import WEIGHT_EDITORS
from ..store.results import atomic_write
from .editors import measure_editing_vs_field
from .evidence import (BASELINES, CAUSAL_K, EDIT_NEURONS, NAN, OVERHEAD_MAX, SPEEDUP_MIN, Evidence, Value, _fmt,
                       _fmt_value, _measure_causal, _measure_cross, _measure_editing, _measure_layers,
                       _measure_region, _measure_sensitivity, _measure_specificity, _measure_speed,
                       notebook_model, wilson_interval)
from .schema import TABLES, Unusable, read_tables

__all__ = ["CLAIMS", "Claim", "Evidence", "HOLDS", "PARTLY", "FAILS", "NOT_MEASURED",
           "scorecard", "write_scorecard", "to_markdown", "wilson_interval"]

HOLDS, PARTLY, FAILS, NOT_MEASURED = "holds", "partly", "does not hold", "not measured"
COLUMNS = ["model", "claim_id", "claim", "section", "metric", "rule", "ours", "ours_low",
           "ours_high", *BASELINES, "null", "n", "n_clusters", "verdict", "detail", "source"]

# The thresholds the rules use (named here so the rule texts and the functions agree).
UPPER_HOLDS, UPPER_PARTLY = 0.6, 0.5         # share of top units in the upper half of layers
SENSITIVITY_RATIO = 2.0                      # noun hit ≥ 2 × random's (where random can score)
CHANCE_NEGLIGIBLE = 0.01                     # 10 / V below this: random units name no noun by construction
BOX_RATIO, AUROC_MIN = 1.5, 0.7              # mass in box ≥ 1.5 × box share; AUROC ≥ 0.7
RETAINED_MIN = 0.5                           # region invariance: half of the top-10 come back
JACCARD_MIN = 0.2                            # cross-image: same-noun Jaccard of the top-10 sets
CAUSAL_RATIO, CAUSAL_LOGITS, REMOVED_MIN = 2.0, 1.0, 0.5      # read at k = CAUSAL_K
EDIT_SUCCESS, EDIT_LOCALITY = 0.8, 0.95                        # edits of EDIT_NEURONS units
OVERHEAD_PARTLY = 1.5                                          # beyond OVERHEAD_MAX


@dataclass(frozen=True)
class Claim:
    """One claim of the paper: where it is, the table and metric that test it, and the rule.

    ``table`` is the key of the table it reads in :data:`~mmneurons_utils.scorecard.schema.TABLES`
    (``source``: its file name). ``measure(tables, notebook_model) -> {model: Evidence | reason}``
    reads the tables (``tables`` maps a schema key to a DataFrame or ``None`` when missing);
    ``judge(evidence)`` applies ``rule`` and returns a verdict."""
    id: str
    claim: str
    section: str
    metric: str
    rule: str
    table: str
    measure: Callable
    judge: Callable[[Evidence], str]

    @property
    def source(self) -> str:
        return TABLES[self.table].file


# ---------------------------------------------------------------------------- formatting

def _judge_layers(e: Evidence) -> str:
    share = e.ours.mean
    return HOLDS if share >= UPPER_HOLDS else PARTLY if share >= UPPER_PARTLY else FAILS


def _beats(ours: Value, base: Value, ratio: float) -> str:
    """holds: intervals separate and ours ≥ ratio × base; partly: ours > base; else fails."""
    if not ours.mean > base.mean:
        return FAILS
    return HOLDS if ours.above(base) and ours.mean >= ratio * base.mean else PARTLY


def _random_can_score(e: Evidence) -> bool:
    """Whether random units are a baseline that can be beaten or lost to: chance 10 / V not ≈ 0."""
    chance = (e.extra or {}).get(("contribution", "chance"), NAN).mean
    return not math.isnan(chance) and chance >= CHANCE_NEGLIGIBLE


def _judge_sensitivity(e: Evidence) -> str:
    """Against the selection-matched null (hit interval above it, and a better noun rank), and
    against random units (interval above, ≥ ratio ×) only where chance 10 / V is not ≈ 0."""
    null, random = e.baselines.get("selection_null", NAN), e.baselines.get("random", NAN)
    if math.isnan(null.mean):
        return NOT_MEASURED
    bases = [(null, 1.0)] + ([(random, SENSITIVITY_RATIO)] if _random_can_score(e) else [])
    if not all(e.ours.mean > base.mean for base, _ in bases):
        return FAILS
    rank, null_rank = (e.extra or {}).get(("contribution", "noun_rank"), NAN), \
        (e.extra or {}).get(("selection_null", "noun_rank"), NAN)
    rank_better = not (rank.mean >= null_rank.mean)          # NaN ranks (old tables) do not count against
    return HOLDS if rank_better and all(e.ours.above(base) and e.ours.mean >= ratio * base.mean
                                        for base, ratio in bases) else PARTLY


def _judge_specificity(e: Evidence) -> str:
    x = e.extra
    auroc, random_auroc = x["contribution", "auroc"], x["random", "auroc"]
    if math.isnan(auroc.mean) or math.isnan(random_auroc.mean):
        return NOT_MEASURED
    direction = [auroc.mean > random_auroc.mean]
    size = [auroc.above(random_auroc), auroc.mean >= AUROC_MIN]
    mass = x.get(("contribution", "map_metric"), NAN)        # the centred maps' mass in box
    if not math.isnan(mass.mean):
        box = x["contribution", "box_share"]
        bases = [x.get((m, "map_metric"), NAN) for m in ("random", "selection_null")]
        bases = [b for b in bases if not math.isnan(b.mean)]
        direction += [mass.mean > box.mean] + [mass.mean > b.mean for b in bases]
        size += [mass.mean >= BOX_RATIO * box.mean] + [mass.above(b) for b in bases]
    if not all(direction):
        return FAILS
    return HOLDS if all(size) else PARTLY


def _judge_region(e: Evidence) -> str:
    random = e.baselines.get("random", NAN)
    if math.isnan(random.mean):
        return NOT_MEASURED
    if not e.ours.mean > random.mean:
        return FAILS
    return HOLDS if e.ours.above(random) and e.ours.mean >= RETAINED_MIN else PARTLY


def _judge_cross(e: Evidence) -> str:
    different = e.extra["contribution", "jaccard_different"]
    random = e.baselines.get("random", NAN)
    if math.isnan(different.mean):
        return NOT_MEASURED
    if not e.ours.mean > different.mean:
        return FAILS
    null = e.baselines.get("selection_null", NAN)
    separated = (e.ours.above(different) and (math.isnan(random.mean) or e.ours.above(random))
                 and (math.isnan(null.mean) or e.ours.above(null)))
    return HOLDS if separated and e.ours.mean >= JACCARD_MIN else PARTLY


def _judge_causal(e: Evidence) -> str:
    random = e.baselines.get("random", NAN)
    removed, random_removed = e.extra["removed"]["contribution"], e.extra["removed"]["random"]
    if math.isnan(random.mean) or math.isnan(random_removed.mean):
        return NOT_MEASURED
    drop = e.ours.mean
    if not drop > random.mean:
        return FAILS
    margin = drop >= CAUSAL_RATIO * random.mean and drop - random.mean >= CAUSAL_LOGITS
    removal = removed.mean >= REMOVED_MIN and removed.mean > random_removed.mean
    return HOLDS if margin and removal else PARTLY


def _judge_editing(e: Evidence) -> str:
    random = e.baselines.get("random", NAN)
    if math.isnan(random.mean):
        return NOT_MEASURED
    if not e.ours.mean > random.mean:
        return FAILS
    locality = e.extra["locality"]["contribution"]
    ok = e.ours.mean >= EDIT_SUCCESS and e.ours.above(random) and locality >= EDIT_LOCALITY
    return HOLDS if ok else PARTLY                      # a NaN locality fails the size check


def _judge_editing_vs_field(e: Evidence) -> str:
    """holds: behind the strongest field editor on no axis; partly: ahead of or level with it
    (point estimate) on at least one axis; does not hold: below it on every axis."""
    axes = e.extra["axes"]                       # axis → (ours, strongest) Values
    if any(math.isnan(o.mean) or math.isnan(b.mean) for o, b in axes.values()):
        return NOT_MEASURED
    if not any(b.above(o) for o, b in axes.values()):
        return HOLDS
    return PARTLY if any(o.mean >= b.mean for o, b in axes.values()) else FAILS


def _judge_speed(e: Evidence) -> str:
    ratio, speedup = e.extra["overhead_ratio"], e.extra["gradient_speedup"]
    if math.isnan(ratio) or math.isnan(speedup):
        return NOT_MEASURED
    if ratio <= OVERHEAD_MAX and speedup >= SPEEDUP_MIN:
        return HOLDS
    return PARTLY if speedup > 1 and ratio <= OVERHEAD_PARTLY else FAILS


CLAIMS: tuple[Claim, ...] = (
    Claim("layers", "multi-modal neurons sit in the upper layers", "§4",
          "share of the top-k contribution units in the upper half of the layers",
          f"holds if the share is ≥ {UPPER_HOLDS}; partly if ≥ {UPPER_PARTLY}; does not hold otherwise",
          "layer_distribution", _measure_layers, _judge_layers),
    Claim("sensitivity", "their top tokens carry the noun's meaning (semantic sensitivity)", "§4",
          "noun hit of the top-10 units, contribution vs the selection-matched null (and random)",
          "holds if ours' 95 % interval lies above the selection-matched null's, the noun ranks higher in "
          "ours' lenses than in the null's, and — only where chance "
          f"10 / V ≥ {CHANCE_NEGLIGIBLE} — ours' interval lies above random's with ours ≥ {SENSITIVITY_RATIO:g} × "
          "random; partly if ours beats each of them on the point estimate but a condition fails; does not "
          "hold otherwise",
          "noun_hits", _measure_sensitivity, _judge_sensitivity),
    Claim("specificity", "they fire on the noun's image region (specificity)", "§4",
          "mass in box of the median-centred maps vs the box's share, random and the selection-matched "
          "null; selectivity AUROC vs random",
          f"holds if mass in box ≥ {BOX_RATIO:g} × the box's share with its interval above random's and the "
          "selection-matched null's, "
          f"and AUROC ≥ {AUROC_MIN} with its interval above random's (AUROC alone where there is no patch "
          "grid); partly if every point estimate beats its chance / random but a size or interval "
          "condition fails; does not hold otherwise",
          "specificity", _measure_specificity, _judge_specificity),
    Claim("region_invariance", "the same units come back when the image tokens are shuffled "
          "(region invariance)", "§4",
          "retained share of the top-10 after the shuffle, single-noun scenes, contribution vs random",
          f"holds if ours ≥ {RETAINED_MIN} with its interval above random's; partly if ours > random but "
          "a condition fails; does not hold otherwise",
          "region", _measure_region, _judge_region),
    Claim("cross_image_invariance", "the same units come back across images of the same noun "
          "(cross-image invariance)", "§4",
          "Jaccard of one noun's top-10 sets across images vs pairs with other nouns",
          f"holds if the same-noun Jaccard is ≥ {JACCARD_MIN} with its interval above the other-noun "
          "Jaccard's and random units' and the selection-matched null's same-noun Jaccard's; partly if "
          "same > other nouns but a condition fails; does not hold otherwise",
          "cross_image", _measure_cross, _judge_cross),
    Claim("causal_effect", "removing them removes the noun, unlike random units (causal effect)", "§4",
          f"zeroing the top-k write vectors at the largest k ≤ {CAUSAL_K}: noun margin drop and share of "
          "nouns removed, contribution vs random",
          f"holds if ours' margin drop is ≥ {CAUSAL_RATIO:g} × random's and ≥ {CAUSAL_LOGITS:g} logit more, "
          f"and ≥ {REMOVED_MIN} of the nouns leave the caption (more than with random units); partly if "
          "the margin drop beats random but a size condition fails; does not hold otherwise",
          "causal_curves", _measure_causal, _judge_causal),
    Claim("editing", "editing them changes the word with few side effects", "§3–4",
          f"edit success (all pairs) and locality, {EDIT_NEURONS} contribution units vs {EDIT_NEURONS} "
          "random units",
          f"holds if success ≥ {EDIT_SUCCESS} with its Wilson 95 % interval above random units', and "
          f"locality ≥ {EDIT_LOCALITY}; partly if success > random's but a condition fails (or no edit "
          "applied to measure locality); does not hold otherwise",
          "edit_summary", _measure_editing, _judge_editing),
    Claim("editing_vs_editors", "editing them holds up against the field's editors", "§3–4 (not in the paper)",
          f"edit success, m_generality and m_locality, {EDIT_NEURONS} contribution units vs the strongest "
          f"of {', '.join(WEIGHT_EDITORS)} (highest mean of the three) on the same pairs",
          "holds if ours' 95 % interval lies below the strongest editor's on none of the three; partly if "
          "it does on some but ours' point estimate is at least the strongest's on another; does not "
          "hold otherwise",
          "editors_summary", measure_editing_vs_field, _judge_editing_vs_field),
    Claim("efficiency", "finding them needs no gradients and costs little over captioning", "§3",
          "overhead_ratio (find_neurons ÷ describe) and gradient_speedup (gradient ÷ contribution, per noun)",
          f"holds if overhead_ratio ≤ {OVERHEAD_MAX} and gradient_speedup ≥ {SPEEDUP_MIN:g} (the README's "
          f"goals); partly if gradient_speedup > 1 and overhead_ratio ≤ {OVERHEAD_PARTLY}; does not hold "
          "otherwise",
          "speed", _measure_speed, _judge_speed),
)

# what each rule judges ours against (the scorecard's ``null`` column)
NULLS = {"layers": "uniform layers (0.5)",
         "sensitivity": "selection-matched null; random only where 10 / V ≥ 0.01",
         "specificity": "box share, random, selection-matched null",
         "region_invariance": "random", "cross_image_invariance": "other nouns, random, selection-matched null",
         "causal_effect": "random", "editing": "random", "editing_vs_editors": "strongest of ft / lora / rome",
         "efficiency": "captioning alone; gradient"}


def scorecard(tables_dir: str | Path, model: str | None = None) -> pd.DataFrame:
    """One row per (model, claim): the claim, its metric and rule, ours (contribution) with its
    95 % interval, the baselines' values, ``n``, the verdict, a detail line and the source table.

    ``tables_dir``: a notebook run's ``<output_dir>/tables``. ``model``: keep only that model's
    rows (``None``: every model a table names); also the name used for the single-model tables of
    notebooks 04 and 05 when the run does not say which model they ran on.
    """
    tables_dir = Path(tables_dir)
    tables = read_tables(tables_dir)
    results: dict[str, dict] = {}
    for claim in CLAIMS:
        run_model = notebook_model(tables_dir, tables, TABLES[claim.table].notebook, model) or "(notebook's model)"
        try:
            results[claim.id] = claim.measure(tables, run_model)
        except Unusable as reason:
            results[claim.id] = str(reason)
        except (KeyError, ValueError, TypeError, IndexError) as error:
            results[claim.id] = f"{claim.source} could not be read: {type(error).__name__}: {error}"
    models = [model] if model is not None else list(dict.fromkeys(
        m for r in results.values() if isinstance(r, dict) for m in r if m is not None))
    if not models:
        models = [notebook_model(tables_dir, tables, "00", None) or "(no model)"]
    rows = []
    for m in models:
        for claim in CLAIMS:
            result = results[claim.id]
            row = dict(model=m, claim_id=claim.id, claim=claim.claim, section=claim.section,
                       metric=claim.metric, rule=claim.rule, ours=math.nan, ours_low=math.nan,
                       ours_high=math.nan, **{b: math.nan for b in BASELINES},
                       null=NULLS.get(claim.id, ""), n=math.nan,
                       n_clusters=math.nan, verdict=NOT_MEASURED, detail="", source=claim.source)
            if isinstance(result, str):
                row["detail"] = result
            elif m not in result:
                others = ", ".join(str(x) for x in result) or "no model"
                row["detail"] = f"{claim.source} has no rows for {m} (it holds {others})"
                table = TABLES[claim.table]
                if table.models == "run":                                    # one model per run
                    row["detail"] += (f"; notebook {table.notebook} runs one model: "
                                      f"run it with -p model {m}")
            elif isinstance(result[m], str):
                row["detail"] = result[m]
            else:
                e: Evidence = result[m]
                row.update(metric=e.metric, ours=e.ours.mean, ours_low=e.ours.low, ours_high=e.ours.high,
                           **{b: e.baselines.get(b, NAN).mean for b in BASELINES},
                           n=e.n, n_clusters=e.n_clusters, detail=e.detail, verdict=claim.judge(e))
                if row["verdict"] == NOT_MEASURED and not row["detail"]:
                    row["detail"] = "a baseline the rule needs is missing"
            rows.append(row)
    return pd.DataFrame(rows, columns=COLUMNS)


COMMITTED_CARDS = Path(__file__).resolve().parents[2] / "results" / "scorecards"


def committed_card(model: str) -> str | None:
    """``results/scorecards/<model>.md`` (relative to the checkout) when the checkout holds a
    large-sample card of ``model``; ``None`` otherwise (an installed package, another model)."""
    path = COMMITTED_CARDS / f"{model}.md"
    return f"results/scorecards/{model}.md" if path.is_file() else None


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(card: pd.DataFrame) -> str:
    """The scorecard as markdown: per model one table (one row per claim), then the rules."""
    lines = ["# Paper claims: scorecard", "",
             "Pan et al. (2024), *Finding and Editing Multi-Modal Neurons in Pre-Trained Transformers*, "
             "tested on this run's tables. *ours* is the contribution score's units (mean [95 % interval] "
             "where the table has one); baselines on the same metric.", ""]
    header = ["#", "claim", "§", "metric", "ours", "gradient", "gradient_image", "random",
              "selection null", "judged against", "n", "verdict", "notes", "source"]
    for model, group in card.groupby("model", sort=False):
        lines += [f"## {model}", ""]
        committed = committed_card(model)
        if committed is not None:
            lines += [f"This run's sample is small; the committed card on many more scenes is "
                      f"`{committed}`.", ""]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for i, row in enumerate(group.itertuples(index=False), 1):
            ours = _fmt_value(Value(row.ours, row.ours_low, row.ours_high))
            verdict = f"**{row.verdict}**" if row.verdict != NOT_MEASURED else row.verdict
            n = "—" if pd.isna(row.n) else (f"{int(row.n)}" + ("" if pd.isna(row.n_clusters)
                                                                else f" ({int(row.n_clusters)} images)"))
            cells = [i, row.claim, row.section, row.metric, ours, _fmt(row.gradient),
                     _fmt(row.gradient_image), _fmt(row.random), _fmt(row.selection_null), row.null, n,
                     verdict, row.detail, row.source]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        lines.append("")
    lines += ["## Rules", ""]
    for i, claim in enumerate(CLAIMS, 1):
        lines.append(f"{i}. **{claim.claim}** ({claim.source}): {claim.rule}.")
    lines += ["", f"Verdicts: *{HOLDS}*, *{PARTLY}* (the direction holds, a size or interval condition "
              f"does not; a missing interval fails an interval condition), *{FAILS}*, *{NOT_MEASURED}* "
              "(the reason is in the notes).", ""]
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_scorecard(output_dir: str | Path, model: str | None = None) -> tuple[Path, Path]:
    """Write ``<output_dir>/claims.csv`` and ``<output_dir>/claims.md`` (each atomically) from
    ``<output_dir>/tables/``; returns their paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    card = scorecard(output_dir / "tables", model=model)
    csv_path, md_path = output_dir / "claims.csv", output_dir / "claims.md"
    _write_atomic(csv_path, card.to_csv(index=False))
    _write_atomic(md_path, to_markdown(card))
    return csv_path, md_path


def main(argv=None) -> int:
    """``python -m mmneurons_utils.scorecard [OUTPUT_DIR]``: write ``claims.csv`` and ``claims.md``
    from ``OUTPUT_DIR/tables`` and print their paths."""
    parser = argparse.ArgumentParser(prog="python -m mmneurons_utils.scorecard",
                                     description="Write the paper-claims scorecard of a notebook run.")
    parser.add_argument("output_dir", nargs="?", default="outputs",
                        help="the run's output folder, holding tables/ (default: outputs); claims.csv "
                             "and claims.md are written into it")
    parser.add_argument("--model", default=None,
                        help="keep only this model's rows (default: every model the tables name)")
    args = parser.parse_args(argv)
    for written in write_scorecard(args.output_dir, model=args.model):
        print(written)
    return 0
