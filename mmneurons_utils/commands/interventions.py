"""``perturb`` (the causal effect of each noun's top units against random ones) and ``edit``
(targeted editing of a source noun's units, evaluated on held-out scenes)."""

from __future__ import annotations


from ..batch.edit_evaluation import ImagePool
from ..batch.editor_comparison import JSON_KEYS, evaluate_editor
from ..interventions.causal import causal_curves, half_removal_k, summarize
from ..interventions.editing import target_token
from ..interventions.editors import EDITORS, WEIGHT_EDITORS
from ..method.identify import METHODS, find_neurons_by_method
from ..model.loading import ModelLoadError, read_noun_vocabulary
from ..model.embedded import model_folder
from ..model.vlm import load_vlm
from ..properties.edit_metrics import METRIC_KEYS
from ..store.files import check_free_space
from ..tiny.scenes import make_scenes
from .common import CliError, check_new_folder, data_of, finite, load_model, model_bytes, nearest_existing


def cmd_perturb(args) -> dict:
    if args.absolute and args.sigma is None:
        raise CliError("--absolute scales the noise of --sigma, but no --sigma was given (the "
                       "default zeroes the units); add --sigma S or drop --absolute")
    if args.sigma is not None and not 0 < args.sigma < float("inf"):   # also nan, inf
        raise CliError(f"--sigma must be a finite positive number (× the column's RMS, or absolute "
                       f"with --absolute), got {args.sigma!r}")
    data = data_of(args)
    images = data.images
    vlm = load_model(args, data)
    total = vlm.n_layers * vlm.d_ff
    if args.k > total:
        raise CliError(f"--k must be at most the model's {total} units, got {args.k}")
    methods = METHODS if args.gradient else ("contribution", "random")   # METHODS: every ranking
    # one identification of the images (captions with their activations, the units of each
    # noun); the curves read its captions and rank from them with n_random random draws
    ident = find_neurons_by_method(vlm, images, methods=methods, top_k=args.k, seed=args.seed,
                                   progress=True)
    curves = causal_curves(vlm, ident, images, ks=(args.k,), methods=methods, sigmas=(args.sigma,),
                           n_random=args.n_random, seed=args.seed, relative=not args.absolute,
                           rerank=True, progress=True)
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
    return {k: finite(v) for k, v in result.items()}


def cmd_edit(args) -> dict:
    if args.method not in EDITORS:
        raise CliError(f"--method must be one of {', '.join(EDITORS)}, got {args.method!r}")
    if args.source == args.target:
        raise CliError(f"--source and --target are the same word ({args.source!r})")
    save = check_new_folder(args.save, "--save") if args.save else None
    if save is not None and save.exists() and any(save.iterdir()):
        raise CliError(f"--save {save} already exists and is not an empty folder; choose a new one")
    _check_edit_words(args)         # before the model loads
    vlm = load_vlm(args.model, device=args.device, dtype=args.dtype)
    target_token(vlm, args.target)  # bad target: fail before captioning anything
    if save is not None:            # room for the model, before the edit is learnt
        check_free_space(nearest_existing(save), model_bytes(vlm), f"--save {save}")
    pool = ImagePool.build(vlm, [s.image for s in make_scenes(args.scenes, seed=args.seed)], progress=True)
    said = pool.nouns()
    if said and args.source not in said:   # a word of the captions that is no noun ("a", "of")
        raise CliError(f"--source {args.source!r} is not a noun the {len(pool.captions)} captions "
                       f"say; nouns said: {', '.join(said)}")
    # the run_edit split (half of the source's images edited, 8 unrelated in the loss, the rest
    # held out / for locality), every editor on it, EasyEdit's metrics beside the package's
    edit, row = evaluate_editor(vlm, pool, args.source, args.target, args.method, k=args.k,
                                n_edit=None, n_unrelated=8, n_locality=None, n_heldout=None,
                                seed=args.seed, steps=args.steps, keep=save is not None, progress=True)
    m = edit.metrics
    unit_editor = args.method not in WEIGHT_EDITORS
    result = dict(model=args.model, source=args.source, target=args.target, applied=bool(m["accepted"]),
                  success=m["success"], generalization=m.get("generalization"),
                  locality=m.get("locality"), locality_kl=m.get("locality_kl"),
                  n_neurons=m["n_neurons"],
                  units=[[int(l), int(u)] for l, u in edit.units] if unit_editor else [],
                  converged=m["converged"], final_margin=m["final_margin"], steps=m["steps"],
                  weight_norm=m["weight_norm"], relative_norm=m["relative_norm"],
                  n_edit=m["n_edit"], n_heldout=m.get("n_heldout", 0), n_locality=m.get("n_locality", 0),
                  n_excluded_target=m["n_excluded_target"], saved=None,
                  layer=edit.layer, params_trained=edit.params_trained,
                  **{key: row[key] for key in JSON_KEYS if key != "applied"})
    if save is not None:
        if edit.converged:
            check_new_folder(save, "--save")     # still a place to write, and still free
            if save.exists() and any(save.iterdir()):
                raise CliError(f"--save {save} was filled by something else during the edit; it is "
                               "left untouched: rerun with a new folder (the same --seed redoes the edit)")
            try:
                result["saved"] = str(edit.save_pretrained(save))
            except OSError as exc:   # nothing half-written is left (a temporary folder, renamed)
                raise OSError(exc.errno, f"{exc.strerror or exc} while saving the edited model, so it "
                              "was not saved (the same --seed redoes the edit)", str(save)) from exc
        edit.undo()
    if not args.json:
        what = f"{m['n_neurons']} neurons" if unit_editor else f"{args.method} on down_proj of layer {edit.layer}"
        state = "converged" if edit.converged else f"FAILED (final margin {edit.final_margin:.3f})"
        print(f"edit {args.source} → {args.target} on {m['n_edit']} images, {what}: {state}")
        for before, after in zip(edit.captions_before, edit.captions_after):
            print(f"  {before}  →  {after}")
        side = (f"generalization {finite(result['generalization'])}  locality {finite(result['locality'])}  "
                f"weight change ‖Δ‖ {result['weight_norm']:.3f}" if result["applied"]
                else "not applied: no side effects to measure")
        print(f"success {result['success']:.3f}  {side}  ({result['n_excluded_target']} images "
              f"already saying {args.target} not scored)")
        print(f"parameters changed {result['params_changed']} (trained {result['params_trained']}), "
              f"{result['seconds']:.1f} s")
        if result["applied"]:
            print("  ".join(f"{key} {result[key]:.3f}" for key in METRIC_KEYS
                            if result[key] == result[key]))
        if save is not None:
            print(f"saved to {save}" if result["saved"] else "not saved: the edit did not converge")
    return {k: finite(v) for k, v in result.items()}


# words that are never the noun of an edit (articles, the prompt's words, pronouns, prepositions)
_NOT_NOUNS = frozenset("a an the of in on at to and or with without image picture photo this that "
                       "these those it its is are there some".split())


def _check_edit_words(args) -> None:
    """``--source`` / ``--target`` are single nouns: not an article or a preposition, letters
    only, and, for a model with a noun vocabulary (the embedded ones), words of it — checked
    from the checkpoint folder before the model loads."""
    for option, word in (("--source", args.source), ("--target", args.target)):
        if not word.replace("-", "").isalpha() or word.lower() in _NOT_NOUNS:
            raise CliError(f"{option} must be a noun (one word, letters only, not an article or "
                           f"preposition), got {word!r}")
    folder = model_folder(args.model)
    try:
        vocabulary = read_noun_vocabulary(folder) if folder.is_dir() else None
    except (ModelLoadError, ValueError):
        return                  # the model's loader says what is wrong with the folder
    if vocabulary is not None and args.source not in vocabulary:
        raise CliError(f"--source {args.source!r} is not in the model's noun vocabulary; choose one "
                       f"of: {', '.join(sorted(vocabulary))}")
