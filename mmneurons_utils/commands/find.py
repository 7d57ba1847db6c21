"""``describe``, ``find`` (one process, or each process of ``accelerate launch`` into a part
file), ``bench`` and ``export-scenes``. ``find`` records its settings and the images' content
hashes in ``--out``: a rerun with the same resumes, one with others is refused before the model
loads; one writer of ``--out`` at a time."""

from __future__ import annotations

from accelerate import PartialState
from tqdm.auto import tqdm

from ..batch.bench import run_bench
from ..batch.parallel import PartRun, checked_part_files, launched_state, process_device
from ..data.datasets import write_image_folder
from ..method.identify import check_top_k, find_neurons
from ..model.cache import weights_hash
from ..model.vlm import load_vlm
from ..store.provenance import image_hashes
from ..store.results import ResultFile, check_output_file, exclusive
from ..tiny.scenes import NOUNS, caption_scores, make_scenes
from ..widgets.timing import time_explorer
from .common import check_method, data_of, images_of, load_model, names_hash, say_noun_source


def cmd_describe(args) -> dict:
    data = data_of(args)
    names, images, scenes = images_of(args, data)
    vlm = load_model(args, data)
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
    check_method(args.method)
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
        settings.update(weights=weights_hash(vlm), nouns=_noun_identity(vlm))
    return settings


_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _noun_identity(vlm) -> str:
    """Where the caption nouns come from, with a hash of the candidate list when it is one."""
    if vlm.noun_vocabulary is None and vlm.candidate_nouns:
        return f"{vlm.noun_source} {names_hash(sorted(vlm.candidate_nouns))}"
    return vlm.noun_source


def _find_locked(args, state) -> dict | None:
    results = ResultFile(args.out)  # refuses a file it did not write, before any work
    parts = checked_part_files(results.path)   # left by an interrupted accelerate launch run
    data = data_of(args)
    names, images, _ = images_of(args, data)
    hashes = image_hashes(names, images)
    files = [results] + [ResultFile(p) for p in parts]
    for f in files:                  # other settings or changed images: refuse before the model loads
        f.expect(_find_settings(args), hashes, data.key)
    if state is not None:
        args.device = process_device(state, args.device)
    vlm = load_model(args, data)
    check_top_k(vlm, args.top_k)
    settings = _find_settings(args, vlm)
    for f in files:
        f.expect(settings, hashes, data.key)
    run = (settings, hashes, data.key)
    if state is not None or parts:
        return _find_in_parts(args, state, results, vlm, names, images, run)
    say_noun_source(args, vlm)
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
    if state is None:       # one process, part files beside --out

        state = PartialState(cpu=True)
    main_process = state.is_main_process
    if main_process:
        say_noun_source(args, vlm)
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
    vlm = load_vlm(args.model, device=args.device, dtype=args.dtype)
    result = run_bench(vlm, n_images=args.n_images, seed=args.seed, repeats=args.repeats,
                       offload=args.offload)
    result.update(time_explorer(vlm, seed=args.seed, repeats=args.repeats))
    if not args.json:
        for key, value in result.items():
            print(f"{key}: {value}")
    return result


def cmd_export_scenes(args) -> dict:
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
