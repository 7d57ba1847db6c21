"""``atlas``: every noun's recurring units with their dataset examples, as ``atlas.parquet``
and a static ``index.html``; a finished run with the same settings, images (names and contents)
and weights is reused, one with other settings or images refused; a folder holding files the
command did not write is refused and left untouched; one writer of the folder at a time."""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

from ..atlas.build import build_atlas, read_atlas, summary, write_atlas
from ..batch.parallel import launched_processes
from ..atlas.page import is_atlas_page, render_atlas_html
from ..method.identify import check_top_k
from ..model.cache import weights_hash
from ..store.provenance import differences, image_hashes, images_digest
from ..store.results import exclusive
from .common import CliError, check_new_folder, data_of, finite, images_of, load_model, names_hash


def cmd_atlas(args) -> dict:
    if launched_processes() > 1:
        raise CliError(f"atlas runs in one process, not under accelerate launch with "
                       f"{launched_processes()} processes (its dataset examples are one running top-k "
                       "over all images and its page is drawn from them); run it with "
                       "python -m mmneurons_utils.cli atlas …")
    out = check_new_folder(args.out, "--out", parents=False)
    created = not out.exists()
    out.mkdir(exist_ok=True)
    try:
        with exclusive(out / "atlas.parquet"):      # one writer of the folder at a time
            return _atlas_locked(args, out)
    except BaseException:
        if created:     # a run that wrote nothing leaves no folder behind
            (out / ".atlas.parquet.lock").unlink(missing_ok=True)
            if not any(out.iterdir()):
                out.rmdir()
        raise


def _atlas_locked(args, out: Path) -> dict:
    start = time.perf_counter()
    data = data_of(args)
    names, images, _ = images_of(args, data)
    source = _source(args, data, names)
    description = dict(model=args.model, dtype=str(args.dtype or "float32"), source=source,
                       seed=args.seed, top_k=args.top_k, examples=args.examples,
                       images=images_digest(image_hashes(names, images)))   # names and contents
    parquet, page = out / "atlas.parquet", out / "index.html"
    table, meta = _check_atlas_folder(out, description)   # resume: a finished run is reused
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
        if weights_changed:   # the old page goes first: a run killed below never pairs them
            page.unlink(missing_ok=True)
        write_atlas(table, parquet, meta=dict(description=description, n_images=len(images),
                                              weights=weights, image_names=names,
                                              captions=[str(c) for c in captions]))
    elif not page.exists():    # the page of a finished atlas is gone (a crash before it was written)
        captions = meta.get("captions")   # the tooltips: recorded captions, else captioned again
        if not isinstance(captions, list) or len(captions) != len(images):
            captions = [c.text for c in vlm.describe(images, batch_size=args.batch_size, progress=True)]
    if not resumed or not page.exists():
        render_atlas_html(vlm, table, images, page, captions=captions, names=names,
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


def _source(args, data, names) -> str:
    """The images of the run in one line (part of the settings a finished run must match)."""
    source = (f"scenes n={args.scenes} seed={args.seed}" if args.scenes
              else f"images {Path(args.images).resolve()} ({len(names)} files)")   # contents: images=
    if args.annotations:   # its categories are the candidate nouns: part of what was run
        source += (f" annotations {Path(args.annotations).resolve()} "
                   f"({len(data.categories)} categories, {names_hash(data.categories)})")
    return source


def _check_atlas_folder(out: Path, description: dict) -> tuple:
    """``(table, meta)`` of a finished atlas in ``out`` with the same ``description``,
    ``(None, None)`` when it holds none; refuses a folder holding another run, or an
    ``atlas.parquet`` / ``index.html`` this command did not write (they are left as they are)."""
    parquet, page = out / "atlas.parquet", out / "index.html"
    if page.exists() and not is_atlas_page(page):
        raise CliError(f"{page} exists and was not written by mmneurons atlas; it is left untouched: "
                       "choose another --out")
    if not parquet.exists():
        return None, None
    try:
        table, meta = read_atlas(parquet)
    except Exception as exc:
        raise CliError(f"{parquet} exists and is not a readable atlas ({exc}); remove it or "
                       "choose another --out") from exc
    recorded = meta.get("description")
    if not isinstance(recorded, dict):
        raise CliError(f"{parquet} was not written by mmneurons atlas (no settings recorded); it is "
                       "left untouched: choose another --out")
    diff = differences(recorded, description)
    if diff:
        raise CliError(f"{parquet} holds another run ({'; '.join(diff)}); rerun with its settings to "
                       "reuse it, or remove the folder / choose another --out")
    return table, meta
