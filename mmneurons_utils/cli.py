"""The ``mmneurons`` console script.

    mmneurons describe --model tiny-llava --scenes 500 --seed 0 --json
    mmneurons describe --model /path/to/llava-1.5-7b-hf --images photos/ --device cuda
    mmneurons find --images coco_subset/ --annotations coco_subset/annotations.json --out r.parquet
    mmneurons perturb --model tiny-llava --scenes 20 --seed 0 --k 50 --zero --json
    mmneurons edit --model tiny-llava --source dog --target cat --scenes 200 --seed 0 --save edited/
    mmneurons atlas --model tiny-llava --scenes 256 --seed 0 --top-k 10 --examples 8 --out atlas/ --json
    mmneurons export-scenes --scenes 24 --seed 0 --out scenes_folder/
    accelerate launch --num_processes 8 -m mmneurons_utils.cli find --device cuda --images photos/ --out big.parquet

Bad input exits with code 2 and one line naming the bad value and what is accepted.
With ``--json`` the last line of standard output is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .model.nouns import NounTaggerMissing
from .tiny.scenes import caption_scores, make_scenes


class CliError(ValueError):
    """A bad command-line value."""


def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer ≥ ``minimum``, else a one-line error naming the value."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_seed = _int_at_least(0, "a non-negative integer seed")


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block): ``mmneurons find: error: …``."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _check_method(method: str) -> str:
    from .method.identify import METHODS

    if method not in METHODS:
        raise CliError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    return method


def _check_model_options(args) -> None:
    """``--device`` and ``--dtype`` checked before anything is read or loaded."""
    from .model.vlm import _device, _dtype

    _dtype(args.dtype)
    if args.device is not None:
        _device(args.device)


def _check_new_folder(folder, option: str, parents: bool = True):
    """``folder`` (to be created, or empty) can be made here: its nearest existing ancestor
    (``parents=False``: its parent) is a writable folder."""
    from .store.results import check_writable_folder

    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise CliError(f"{option} {folder} exists and is not a folder; choose a folder")
    if not parents and not folder.parent.is_dir():
        raise CliError(f"folder {folder.parent} of {option} does not exist")
    existing = folder if folder.exists() else folder.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    check_writable_folder(existing, f"{option} {folder}" if existing == folder else
                          f"folder {existing} (where {option} {folder} would be made)")
    return folder


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny-llava",
                   help="tiny-llava, tiny-instructblip, a local checkpoint folder or a hub id")
    p.add_argument("--device", default=None,
                   help="cpu (default), cuda, cuda:N, mps; under accelerate launch the default is "
                        "each process's own device and cuda means cuda:<local rank>")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16, float16")


def _add_image_args(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--scenes", type=_positive_int, metavar="N", help="N generated scenes")
    source.add_argument("--images", metavar="DIR", help="a folder of images")
    p.add_argument("--annotations", metavar="FILE",
                   help="with --images: a COCO instances JSON (images, annotations with bbox, "
                        "categories) giving each image's objects; its categories are the candidate "
                        "nouns of a real model when spaCy is not installed")
    p.add_argument("--seed", type=_seed, default=0,
                   help="scene seed (0–9999 are held out from training; default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mmneurons", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("describe", help="caption images with the paper's prompt")
    _add_model_args(d)
    _add_image_args(d)
    d.add_argument("--max-new-tokens", type=_positive_int, default=20)
    d.add_argument("--batch-size", type=_positive_int, default=32)
    d.add_argument("--nouns", help="comma-separated nouns to look for (real models without spaCy)")
    d.set_defaults(func=cmd_describe)

    f = sub.add_parser("find", help="identify the multi-modal neurons of every caption noun")
    _add_model_args(f)
    _add_image_args(f)
    f.add_argument("--top-k", type=_positive_int, default=50)
    f.add_argument("--method", default="contribution",
                   help="contribution (default, the paper), gradient (gradient × activation at the "
                        "noun step), gradient_image (attribution at the image positions), random")
    f.add_argument("--out", required=True, help="results .parquet (resumed if it exists)")
    f.add_argument("--batch-size", type=_positive_int, default=16)
    f.set_defaults(func=cmd_find)

    b = sub.add_parser("bench", help="measure identification overhead, gradient speed-up, memory")
    _add_model_args(b)
    b.add_argument("--n-images", type=_positive_int, default=16)
    b.add_argument("--seed", type=_seed, default=0)
    b.add_argument("--repeats", type=_positive_int, default=3)
    b.add_argument("--offload", action="store_true",
                   help="also time find with every decoder layer offloaded to disk (offload_slowdown)")
    b.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    b.set_defaults(func=cmd_bench)
    _add_causal_commands(sub)
    _add_atlas_command(sub)

    x = sub.add_parser("export-scenes", help="write embedded scenes as a folder of PNGs with a COCO "
                                             "annotations.json (to try the --images path offline)")
    x.add_argument("--scenes", type=_positive_int, required=True, metavar="N", help="N scenes")
    x.add_argument("--seed", type=_seed, default=0, help="scene seed (default 0)")
    x.add_argument("--out", required=True, metavar="DIR", help="a new or empty folder")
    x.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    x.set_defaults(func=cmd_export_scenes)
    return parser


def _add_atlas_command(sub) -> None:
    """``atlas``: every noun's recurring units with their dataset examples, as parquet + HTML."""
    a = sub.add_parser("atlas", help="neuron atlas: each noun's recurring units with dataset examples "
                                     "(atlas.parquet and a static index.html)")
    _add_model_args(a)
    _add_image_args(a)
    a.add_argument("--top-k", type=_positive_int, default=10, help="units per (image, noun) (default 10)")
    a.add_argument("--examples", type=_positive_int, default=8,
                   help="top dataset images kept per unit (default 8)")
    a.add_argument("--out", required=True, metavar="DIR",
                   help="output folder (created; a finished run with the same settings and weights is "
                        "reused, one made with other weights of the model recomputed)")
    a.add_argument("--batch-size", type=_positive_int, default=16)
    a.set_defaults(func=cmd_atlas)


def _add_causal_commands(sub) -> None:
    """``perturb`` (causal effect of the top units) and ``edit`` (targeted editing)."""
    p = sub.add_parser("perturb", help="perturb the top-k units of each caption noun vs k random units")
    _add_model_args(p)
    _add_image_args(p)
    p.add_argument("--k", type=_positive_int, default=50, help="units per noun (default 50)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--sigma", type=float, help="Gaussian noise of this σ (× the column's RMS)")
    how.add_argument("--zero", action="store_true", help="zero the write vectors (the default)")
    p.add_argument("--absolute", action="store_true", help="σ is absolute, not relative to the column")
    p.add_argument("--n-random", type=_positive_int, default=3, help="random draws per noun (default 3)")
    p.add_argument("--gradient", action="store_true", help="also the gradient × activation ranking")
    p.set_defaults(func=cmd_perturb)

    e = sub.add_parser("edit", help="edit the source noun's neurons so that the model says the target")
    _add_model_args(e)
    e.add_argument("--source", required=True, help="a noun the captions say")
    e.add_argument("--target", required=True, help="the noun to say instead")
    e.add_argument("--scenes", type=_positive_int, required=True, metavar="N",
                   help="N scenes: half of those saying the source are edited, the rest held out")
    e.add_argument("--seed", type=_seed, default=0, help="scene seed (default 0)")
    e.add_argument("--k", "--n-neurons", dest="k", type=_positive_int, default=5,
                   help="how many units to edit (default 5)")
    e.add_argument("--method", "--units", dest="method", default="contribution",
                   help="how the units are chosen: contribution (default), gradient, gradient_image or random")
    e.add_argument("--steps", type=_positive_int, default=150, help="most Adam steps (default 150)")
    e.add_argument("--save", metavar="DIR", help="save the edited model to this new folder")
    e.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    e.set_defaults(func=cmd_edit)


def _data(args):
    """The :class:`~mmneurons_utils.data.datasets.ImageSet` of ``--scenes``/``--seed`` or
    ``--images`` (with ``--annotations``)."""
    from .data.datasets import load_images

    if args.annotations and not args.images:
        raise CliError("--annotations needs --images DIR, the folder of the images it annotates")
    if args.images:
        data = load_images(args.images, args.annotations)
        for note in data.notes:          # what the annotations lack, one line each
            print(f"mmneurons {args.command}: note: {note}", file=sys.stderr)
        return data
    return load_images(n=args.scenes, seed=args.seed)


def _images(args, data=None):
    """``(names, images, scenes or None)`` from ``--scenes``/``--seed`` or ``--images``."""
    data = _data(args) if data is None else data
    return data.names, data.images, (data if data.kind == "scenes" else None)


def _load_model(args, data):
    """The model of ``--model``; with ``--annotations`` its candidate nouns are the
    annotation's categories (used only by a real model when no tagger is installed)."""
    from .data.datasets import prepare_model
    from .model.vlm import load_vlm

    vlm = load_vlm(args.model, device=args.device, dtype=args.dtype)
    if args.annotations:
        prepare_model(vlm, data)
        _note_unmatched_categories(args, vlm, data)
    return vlm


def _note_unmatched_categories(args, vlm, data) -> None:
    """One line naming the annotation categories that no word of the model's noun vocabulary
    names (their boxes can never be matched to a caption noun)."""
    from .data.datasets import match_category

    if vlm.noun_vocabulary is None:
        return
    named = {match_category(word, data.categories) for word in vlm.noun_vocabulary}
    unmatched = [c for c in data.categories if c not in named]
    if unmatched:
        print(f"mmneurons {args.command}: note: {len(unmatched)} categories of {args.annotations} "
              f"name no noun the model says ({', '.join(unmatched[:5])}{', …' if len(unmatched) > 5 else ''});"
              " their boxes are never used", file=sys.stderr)


def _say_noun_source(args, vlm) -> None:
    """With ``--images`` and no ``--json``, one line naming where caption nouns come from."""
    if args.images and not args.json:
        print(f"caption nouns from {vlm.noun_source}")


def cmd_describe(args) -> dict:
    data = _data(args)
    names, images, scenes = _images(args, data)
    vlm = _load_model(args, data)
    nouns = [n.strip() for n in args.nouns.split(",") if n.strip()] if args.nouns else None
    captions = vlm.describe(images, max_new_tokens=args.max_new_tokens,
                            batch_size=args.batch_size, nouns=nouns, progress=True)
    rows = []
    for i, (name, cap) in enumerate(zip(names, captions)):
        row = dict(image=name, caption=cap.text, nouns=cap.nouns)
        if scenes is not None:
            row["truth"] = scenes[i].caption
        elif data.has_nouns:
            row["objects"] = list(data[i].nouns)   # the annotation's object names
        rows.append(row)
        if not args.json:
            truth = f"   [truth: {row['truth']}]" if "truth" in row else ""
            print(f"{name}: {cap.text}{truth}")
    result = dict(model=args.model, n_images=len(images), captions=rows,
                  noun_source="nouns= given" if nouns is not None else vlm.noun_source)
    if scenes is not None:
        result.update(caption_scores([c.text for c in captions], scenes))
        if not args.json:
            print(f"noun recall {result['noun_recall']:.4f}  noun precision "
                  f"{result['noun_precision']:.4f}  exact match {result['exact_match']:.4f}  "
                  f"({len(scenes)} scenes, seed {args.seed})")
    return result


def cmd_find(args) -> dict | None:
    from .batch.parallel import launched_state
    from .store.results import check_output_file, exclusive

    _check_method(args.method)
    check_output_file(args.out)     # before the lock, the images and the model
    state = launched_state()        # None: one process (no accelerate launch)
    if state is not None and not state.is_main_process:
        return _find_locked(args, state)   # only the main process writes --out
    with exclusive(args.out):       # a second writer of --out waits, then resumes
        return _find_locked(args, state)


def _find_settings(args, vlm=None) -> dict:
    """What decides ``find``'s rows: recorded in ``--out`` and compared on a rerun (the
    seed only where it draws: ``--method random``; the scenes' seed is in their names)."""
    dtype = str(args.dtype or "float32")
    settings = dict(model=args.model, dtype=_DTYPE_NAMES.get(dtype, dtype), method=args.method, top_k=args.top_k,
                    seed=args.seed if args.method == "random" else None)
    if vlm is not None:
        from .model.cache import weights_hash

        settings.update(weights=weights_hash(vlm), nouns=_noun_identity(vlm))
    return settings


_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _noun_identity(vlm) -> str:
    """Where the caption nouns come from, with a hash of the candidate list when it is one."""
    if vlm.noun_vocabulary is None and vlm.candidate_nouns:
        return f"{vlm.noun_source} {_names_hash(sorted(vlm.candidate_nouns))}"
    return vlm.noun_source


def _find_locked(args, state) -> dict | None:
    from .method.identify import check_top_k
    from .batch.parallel import checked_part_files, process_device
    from .store.provenance import image_hashes
    from .store.results import ResultFile

    results = ResultFile(args.out)  # refuses a file it did not write, before any work
    parts = checked_part_files(results.path)   # left by an interrupted accelerate launch run
    data = _data(args)
    names, images, _ = _images(args, data)
    hashes = image_hashes(names, images)
    files = [results] + [ResultFile(p) for p in parts]
    for f in files:                  # other settings or changed images: refuse before the model loads
        f.expect(_find_settings(args), hashes, data.key)
    if state is not None:
        args.device = process_device(state, args.device)
    vlm = _load_model(args, data)
    check_top_k(vlm, args.top_k)
    settings = _find_settings(args, vlm)
    for f in files:
        f.expect(settings, hashes, data.key)
    run = (settings, hashes, data.key)
    if state is not None or parts:
        return _find_in_parts(args, state, results, vlm, names, images, run)
    _say_noun_source(args, vlm)
    done = set(results.done)
    todo = [i for i, name in enumerate(names) if name not in done]
    _identify(args, vlm, names, images, todo, results, f"find ({args.method})")
    return _find_summary(args, vlm, len(names), len(todo), len(results.table))


def _find_summary(args, vlm, n_images: int, n_new: int, n_rows: int, by: str = "", **extra) -> dict:
    """``find``'s JSON summary, and its one line without ``--json`` (``by``: who identified)."""
    summary = dict(out=str(args.out), model=args.model, method=args.method, top_k=args.top_k,
                   n_images=n_images, n_new=n_new, n_skipped=n_images - n_new, n_rows=n_rows,
                   noun_source=vlm.noun_source, **extra)
    if not args.json:
        print(f"{n_new} images identified{by}, {n_images - n_new} already done; "
              f"{n_rows} rows in {args.out}")
    return summary


def _identify(args, vlm, names, images, todo, results, desc, progress=True) -> None:
    """Identify the images ``todo`` (indices into the run) batch by batch into ``results``."""
    from tqdm.auto import tqdm

    from .method.identify import find_neurons

    bar = tqdm(total=len(todo), desc=desc, disable=not progress)
    for start in range(0, len(todo), args.batch_size):
        batch = todo[start:start + args.batch_size]
        table = find_neurons(vlm, [images[i] for i in batch], method=args.method, top_k=args.top_k,
                             seed=args.seed, image_indices=batch)
        caption_of = dict(zip(batch, table.attrs["captions"]))
        table.insert(0, "image_id", [names[i] for i in table["image"]])
        table.insert(1, "caption", [caption_of[i] for i in table["image"]])
        table.insert(2, "model", args.model)
        results.append(table.drop(columns="image"), [names[i] for i in batch])
        bar.update(len(batch))
    bar.close()


def _find_in_parts(args, state, results, vlm, names, images, run) -> dict | None:
    """``find`` through part files (:mod:`mmneurons_utils.batch.parallel`): under ``accelerate launch``
    each process identifies its share of the images, the main process merges; one process that
    finds part files of an interrupted parallel run finishes it the same way. Only the main
    process prints; the others return ``None``."""
    from .batch.parallel import PartRun

    if state is None:       # one process, part files beside --out
        from accelerate import PartialState

        state = PartialState(cpu=True)
    main_process = state.is_main_process
    if main_process:
        _say_noun_source(args, vlm)
    settings, hashes, source = run
    run = PartRun(results.path, names, results.done, state)
    run.part.expect(settings, hashes, source)    # the part records this run's settings too
    n = state.num_processes
    desc = f"find ({args.method})" + (f", process {state.process_index} of {n}" if n > 1 else "")
    _identify(args, vlm, names, images, run.mine, run.part, desc, progress=main_process)
    merged = run.finish()
    if merged is None:
        return None
    by = f" by {n} processes" if n > 1 else " (part files of an earlier run merged)"
    return _find_summary(args, vlm, len(names), len(run.todo), len(merged.table), by, n_processes=n)


def cmd_bench(args) -> dict:
    from .batch.bench import run_bench
    from .model.vlm import load_vlm

    vlm = load_vlm(args.model, device=args.device, dtype=args.dtype)
    result = run_bench(vlm, n_images=args.n_images, seed=args.seed, repeats=args.repeats,
                       offload=args.offload)
    if not args.json:
        for key, value in result.items():
            print(f"{key}: {value}")
    return result


def _finite(value):
    """JSON-safe number: NaN → None."""
    return None if isinstance(value, float) and value != value else value


def cmd_perturb(args) -> dict:
    from .interventions.causal import causal_curves, half_removal_k, summarize
    from .method.identify import METHODS

    if args.sigma is not None and not 0 < args.sigma < float("inf"):   # also nan, inf
        raise CliError(f"--sigma must be a finite positive number (× the column's RMS, or absolute "
                       f"with --absolute), got {args.sigma!r}")
    data = _data(args)
    images = data.images
    vlm = _load_model(args, data)
    total = vlm.n_layers * vlm.d_ff
    if args.k > total:
        raise CliError(f"--k must be at most the model's {total} units, got {args.k}")
    methods = METHODS if args.gradient else ("contribution", "random")   # METHODS: every ranking
    curves = causal_curves(vlm, images, ks=(args.k,), methods=methods, sigmas=(args.sigma,),
                           n_random=args.n_random, seed=args.seed, relative=not args.absolute,
                           progress=True)
    if curves.empty:
        raise CliError("no caption names a noun; nothing to perturb (try more --scenes)")
    s = summarize(curves).set_index("method")
    names = {"contribution": "top", "random": "random", "gradient": "gradient",
             "gradient_image": "gradient_image"}
    result = dict(model=args.model, k=args.k, perturbation=curves.perturbation.iloc[0],
                  n_images=len(images), n_nouns=int(s.loc["contribution", "n"]),
                  margin_clean=float(curves.margin_clean[curves.method == "contribution"].mean()))
    for method, name in names.items():
        if method in s.index:
            result[f"margin_drop_{name}"] = float(s.loc[method, "margin_drop"])
            result[f"prob_drop_{name}"] = float(s.loc[method, "prob_drop"])
            result[f"noun_removed_{name}"] = float(s.loc[method, "noun_removed"])
            result[f"caption_changed_{name}"] = float(s.loc[method, "caption_changed"])
    if not args.json:
        for method in s.index:
            print(f"{method:>12}: margin drop {s.loc[method, 'margin_drop']:.3f}, noun removed "
                  f"{s.loc[method, 'noun_removed']:.3f}, caption changed {s.loc[method, 'caption_changed']:.3f}")
        print(half_removal_k(curves).to_string(index=False))
    return {k: _finite(v) for k, v in result.items()}


def cmd_edit(args) -> dict:
    from pathlib import Path

    from .batch.edit_evaluation import ImagePool, run_edit
    from .interventions.editing import UNIT_CHOICES, target_token
    from .model.vlm import load_vlm

    if args.method not in UNIT_CHOICES:
        raise CliError(f"--method must be one of {', '.join(UNIT_CHOICES)}, got {args.method!r}")
    if args.source == args.target:
        raise CliError(f"--source and --target are the same word ({args.source!r})")
    save = _check_new_folder(args.save, "--save") if args.save else None
    if save is not None and save.exists() and any(save.iterdir()):
        raise CliError(f"--save {save} already exists and is not an empty folder; choose a new one")
    _check_edit_words(args)         # before the model loads
    vlm = load_vlm(args.model, device=args.device, dtype=args.dtype)
    target_token(vlm, args.target)  # bad target: fail before captioning anything
    pool = ImagePool.build(vlm, [s.image for s in make_scenes(args.scenes, seed=args.seed)], progress=True)
    said = pool.nouns()
    if said and args.source not in said:   # a word of the captions that is no noun ("a", "of")
        raise CliError(f"--source {args.source!r} is not a noun the {len(pool.captions)} captions "
                       f"say; nouns said: {', '.join(said)}")
    edit = run_edit(vlm, pool, args.source, args.target, k=args.k, method=args.method,
                    seed=args.seed, steps=args.steps, keep=save is not None, progress=True)
    m = edit.metrics
    result = dict(model=args.model, source=args.source, target=args.target, applied=bool(m["applied"]),
                  success=m["success"], generalization=m.get("generalization"),
                  locality=m.get("locality"), locality_kl=m.get("locality_kl"),
                  n_neurons=m["n_neurons"], units=[[int(l), int(u)] for l, u in edit.units],
                  converged=m["converged"], final_margin=m["final_margin"], steps=m["steps"],
                  weight_norm=m["weight_norm"], relative_norm=m["relative_norm"],
                  n_edit=m["n_edit"], n_heldout=m.get("n_heldout", 0), n_locality=m.get("n_locality", 0),
                  n_excluded_target=m["n_excluded_target"], saved=None)
    if save is not None:
        if edit.converged:
            result["saved"] = str(edit.save_pretrained(save))
        edit.undo()
    if not args.json:
        state = "converged" if edit.converged else f"FAILED (final margin {edit.final_margin:.3f})"
        print(f"edit {args.source} → {args.target} on {m['n_edit']} images, {m['n_neurons']} neurons: {state}")
        for before, after in zip(edit.captions_before, edit.captions_after):
            print(f"  {before}  →  {after}")
        side = (f"generalization {_finite(result['generalization'])}  locality {_finite(result['locality'])}  "
                f"weight change ‖Δ‖ {result['weight_norm']:.3f}" if result["applied"]
                else "not applied: no side effects to measure")
        print(f"success {result['success']:.3f}  {side}  ({result['n_excluded_target']} images "
              f"already saying {args.target} not scored)")
        if save is not None:
            print(f"saved to {save}" if result["saved"] else "not saved: the edit did not converge")
    return {k: _finite(v) for k, v in result.items()}


# words that are never the noun of an edit (articles, the prompt's words, pronouns, prepositions)
_NOT_NOUNS = frozenset("a an the of in on at to and or with without image picture photo this that "
                       "these those it its is are there some".split())


def _check_edit_words(args) -> None:
    """``--source`` / ``--target`` are single nouns: not an article or a preposition, letters
    only, and, for a model with a noun vocabulary (the embedded ones), words of it — checked
    from the checkpoint folder before the model loads."""
    from .model.vlm import EMBEDDED, EMBEDDED_DIR, ModelLoadError, read_noun_vocabulary

    for option, word in (("--source", args.source), ("--target", args.target)):
        if not word.replace("-", "").isalpha() or word.lower() in _NOT_NOUNS:
            raise CliError(f"{option} must be a noun (one word, letters only, not an article or "
                           f"preposition), got {word!r}")
    folder = EMBEDDED_DIR / args.model if args.model in EMBEDDED else Path(args.model).expanduser()
    try:
        vocabulary = read_noun_vocabulary(folder) if folder.is_dir() else None
    except (ModelLoadError, ValueError):
        return                  # the model's loader says what is wrong with the folder
    if vocabulary is not None and args.source not in vocabulary:
        raise CliError(f"--source {args.source!r} is not in the model's noun vocabulary; choose one "
                       f"of: {', '.join(sorted(vocabulary))}")


def cmd_atlas(args) -> dict:
    from .batch.parallel import launched_processes
    from .store.results import exclusive

    if launched_processes() > 1:
        raise CliError(f"atlas runs in one process, not under accelerate launch with "
                       f"{launched_processes()} processes (its dataset examples are one running top-k "
                       "over all images and its page is drawn from them); run it with "
                       "python -m mmneurons_utils.cli atlas …")
    out = _check_new_folder(args.out, "--out", parents=False)
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


def _check_atlas_folder(out, description: dict):
    """``(table, meta)`` of a finished atlas in ``out`` with the same ``description``,
    ``(None, None)`` when it holds none; refuses a folder holding another run, or an
    ``atlas.parquet`` / ``index.html`` this command did not write (they are left as they are)."""
    from .atlas.build import read_atlas
    from .companion.atlas_html import is_atlas_page
    from .store.provenance import differences

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


def _atlas_locked(args, out) -> dict:
    import resource
    import time
    from pathlib import Path

    from .atlas.build import build_atlas, summary, write_atlas
    from .companion.atlas_html import render_atlas_html
    from .method.identify import check_top_k
    from .store.provenance import image_hashes, images_digest
    from .model.cache import weights_hash

    start = time.perf_counter()
    data = _data(args)
    names, images, _ = _images(args, data)
    source = (f"scenes n={args.scenes} seed={args.seed}" if args.scenes
              else f"images {Path(args.images).resolve()} ({len(names)} files)")
    if args.annotations:   # its categories are the candidate nouns: part of what was run
        source += (f" annotations {Path(args.annotations).resolve()} "
                   f"({len(data.categories)} categories, {_names_hash(data.categories)})")
    description = dict(model=args.model, dtype=str(args.dtype or "float32"), source=source,
                       seed=args.seed, top_k=args.top_k, examples=args.examples,
                       images=images_digest(image_hashes(names, images)))   # names and contents
    parquet, page = out / "atlas.parquet", out / "index.html"
    table, meta = _check_atlas_folder(out, description)   # resume: a finished run is reused
    vlm = _load_model(args, data)
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
                                              weights=weights, image_names=names))
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
              f"{_finite(result['purity_contribution'])} vs random {_finite(result['purity_random'])}; "
              f"{state}: {parquet}, {page}")
    return {k: _finite(v) for k, v in result.items()}


def cmd_export_scenes(args) -> dict:
    from .data.datasets import write_image_folder
    from .tiny.scenes import NOUNS

    scenes = make_scenes(args.scenes, seed=args.seed)
    # the whole noun vocabulary as categories: the folder's labels are the scenes' labels
    out = write_image_folder(scenes, args.out, categories=list(NOUNS))
    result = dict(out=str(out), n_images=len(scenes), seed=args.seed,
                  n_boxes=sum(len(s.boxes) for s in scenes),
                  annotations=str(out / "annotations.json"))
    if not args.json:
        print(f"{len(scenes)} scenes (seed {args.seed}) written to {out}: PNG files and "
              f"annotations.json ({result['n_boxes']} boxes); e.g. mmneurons find --images {out} "
              f"--annotations {out / 'annotations.json'} --out results.parquet")
    return result


def _names_hash(names) -> str:
    import hashlib

    return hashlib.blake2b("\n".join(names).encode(), digest_size=6).hexdigest()


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse itself exits 2 with a one-line error
    try:
        if hasattr(args, "device"):
            _check_model_options(args)
        result = args.func(args)
    except (ValueError, NounTaggerMissing) as exc:  # bad input; anything else is a bug: let it show
        _close_progress_bars()
        message = " ".join(str(exc).split())      # one line, whatever the message held
        print(f"mmneurons {args.command}: error: {message}{_which_process()}", file=sys.stderr)
        return 2
    if args.json and result is not None:   # None: a process of accelerate launch other than the main
        print(json.dumps(result))
    return 0


def _close_progress_bars() -> None:
    """Close the progress bars a failed command left open, so that its error line starts
    on a line of its own (not glued to a bar's)."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()
    sys.stderr.flush()


def _which_process() -> str:
    """`` (process r of P)`` under a launcher with several processes, else empty."""
    import os

    from .batch.parallel import launched_processes

    try:
        n = launched_processes()
    except ValueError:
        return ""
    return f" (process {os.environ.get('RANK', '?')} of {n})" if n > 1 else ""


if __name__ == "__main__":
    sys.exit(main())
