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
* ``vocab_memory_fraction`` — the neuron-vocabulary computation's peak extra
  memory ÷ the size of the full ``W_out·W_U`` product for one LLaVA-1.5-7B-shaped
  layer (random weights, d_ff 11008 × d_model 4096 × vocabulary 32000), measured in
  a fresh subprocess (peak RSS on CPU, ``max_memory_allocated`` on CUDA).

Times are medians over ``repeats`` interleaved runs.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

import numpy as np


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_identification(vlm, images, repeats: int = 3, top_k: int = 50) -> dict:
    from .identify import find_neurons, logit_weights, rank_units
    from .scoring import unit_top_tokens

    describe = lambda: vlm.describe(images)
    identify = lambda: find_neurons(vlm, images, top_k=top_k)
    describe(), identify()  # warm-up
    t_describe, t_identify = [], []
    for _ in range(repeats):  # interleaved, so drift hits both alike
        t_describe.append(_median_time(describe, 1))
        t_identify.append(_median_time(identify, 1))
    captions = vlm.describe(images, activation="down_proj_input")
    pairs = [(img, cap, t) for img, cap in zip(images, captions) for t in cap.noun_tokens]
    if not pairs:
        raise ValueError("the benchmark images produced no nouns; use other images")

    # each scorer as find_neurons runs it: every noun's top units (rank_units), then one
    # logit-lens pass over all of them
    def rank_all(method):
        weights = logit_weights(vlm, [t for _, _, t in pairs])
        units = [r.units for img, cap in zip(images, captions) if cap.noun_tokens
                 for r in rank_units(vlm, img, cap, cap.noun_tokens, (method,), top_k,
                                     weights=weights)[method]]
        unit_top_tokens(vlm, np.concatenate(units))

    contribution_all = lambda: rank_all("contribution")
    t_contribution = _median_time(contribution_all, repeats) / len(pairs)
    t_gradient = _median_time(lambda: rank_all("gradient"), repeats) / len(pairs)
    t_gradient_image = _median_time(lambda: rank_all("gradient_image"), repeats) / len(pairs)
    t_generation = statistics.median(t_describe) / len(pairs)
    return dict(
        overhead_ratio=round(statistics.median(t_identify) / statistics.median(t_describe), 3),
        gradient_speedup=round(t_gradient / t_contribution, 1),
        gradient_image_speedup=round(t_gradient_image / t_contribution, 1),
        gradient_speedup_end_to_end=round((t_generation + t_gradient) / (t_generation + t_contribution), 2),
        describe_s=round(statistics.median(t_describe), 4),
        identify_s=round(statistics.median(t_identify), 4),
        contribution_ms_per_noun=round(1e3 * t_contribution, 3),
        gradient_ms_per_noun=round(1e3 * t_gradient, 3),
        gradient_image_ms_per_noun=round(1e3 * t_gradient_image, 3),
        n_images=len(images), n_nouns=len(pairs))


def time_atlas(vlm, images, repeats: int = 3, top_k: int = 10, examples: int = 8) -> dict:
    """``atlas_ratio``: ``build_atlas`` ÷ ``describe`` on ``images`` (medians of interleaved runs)."""
    from .atlas import build_atlas

    describe = lambda: vlm.describe(images, batch_size=16)
    atlas = lambda: build_atlas(vlm, images, top_k=top_k, examples=examples, batch_size=16)
    describe(), atlas()  # warm-up
    t_describe, t_atlas = [], []
    for _ in range(repeats):
        t_describe.append(_median_time(describe, 1))
        t_atlas.append(_median_time(atlas, 1))
    return dict(atlas_ratio=round(statistics.median(t_atlas) / statistics.median(t_describe), 2),
                atlas_s=round(statistics.median(t_atlas), 3))


def vocab_memory_probe(d_ff: int = 11008, d_model: int = 4096, vocab: int = 32000, k: int = 10,
                       chunk: int = 256, device: str = "cpu") -> dict:
    """Run in a fresh process: peak extra memory of the chunked top-k for one layer."""
    import resource

    import torch

    from .vocabulary import topk_columns

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
    code = ("import json; from mmneurons_utils.bench import vocab_memory_probe; "
            f"print(json.dumps(vocab_memory_probe(chunk={chunk}, device={device!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_bench(vlm, n_images: int = 16, seed: int = 0, repeats: int = 3, chunk: int = 256,
              vocab_memory: bool = True) -> dict:
    from .tiny.scenes import make_scenes

    images = [s.image for s in make_scenes(n_images, seed=seed)]
    result = dict(model=vlm.name, device=str(vlm.device), dtype=str(vlm.dtype).replace("torch.", ""))
    result.update(time_identification(vlm, images, repeats=repeats))
    result.update(time_atlas(vlm, images, repeats=repeats))
    if vocab_memory:
        result.update(measure_vocab_memory(chunk, device=str(vlm.device)))
    return result
