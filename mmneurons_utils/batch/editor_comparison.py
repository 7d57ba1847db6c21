"""Every editor on the same requests, scored with the field's metrics: the table people quote.

:func:`evaluate_editor` runs one editor (:func:`~mmneurons_utils.interventions.editors.edit_with`)
on one pool split and scores it with the one metrics suite
(:mod:`mmneurons_utils.properties.edit_metrics`): EasyEdit's keys and the package's own
(``success``, ``generalization``, ``locality``, ``locality_kl``: the free-running readings).
:func:`compare_editors` does that for pairs × editors, the clean reference of a pair made once for
all its editors (resumable: rows already in ``out`` are skipped) and :func:`summarize_editors`
gives each editor's means with percentile-bootstrap 95 % intervals over pairs. From a shell:
``mmneurons compare-editors`` (:mod:`mmneurons_utils.commands.report`; ``python -m
mmneurons_utils.batch.editor_comparison`` is an alias of it).

Scoring rule (the package's): a failed edit (not converged, not applied) scores 0 on
``success`` / ``reliability`` (its images keep saying the source) but NaN on everything it would
have to be applied to measure (generality, locality, decoupling); success-type means run over
every attempted pair, side effects over the applied edits only.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import pandas as pd

from ..interventions.editors import EDITORS, WEIGHT_EDITORS, edit_with
from ..interventions.edit_inputs import target_token
from ..interventions.edit_learning import EditInputError
from ..properties.edit_metrics import METRIC_KEYS
from ..model.cache import weights_hash
from ..model.vlm import load_vlm
from ..properties.stats import bootstrap_ci
from ..store.provenance import differences
from ..store.results import atomic_write
from ..tiny.scenes import make_scenes
from .edit_evaluation import EditRequest, ImagePool, default_pairs, finish, request

DEFAULT_CONFIGS = (("contribution", 5), ("contribution", 1), ("contribution", 20), ("gradient", 5),
                   ("gradient_image", 5), ("random", 5), ("ft", 5), ("lora", 5), ("rome", 5))
EVERY_PAIR = ("success", "reliability", "reliability_free", "converged", "applied", "steps",
              "seconds", "params_changed", "params_trained")
JSON_KEYS = ("method", "k", "params_changed", "applied", "seconds") + METRIC_KEYS


def evaluate_editor(vlm, pool: ImagePool, source: str, target: str, method: str = "contribution",
                    k: int = 5, n_edit: int = 2, n_unrelated: int = 4, n_locality: int = 6,
                    n_heldout: int | None = 4, n_covariance: int = 64, seed: int = 0,
                    keep: bool = False, progress: bool = False, req: EditRequest | None = None,
                    shared: dict | None = None, **settings):
    """``(edit, row)``: ``method`` edits ``source`` → ``target`` on a split of ``pool`` (see
    :meth:`ImagePool.split`; at most ``n_heldout`` held-out images) and is scored on the rest.
    ``rome``'s key covariance comes from the pool's first ``n_covariance`` images. The edit is
    undone unless ``keep``. ``req``: the pair's request (split, captions, clean reference with
    the text probes) if already made, e.g. for another editor of the same pair; ``shared``: a dict
    that keeps the request made here for the next call with the same pair and split."""
    key = (source, target, n_edit, n_unrelated, n_locality, n_heldout, settings.get("max_new_tokens", 20))
    if req is None and shared is not None:
        req = shared.get(key)
    if req is None:
        req = request(vlm, pool, source, target, n_edit, n_unrelated, n_locality, n_heldout,
                      extended=True, max_new_tokens=settings.get("max_new_tokens", 20))
        if shared is not None:
            shared[key] = req
    start = time.perf_counter()
    edit = edit_with(vlm, req.images, source, target, method, unrelated=req.unrelated,
                     covariance_images=pool.images[:n_covariance], progress=progress, k=k,
                     seed=seed, captions=req.captions, unrelated_captions=req.unrelated_captions,
                     **settings)
    seconds = time.perf_counter() - start
    finish(edit, req, keep)
    m = edit.report
    get = lambda name, default=math.nan: default if getattr(m, name) is None else getattr(m, name)  # noqa: E731
    row = dict(source=source, target=target, method=method, k=k, layer=edit.layer,
               applied=bool(m.accepted), converged=bool(m.converged), steps=m.steps,
               final_margin=m.final_margin, params_changed=edit.params_changed,
               params_trained=edit.params_trained, seconds=seconds,
               success=m.reliability_free, generalization=get("m_generality_free"),
               locality=get("m_locality_free"), locality_kl=get("locality_kl"),
               **{key: get(key) for key in METRIC_KEYS},
               n_edit=m.n_edit, n_heldout=get("n_heldout", 0), n_locality=get("n_locality", 0),
               n_excluded_target=m.n_excluded_target)
    return edit, row


def settings_path(out: str | Path) -> Path:
    """The settings record beside a comparison CSV: ``table.csv`` → ``table.csv.settings.json``."""
    return Path(f"{out}.settings.json")


def read_record(out: str | Path) -> dict | None:
    """The settings record beside ``out`` (``None`` when there is none); :class:`EditInputError`
    naming it when it is not one this module wrote (it is then never overwritten)."""
    record = settings_path(out)
    if not record.exists():
        return None
    try:
        recorded = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise EditInputError(f"{record} is not a settings record of the editor comparison (not JSON: "
                             f"{' '.join(str(exc).split())[:80]}); it is left untouched: give another "
                             "--out") from None
    if not (isinstance(recorded, dict) and isinstance(recorded.get("settings"), dict)
            and isinstance(recorded.get("devices", []), list)):
        raise EditInputError(f"{record} is not a settings record of the editor comparison (a JSON "
                             f"{type(recorded).__name__} without a 'settings' object); it is left "
                             "untouched: give another --out")
    return recorded


def check_settings(out: str | Path, settings: dict, device: str | None = None) -> None:
    """Refuse to add rows to ``out`` made under other ``settings`` (one line naming what
    differs), or to a CSV that has no record of its settings, or to write over a file beside it
    that is not such a record; else (re)write the record, adding ``device`` to the devices its
    rows were made on (not a setting: it changes numbers only at rounding level)."""
    path, record = Path(out), settings_path(out)
    recorded = read_record(out)
    if path.is_file() and recorded is None:
        raise EditInputError(f"{path} has no settings record ({record.name}): it cannot be resumed "
                             f"safely; give a new --out or delete it")
    if recorded is not None:
        diff = differences(recorded.get("settings", {}), settings)
        if diff and path.is_file():
            raise EditInputError(f"{path} was made with other settings ({'; '.join(diff)}); "
                                 f"give a new --out or delete it (and {record.name})")
    devices = sorted(set((recorded or {}).get("devices", [])) | ({device} if device else set()))
    text = json.dumps(dict(settings=settings, devices=devices), indent=1, sort_keys=True)
    atomic_write(record, lambda tmp: Path(tmp).write_text(text + "\n"))


def check_editors(methods) -> None:
    """:class:`EditInputError` naming every method that is not one of :data:`EDITORS`."""
    bad = [m for m in methods if m not in EDITORS]
    if bad:
        raise EditInputError(f"unknown editor(s) {', '.join(bad)}; choose from {', '.join(EDITORS)}")


def compare_editors(vlm, pool: ImagePool, pairs: Sequence[tuple[str, str]],
                    configs: Sequence[tuple[str, int]] = DEFAULT_CONFIGS, out: str | Path | None = None,
                    max_minutes: float | None = None, progress: bool = False,
                    settings: dict | None = None, **kwargs) -> pd.DataFrame:
    """One row per (pair, editor): :func:`evaluate_editor`'s row. Pairs run one after another,
    every editor on a pair before the next pair (so a time-limited run, ``max_minutes``, still
    has every editor on the same pairs). With ``out`` (CSV) each row is appended as it is made
    and rows already there are skipped: the run resumes, if ``settings`` (what decides the
    numbers) equal those recorded beside it (:func:`check_settings`)."""
    from tqdm.auto import tqdm

    check_editors(m for m, _ in configs)
    path = Path(out) if out is not None else None
    if path is not None and settings is not None:
        check_settings(path, settings, device=str(vlm.device))
    done = pd.read_csv(path) if path is not None and path.is_file() else pd.DataFrame()
    if len(done):   # a row twice (two runs of old on one file): kept once
        done = done.drop_duplicates(["source", "target", "method", "k"]).reset_index(drop=True)
    seen = set(zip(done.source, done.target, done.method, done.k)) if len(done) else set()
    rows = done.to_dict("records")
    start = time.perf_counter()
    for source, target in tqdm(list(pairs), desc="pairs", disable=not progress):
        if max_minutes is not None and time.perf_counter() - start > 60 * max_minutes:
            break
        shared: dict = {}   # the pair's split, captions and clean reference: made once for its editors
        for method, k in configs:
            if (source, target, method, k) in seen:
                continue
            _, row = evaluate_editor(vlm, pool, source, target, method, k, shared=shared, **kwargs)
            rows.append(row)
            if path is not None:   # the whole table, through a temporary file: never half a row
                table = pd.DataFrame(rows)
                atomic_write(path, lambda tmp: table.to_csv(tmp, index=False))
    return pd.DataFrame(rows)


def summarize_editors(table: pd.DataFrame, n_resamples: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per ``method, k``: ``n_pairs``, ``n_applied`` and, per metric, the mean with its
    95 % percentile-bootstrap interval over pairs (``<metric>_low`` / ``_high``). Success-type
    columns run over every attempted pair; the others over the applied edits (NaN dropped)."""
    metrics = ["success", "generalization", "locality", "locality_kl", *METRIC_KEYS,
               "params_changed", "params_trained", "seconds", "steps"]
    rows = []
    for (method, k), group in table.groupby(["method", "k"], sort=False):
        row = dict(method=method, k=int(k), n_pairs=len(group), n_applied=int(group.applied.sum()))
        applied = group[group.applied.astype(bool)]
        for metric in metrics:
            values = (group if metric in EVERY_PAIR else applied)[metric].astype(float)
            mean, low, high = bootstrap_ci(values.to_numpy(), n_resamples=n_resamples, seed=seed)
            row.update({metric: mean, f"{metric}_low": low, f"{metric}_high": high})
        rows.append(row)
    return pd.DataFrame(rows)


def load_comparison(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """``(table, record)``: a comparison CSV that :func:`compare_editors` wrote and its settings
    record (``{"settings": …, "devices": […]}``). A CSV without its record, or with a
    (pair, method, k) twice, is refused: its rows' origin is unknown or mixed."""
    path = Path(path)
    record = settings_path(path)
    if not path.is_file():
        raise EditInputError(f"no comparison table at {path}")
    if not record.is_file():
        raise EditInputError(f"{path} has no settings record ({record.name}): its rows' origin is unknown")
    table = pd.read_csv(path)
    twice = table.duplicated(["source", "target", "method", "k"])
    if twice.any():
        first = table[twice].iloc[0]
        raise EditInputError(f"{path} holds {first.source} → {first.target} {first.method} "
                             f"k={first.k} more than once (rows of two runs mixed)")
    return table, json.loads(record.read_text())


def complete_pairs(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of the pairs that every (method, k) of ``table`` ran on: a run cut short leaves its
    last pair with some editors only, and means over different pairs would not compare."""
    configs = table.groupby(["method", "k"]).ngroups
    per_pair = table.groupby(["source", "target"])[["method", "k"]].apply(
        lambda g: len(g.drop_duplicates()))
    keep = per_pair[per_pair == configs].index
    return table[table.set_index(["source", "target"]).index.isin(keep)].reset_index(drop=True)


def summarize_by_model(tables: dict[str, pd.DataFrame], **kwargs) -> pd.DataFrame:
    """:func:`summarize_editors` of each model's table (its :func:`complete_pairs`), stacked with
    a ``model`` column first."""
    parts = [summarize_editors(complete_pairs(table), **kwargs).assign(model=model)
             for model, table in tables.items()]
    frame = pd.concat(parts, ignore_index=True)
    return frame[["model"] + [c for c in frame.columns if c != "model"]]


HEAD_TO_HEAD = ("success", "reliability_free", "m_generality", "t_generality", "m_locality",
                "m_locality_free", "t_locality", "no_image_locality", "text_transfer")

def head_to_head(summary: pd.DataFrame, ours: tuple[str, int] = ("contribution", 5),
                 others: Sequence[str] = WEIGHT_EDITORS, metrics: Sequence[str] = HEAD_TO_HEAD) -> pd.DataFrame:
    """Ours against each of ``others`` per model and metric (``summary``:
    :func:`summarize_by_model`): both means and ``outcome`` — ``behind`` / ``ahead`` when the
    95 % intervals separate, ``level`` when they overlap, ``—`` when either is NaN. Higher is
    better on every metric here (``text_transfer``: the edit carries over to text)."""
    rows = []
    for model, group in summary.groupby("model", sort=False):
        mine = group[(group.method == ours[0]) & (group.k == ours[1])]
        if mine.empty:
            continue
        mine = mine.iloc[0]
        for other in group[group.method.isin(others)].itertuples(index=False):
            other = other._asdict()
            for metric in metrics:
                a, b = float(mine[metric]), float(other[metric])
                if math.isnan(a) or math.isnan(b):
                    outcome = "—"
                elif float(mine[f"{metric}_high"]) < float(other[f"{metric}_low"]):
                    outcome = "behind"
                elif float(mine[f"{metric}_low"]) > float(other[f"{metric}_high"]):
                    outcome = "ahead"
                else:
                    outcome = "level"
                rows.append(dict(model=model, metric=metric, ours=a, editor=other["method"],
                                 editor_value=b, outcome=outcome))
    return pd.DataFrame(rows, columns=["model", "metric", "ours", "editor", "editor_value", "outcome"])


def _one_token(vlm, word: str) -> bool:
    """Whether ``word`` can be a target (one token as a caption says it; BPE models split some)."""
    try:
        target_token(vlm, word)
        return True
    except EditInputError:
        return False


def parse_configs(text: str) -> list[tuple[str, int]]:
    """``"ft:5,rome:5"`` → ``[("ft", 5), ("rome", 5)]``, every method a known editor."""
    try:
        configs = [(c.split(":")[0], int(c.split(":")[1])) for c in text.split(",")]
    except (IndexError, ValueError):
        raise EditInputError(f"--configs takes method:k,... (e.g. ft:5,rome:5), not {text!r}") from None
    check_editors(m for m, _ in configs)
    return configs


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` → ``(K, N)`` with ``0 ≤ K < N``; anything else is a one-line error."""
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        k = n = -1
    if not 0 <= k < n:
        raise EditInputError(f"--shard takes K/N with 0 ≤ K < N (e.g. 0/4), not {text!r}")
    return k, n


def _pairs(vlm, pool: ImagePool, args) -> list[tuple[str, str]]:
    """The run's share (``--shard``) of the first ``--pairs`` of :func:`default_pairs`' order
    whose target is one token."""
    eligible = [n for n in pool.nouns() if len(pool.with_noun(n)) >= args.min_images]
    for n in range(len(eligible), 0, -1):   # as many as there are (a prefix of default_pairs' order)
        try:
            candidates = default_pairs(pool, n, min_images=args.min_images, seed=args.seed)
            break
        except EditInputError:
            continue
    else:
        raise EditInputError(f"no noun is said in ≥ {args.min_images} captions of the pool")
    pairs = [(s, t) for s, t in candidates if _one_token(vlm, t)][:args.pairs]
    shard, n_shards = parse_shard(args.shard)
    return pairs[shard::n_shards]


def run_comparison(args, out: Path, configs) -> pd.DataFrame:
    """The comparison of ``mmneurons compare-editors`` (``args``: its parsed flags; ``out`` checked
    and locked by the caller): the model, its settings record, the pool, the pairs and every
    editor on them. A settings record written here that no row followed (a failed or
    interrupted run) is removed again."""
    had_record = settings_path(out).exists()
    try:
        vlm = load_vlm(args.model, device=args.device)
        settings = dict(model=args.model, weights=weights_hash(vlm), scenes=args.scenes,
                        seed=args.seed, min_images=args.min_images, steps=args.steps,
                        n_edit=args.n_edit, n_unrelated=args.n_unrelated,
                        n_locality=args.n_locality, n_heldout=args.n_heldout,
                        n_covariance=args.n_covariance)
        check_settings(out, settings, device=str(vlm.device))   # before the slow pool
        pool = ImagePool.build(vlm, [s.image for s in make_scenes(args.scenes, seed=args.seed)])
        pairs = _pairs(vlm, pool, args)
        print("pairs:", pairs, flush=True)
        return compare_editors(vlm, pool, pairs, configs, out=out,   # settings checked above
                               max_minutes=args.max_minutes, progress=True,
                               steps=args.steps, n_edit=args.n_edit, n_unrelated=args.n_unrelated,
                               n_locality=args.n_locality, n_heldout=args.n_heldout,
                               n_covariance=args.n_covariance)
    finally:
        if not had_record and not out.exists():
            settings_path(out).unlink(missing_ok=True)


if __name__ == "__main__":   # the old entry point: the process becomes ``mmneurons compare-editors``
    os.execv(sys.executable, [sys.executable, "-m", "mmneurons_utils.cli", "compare-editors", *sys.argv[1:]])
