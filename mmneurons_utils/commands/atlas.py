"""``atlas``: every noun's recurring units with their dataset examples, as ``atlas.parquet``
and a static ``index.html``; a finished run with the same settings and weights is reused."""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

from ..atlas.build import build_atlas, read_atlas, summary, write_atlas
from ..batch.parallel import launched_processes
from ..companion.atlas_html import render_atlas_html
from ..method.identify import check_top_k
from ..model.cache import weights_hash
from .common import CliError, data_of, finite, images_of, load_model, names_hash


def cmd_atlas(args) -> dict:
    if launched_processes() > 1:
        raise CliError(f"atlas runs in one process, not under accelerate launch with "
                       f"{launched_processes()} processes (its dataset examples are one running top-k "
                       "over all images and its page is drawn from them); run it with "
                       "python -m mmneurons_utils.cli atlas …")
    start = time.perf_counter()
    out = _out_folder(args)
    data = data_of(args)
    names, images, _ = images_of(args, data)
    source = _source(args, data, names)
    description = dict(model=args.model, dtype=str(args.dtype or "float32"), source=source,
                       seed=args.seed, top_k=args.top_k, examples=args.examples)
    parquet, page = out / "atlas.parquet", out / "index.html"
    table, meta = _finished_run(parquet, description)
    vlm = load_model(args, data)
    check_top_k(vlm, args.top_k)
    # the settings name the model by path: a changed checkpoint at the same path is caught by
    # the hash of the weights the atlas reads (W_U and every W_out, full bytes)
    weights = weights_hash(vlm)
    weights_changed = table is not None and meta.get("weights") != weights
    if weights_changed:
        print(f"mmneurons atlas: {parquet} was made with other weights of {args.model} "
              f"({meta.get('weights') or 'not recorded'} ≠ {weights}); recomputing it",
              file=sys.stderr)
        table = None
    resumed = table is not None
    captions = None
    if table is None:
        table, parts = build_atlas(vlm, images, top_k=args.top_k, examples=args.examples,
                                   seed=args.seed, batch_size=args.batch_size, progress=True,
                                   return_parts=True)
        captions = parts["captions"]
        out.mkdir(exist_ok=True)
        if weights_changed:   # the old page goes first: a run killed below never pairs them
            page.unlink(missing_ok=True)
        write_atlas(table, parquet, meta=dict(description=description, n_images=len(images),
                                              weights=weights))
    if not resumed or not page.exists():
        render_atlas_html(vlm, table, images, page, captions=captions,
                          title=f"Neuron atlas: {args.model}, {source}",
                          meta=dict(model=args.model, images=source, top_k=args.top_k,
                                    examples=args.examples, **summary(table)),
                          batch_size=args.batch_size, progress=True)
    result = dict(out=str(out), model=args.model, n_images=len(images), **summary(table),
                  resumed=resumed, weights_changed=weights_changed, seconds=round(time.perf_counter() - start, 2),
                  peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    if not args.json:
        state = "reused" if resumed else ("rewritten (other weights)" if weights_changed else "written")
        print(f"{result['n_nouns']} nouns, {result['n_units']} units over {len(images)} images; purity "
              f"{finite(result['purity_contribution'])} vs random {finite(result['purity_random'])}; "
              f"{state}: {parquet}, {page}")
    return {k: finite(v) for k, v in result.items()}


def _out_folder(args) -> Path:
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} exists and is not a folder; choose a folder")
    if not out.parent.is_dir():
        raise CliError(f"folder {out.parent} of --out does not exist")
    return out


def _source(args, data, names) -> str:
    """The images of the run in one line (part of the settings a finished run must match)."""
    source = (f"scenes n={args.scenes} seed={args.seed}" if args.scenes
              else f"images {Path(args.images).resolve()} ({len(names)} files, {names_hash(names)})")
    if args.annotations:   # its categories are the candidate nouns: part of what was run
        source += (f" annotations {Path(args.annotations).resolve()} "
                   f"({len(data.categories)} categories, {names_hash(data.categories)})")
    return source


def _finished_run(parquet: Path, description: dict) -> tuple:
    """``(table, meta)`` of a finished run with these settings at ``parquet``, ``(None, None)``
    when there is none; ``CliError`` for an unreadable file or another run's."""
    if not parquet.exists():
        return None, None
    try:
        table, meta = read_atlas(parquet)
    except Exception as exc:
        raise CliError(f"{parquet} exists and is not a readable atlas ({exc}); remove it or "
                       "choose another --out") from exc
    if meta.get("description") != description:
        raise CliError(f"{parquet} holds another run ({meta.get('description')}); remove it or "
                       "choose another --out")
    return table, meta
