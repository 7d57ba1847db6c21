"""``mmneurons bench``: the identification's cost, measured as ratios in one run.

* ``overhead_ratio`` — ``find_neurons`` (generation with activation capture, then
  scores and top tokens for every noun) ÷ plain ``describe`` on the same images.
  The floor is 1.0: identification needs the caption.
* ``gradient_speedup`` — per (image, noun), the gradient × activation baseline's
  scoring time ÷ the contribution score's, both after the shared generation
  (``gradient_speedup_end_to_end`` includes the generation on both sides);
  ``gradient_image_speedup`` the same for the image-position attribution.
* ``atlas_ratio`` — the atlas pass (``atlas.build_atlas``: captioning with image
  activations, the streaming dataset-example merge, identification, purity, modality)
  ÷ plain ``describe`` on the same images.
* ``official_speedup`` — the official code's identification (reimplemented in
  :mod:`mmneurons_utils.batch.official`: batch size 1, no KV cache so every generated token
  re-runs the whole model, vision tower included; the gate-only ``act_fn`` activation; the
  ``W_out·W_U`` projection of every layer precomputed for the whole vocabulary) ÷ ours
  (``find_neurons``: batch size 16, KV cache on, contribution, top-50) on the same images,
  after checking that both make the same captions and pick the same nouns at the same
  steps (:class:`~mmneurons_utils.batch.official.OfficialMismatch` otherwise). ``official_s`` and
  ``official_ours_s`` are the two times, ``official_images_per_s`` the official
  throughput, ``official_prepare_s`` its one-time projection (outside the ratio: the
  official code runs it as a separate script), ``official_forwards_per_image`` the full
  forwards it runs per image, ``official_n_nouns`` the nouns both picked;
  ``official_projection_gb`` the memory of that projection (``L × F × V`` float16) beside
  ``ours_logit_weights_mb``, what ours holds per noun token (``W_U[t] · W_out``: ``L × F`` float32).
* ``images_per_s`` — ours (``find_neurons``, contribution, top-50) in images per second at
  batch sizes 1, 8 and 32: a dict keyed by the batch size as a string,
  ``{"1": …, "8": …, "32": …}``, measured on the first ``max(n_images, 32)`` scenes of the
  seed (``images_per_s_n_images``) so that every batch size gets a full batch.
* ``offload_slowdown`` (``--offload``) — ``find_neurons`` with every decoder layer and the
  unembedding offloaded to disk (accelerate device map) ÷ the loaded model, on the same images.
* ``explorer_update_s`` (added by ``mmneurons bench``, from
  :mod:`mmneurons_utils.widgets.timing`, a layer above this one) — the neuron browser's
  response to an image change (reading the identification's caption and units, the unit list, the heatmap render), the least of the
  changes timed; ``explorer_update_median_s`` their median. The tests assert what a change
  does, never how long it takes.
* ``causal_speedup`` — ``causal_curves`` (the causal ablations of an identification's units:
  zeroing at two ``k`` and noise at one σ, contribution and random units) one condition at a
  time with the weights perturbed in place (``batch_size=None``, the reference) ÷ the batched
  path (every condition of an image in one batch with per-row hooks, one teacher-forced
  forward, one cached ``generate``), on the first ``causal_n_images`` images: the same rows,
  margins within float summation order (``causal_max_margin_diff``, measured here).
  ``causal_s`` / ``causal_sequential_s`` the two times, ``causal_conditions`` the rows.
* ``vocab_memory_fraction`` — the neuron-vocabulary computation's peak extra
  memory ÷ the size of the full ``W_out·W_U`` product for one LLaVA-1.5-7B-shaped
  layer (random weights, d_ff 11008 × d_model 4096 × vocabulary 32000), measured in
  a fresh subprocess (peak RSS on CPU, ``max_memory_allocated`` on CUDA).

Every time is the least of ``repeats`` interleaved runs in one call (A B A B …, one untimed
warm-up call each first), and every ratio is one such minimum over another: load that comes
and goes falls on both sides alike, and each side keeps its least-disturbed run, so the
ratios (``overhead_ratio``, the speed-ups) are what to compare across machines and runs.
The absolute times (``*_s``, ``*_ms_per_noun``, ``images_per_s``) are this machine's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import torch

from ..atlas.build import build_atlas
from ..interventions.causal import causal_curves
from ..method.identify import find_neurons_by_method
from ..method.identify import find_neurons, logit_weights, rank_units
from ..method.scoring import unit_top_tokens
from ..model.vlm import ModelLoadError, load_vlm
from ..tiny.scenes import make_scenes
from .official import check_same_nouns, official_find, prepare_official


THROUGHPUT_BATCH_SIZES = (1, 8, 32)
OURS_BATCH_SIZE = 16     # find_neurons' default: ours in official_speedup
CAUSAL_N_IMAGES = 4      # causal_speedup's images (each holds ~2 nouns × 2 methods × 2 k × 2 σ)


def _interleaved(*fns, repeats: int, warm_up: bool = True, clock=time.perf_counter) -> list[float]:
    """The least time of each of ``fns`` over ``repeats`` rounds, every round calling each
    of them once in turn (A B A B …), after one untimed call of each when ``warm_up``.

    Interleaving makes load that comes and goes fall on all of them alike, and the minimum
    keeps each one's least-disturbed run (load only ever adds time), so ratios of the
    returned times hold on a busy machine where a single run or a median would not.
    ``clock`` is the timer (a fake one in the tests)."""
    if warm_up:
        for fn in fns:
            fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = clock()
            fn()
            best[i] = min(best[i], clock() - start)
    return best


def time_identification(vlm, images, repeats: int = 3, top_k: int = 50,
                        clock=time.perf_counter) -> dict:
    """``overhead_ratio`` and the gradient speed-ups (see the module docstring): each time the
    least of ``repeats`` interleaved runs in this call (:func:`_interleaved`), each ratio one of
    those minima over another; ``repeats`` is returned with them. The ratios are what to
    compare across machines; the absolute times are this machine's."""
    describe = lambda: vlm.describe(images)
    identify = lambda: find_neurons(vlm, images, top_k=top_k)
    t_describe, t_identify = _interleaved(describe, identify, repeats=repeats, clock=clock)
    captions = vlm.describe(images, activation="down_proj_input")
    pairs = [(img, cap, t) for img, cap in zip(images, captions) for t in cap.noun_tokens]
    if not pairs:
        raise ValueError("the benchmark images produced no nouns; use other images")

    # each scorer as find_neurons runs it: every noun's top units (rank_units), then one
    # logit-lens pass over all of them; the model is warm from the calls above, and the
    # minimum drops a slower first round anyway
    def rank_all(method):
        weights = logit_weights(vlm, [t for _, _, t in pairs])
        units = [r.units for img, cap in zip(images, captions) if cap.noun_tokens
                 for r in rank_units(vlm, img, cap, cap.noun_tokens, (method,), top_k,
                                     weights=weights)[method]]
        unit_top_tokens(vlm, np.concatenate(units))

    t_contribution, t_gradient, t_gradient_image = (
        t / len(pairs) for t in _interleaved(*(lambda m=m: rank_all(m) for m in
                                               ("contribution", "gradient", "gradient_image")),
                                             repeats=repeats, warm_up=False, clock=clock))
    t_generation = t_describe / len(pairs)
    return dict(
        overhead_ratio=round(t_identify / t_describe, 3),
        gradient_speedup=round(t_gradient / t_contribution, 1),
        gradient_image_speedup=round(t_gradient_image / t_contribution, 1),
        gradient_speedup_end_to_end=round((t_generation + t_gradient) / (t_generation + t_contribution), 2),
        describe_s=round(t_describe, 4),
        identify_s=round(t_identify, 4),
        contribution_ms_per_noun=round(1e3 * t_contribution, 3),
        gradient_ms_per_noun=round(1e3 * t_gradient, 3),
        gradient_image_ms_per_noun=round(1e3 * t_gradient_image, 3),
        n_images=len(images), n_nouns=len(pairs), repeats=repeats)


def time_official(vlm, images, throughput_images=None, repeats: int = 3, top_k: int = 50,
                  batch_sizes=THROUGHPUT_BATCH_SIZES) -> dict:
    """``official_speedup`` (official ÷ ours on ``images``) and ``images_per_s`` of ours at
    ``batch_sizes`` on ``throughput_images`` (default ``images``); minima of interleaved runs."""

    start = time.perf_counter()
    tables = prepare_official(vlm)
    t_prepare = time.perf_counter() - start
    ours = lambda: find_neurons(vlm, images, top_k=top_k, batch_size=OURS_BATCH_SIZE)
    official = lambda: official_find(vlm, images, tables, top_k=top_k)
    # the same captions, nouns and steps (greedy either way); also the warm-up of both
    captions = vlm.describe(images, batch_size=OURS_BATCH_SIZE, activation="down_proj_input")
    results = official()
    n_nouns = check_same_nouns(vlm, captions, results)
    if not n_nouns:
        raise ValueError("the benchmark images produced no nouns; use other images")
    ours()
    official_s, ours_s = _interleaved(official, ours, repeats=repeats, warm_up=False)
    many = list(throughput_images) if throughput_images is not None else list(images)
    t_batch = dict(zip(batch_sizes, _interleaved(
        *(lambda b=b: find_neurons(vlm, many, top_k=top_k, batch_size=b) for b in batch_sizes),
        repeats=repeats, warm_up=False)))
    return dict(
        official_speedup=round(official_s / ours_s, 2),
        official_s=round(official_s, 4), official_ours_s=round(ours_s, 4),
        official_images_per_s=round(len(images) / official_s, 2),
        official_prepare_s=round(t_prepare, 4),
        official_forwards_per_image=round(sum(len(r.token_ids) for r in results) / len(results), 2),
        official_n_nouns=n_nouns,
        # memory: the official full projection (every layer's F × V, float16) vs what ours keeps
        # per noun token (one row of W_U projected on every layer's W_out: L × F float32)
        official_projection_gb=round(sum(p.numel() * p.element_size() for p in tables.projection) / 1e9, 3),
        ours_logit_weights_mb=round(vlm.n_layers * vlm.d_ff * 4 / 1e6, 3),
        images_per_s={str(b): round(len(many) / t, 2) for b, t in t_batch.items()},
        images_per_s_n_images=len(many))


def time_atlas(vlm, images, repeats: int = 3, top_k: int = 10, examples: int = 8) -> dict:
    """``atlas_ratio``: ``build_atlas`` ÷ ``describe`` on ``images`` (minima of interleaved runs)."""

    describe = lambda: vlm.describe(images, batch_size=16)
    atlas = lambda: build_atlas(vlm, images, top_k=top_k, examples=examples, batch_size=16)
    t_describe, t_atlas = _interleaved(describe, atlas, repeats=repeats)
    return dict(atlas_ratio=round(t_atlas / t_describe, 2), atlas_s=round(t_atlas, 3))


CAUSAL_SETTINGS = dict(ks=(10, 50), methods=("contribution", "random"), sigmas=(None, 2.0), seed=0)


def time_causal(vlm, images, repeats: int = 3, **settings) -> dict:
    """``causal_speedup``: ``causal_curves`` one condition at a time ÷ batched on the
    identification of ``images`` (``settings``: ``causal_curves``'s, default
    :data:`CAUSAL_SETTINGS`), minima of interleaved runs; checks that both give the same rows."""
    settings = {**CAUSAL_SETTINGS, **settings}
    ident = find_neurons_by_method(vlm, images, methods=settings["methods"],
                                   top_k=max(settings["ks"]), seed=settings["seed"])
    results = {}

    def run(name, batch_size):
        results[name] = causal_curves(vlm, ident, images, batch_size=batch_size, **settings)

    sequential_s, batched_s = _interleaved(lambda: run("sequential", None), lambda: run("batched", 32),
                                           repeats=repeats)
    one, other = results["sequential"], results["batched"]
    numbers = ["margin", "prob", "margin_drop", "prob_drop"]
    if not one.drop(columns=numbers).equals(other.drop(columns=numbers)):
        raise AssertionError("the batched causal curves differ from the sequential ones beyond the margins")
    diff = float(np.abs(one[numbers].to_numpy() - other[numbers].to_numpy()).max()) if len(one) else 0.0
    return dict(causal_speedup=round(sequential_s / batched_s, 2), causal_s=round(batched_s, 4),
                causal_sequential_s=round(sequential_s, 4), causal_conditions=len(other),
                causal_n_images=len(images), causal_max_margin_diff=float(f"{diff:.2g}"))


@torch.no_grad()
def topk_columns(w_u: torch.Tensor, w_out: torch.Tensor, k: int, chunk: int = 256,
                 block: int = 1024):
    """Top-``k`` rows of ``w_u @ w_out`` for every column, without forming the product.

    ``w_u``: ``Float[Tensor, "V D"]``, ``w_out``: ``Float[Tensor, "D F"]`` →
    ``(values, ids)``, ``Float[Tensor, "F K"]`` and ``Int[Tensor, "F K"]`` (``K`` = ``k``),
    values descending. Columns are taken ``block`` at a time (they are independent); for
    each block the vocabulary is walked ``chunk`` rows at a time into one reused
    ``block × chunk`` buffer, and each chunk's own top-k is merged into the running top-k.
    Extra memory: about ``block × (chunk + 4k)`` values, whatever ``F`` and ``V`` are.
    """
    n_vocab, d_ff = w_u.shape[0], w_out.shape[1]
    if not 1 <= k <= n_vocab:
        raise ValueError(f"k must be in 1 … {n_vocab} (the vocabulary size), got {k}")
    results = [_topk_block(w_u, w_out[:, b:b + block], k, chunk) for b in range(0, d_ff, block)]
    return torch.cat([r[0] for r in results]), torch.cat([r[1] for r in results])


def _topk_block(w_u, w_out, k, chunk):
    n_vocab = w_u.shape[0]
    # scores are laid out (block, chunk) so that top-k runs along the contiguous axis
    buffer = torch.empty((w_out.shape[1], min(chunk, n_vocab)), device=w_out.device, dtype=w_out.dtype)
    best_values = best_ids = None
    for start in range(0, n_vocab, chunk):
        rows = w_u[start:start + chunk]                                        # (≤chunk, D)
        width = rows.shape[0]
        scores = torch.matmul(w_out.T, rows.T, out=buffer[:, :width] if width == buffer.shape[1]
                              else None)                                       # (block, ≤chunk)
        values, ids = scores.topk(min(k, width), dim=1)                        # (block, ≤K)
        values, ids = values.float(), ids + start
        if best_values is not None:
            merged = torch.cat([best_values, values], 1)                         # (block, ≤2K)
            values, where = merged.topk(min(k, merged.shape[1]), dim=1)
            ids = torch.cat([best_ids, ids], 1).gather(1, where)
        best_values, best_ids = values, ids
    return best_values, best_ids


def vocab_memory_probe(d_ff: int = 11008, d_model: int = 4096, vocab: int = 32000, k: int = 10,
                       chunk: int = 256, device: str = "cpu") -> dict:
    """Run in a fresh process: peak extra memory of the chunked top-k for one layer."""
    import resource

    gen = torch.Generator(device=device).manual_seed(0)
    w_u = torch.randn(vocab, d_model, generator=gen, device=device)
    w_out = torch.randn(d_model, d_ff, generator=gen, device=device)
    topk_columns(w_u[: 2 * chunk], w_out[:, :64], k, chunk)  # warm-up: thread pools, allocator
    start = time.perf_counter()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        topk_columns(w_u, w_out, k, chunk)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - base
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        topk_columns(w_u, w_out, k, chunk)
        extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
    full = vocab * d_ff * 4  # the float32 product this never forms
    return dict(vocab_memory_fraction=round(extra / full, 5), vocab_peak_extra_mb=round(extra / 2**20, 1),
                vocab_full_product_mb=round(full / 2**20, 1), vocab_chunk=chunk,
                vocab_layer_seconds=round(time.perf_counter() - start, 2))


def measure_vocab_memory(chunk: int = 256, device: str = "cpu") -> dict:
    code = ("import json; from mmneurons_utils.batch.bench import vocab_memory_probe; "
            f"print(json.dumps(vocab_memory_probe(chunk={chunk}, device={device!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def time_offload(vlm, images, repeats: int = 3, top_k: int = 10) -> dict:
    """``offload_slowdown``: ``find_neurons`` with every decoder layer and the unembedding
    offloaded to disk (an accelerate device map with a tiny ``max_memory``) ÷ the loaded model,
    interleaved minima. Loads the model a second time from ``vlm.name``: embedded models or
    local folders (``None`` when that is not a loadable name)."""
    import tempfile


    with tempfile.TemporaryDirectory(prefix="mmneurons-offload-") as folder:
        try:
            mapped = load_vlm(vlm.name, dtype=vlm.dtype, device_map="auto",
                              max_memory={"cpu": "6MB"}, offload_folder=folder)
        except ModelLoadError:
            return dict(offload_slowdown=None)
        loaded_run = lambda: find_neurons(vlm, images, top_k=top_k)
        mapped_run = lambda: find_neurons(mapped, images, top_k=top_k)
        loaded, offloaded = _interleaved(loaded_run, mapped_run, repeats=repeats)
    return dict(offload_slowdown=round(offloaded / loaded, 2), offload_s=round(offloaded, 4))


def run_bench(vlm, n_images: int = 16, seed: int = 0, repeats: int = 3, chunk: int = 256,
              vocab_memory: bool = True, official: bool = True, offload: bool = False) -> dict:
    """Every measurement of the module docstring on the first ``n_images`` scenes of ``seed``
    (``images_per_s`` on the first ``max(n_images, 32)``); ``official=False`` skips
    ``official_speedup`` and ``images_per_s``, ``vocab_memory=False`` the memory probe;
    ``offload=True`` adds ``offload_slowdown`` (:func:`time_offload`)."""

    scenes = make_scenes(max(n_images, max(THROUGHPUT_BATCH_SIZES)), seed=seed)  # scene i: (seed, i) only
    images = [s.image for s in scenes[:n_images]]
    result = dict(model=vlm.name, device=str(vlm.device), dtype=str(vlm.dtype).replace("torch.", ""))
    result.update(time_identification(vlm, images, repeats=repeats))
    result.update(time_atlas(vlm, images, repeats=repeats))
    result.update(time_causal(vlm, images[:CAUSAL_N_IMAGES], repeats=repeats))
    if official:
        result.update(time_official(vlm, images, [s.image for s in scenes], repeats=repeats,
                                    batch_sizes=THROUGHPUT_BATCH_SIZES))
    if offload:
        result.update(time_offload(vlm, images, repeats=repeats))
    if vocab_memory:
        result.update(measure_vocab_memory(chunk, device=str(vlm.device)))
    return result
