"""``mmneurons report`` (the paper's headline numbers for one model, vs random units and the
selection-matched null: :func:`~mmneurons_utils.batch.model_report.report`) and ``mmneurons
compare-editors`` (every editor on the same requests:
:mod:`~mmneurons_utils.batch.editor_comparison`)."""

from __future__ import annotations

import json
import sys

import pandas as pd

from ..batch.editor_comparison import parse_configs, parse_shard, read_record, run_comparison, summarize_editors
from ..batch.model_report import report
from ..model.vlm import load_vlm
from ..store.files import exclusive
from ..store.results import check_output_file
from .common import finite


def cmd_report(args) -> dict:
    """The model report of ``--model`` on ``--scenes`` held-out scenes: printed indented, or with
    ``--json`` as the last line."""
    vlm = load_vlm(args.model, device=args.device, dtype=args.dtype)
    result = report(vlm, args.scenes, args.seed, args.k, args.region, args.ablate,
                    progress=not args.json, occlusion=not args.no_occlusion)
    if not args.json:
        print(json.dumps(result, indent=1))
    return result


def cmd_compare_editors(args) -> dict:
    """The comparison table (resumable: ``--out`` is resumed when its settings record matches,
    one writer at a time), then each editor's means with 95 % intervals over pairs. Every flag
    is checked before the model loads."""
    configs = parse_configs(args.configs)
    parse_shard(args.shard)
    out = check_output_file(args.out, "--out", suffix=".csv")   # before the model loads
    read_record(out)                                            # a settings file not ours: refused
    with exclusive(out):
        table = run_comparison(args, out, configs)
    if table.empty:
        print(f"mmneurons compare-editors: note: no pairs to compare in this shard ({args.shard}); "
              "nothing written", file=sys.stderr)
        return dict(out=str(out), rows=0, pairs=0, summary=[])
    summary = summarize_editors(table)
    if not args.json:
        with pd.option_context("display.width", 250, "display.max_columns", 80):
            print(summary.round(3).to_string(index=False))
    return dict(out=str(out), rows=len(table), pairs=int(table.groupby(["source", "target"]).ngroups),
                summary=[{k: finite(v) for k, v in row.items()} for row in summary.to_dict("records")])
