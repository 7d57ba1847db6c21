"""The neuron browser's response time, for ``mmneurons bench`` (``explorer_update_s``).

Measured here rather than in :mod:`mmneurons_utils.batch.bench` because the batch layer sits
below the widgets; ``mmneurons bench`` adds it to the benchmark's JSON. The tests check what a
change does (the identification's caption and units, no captioning pass), not how long it takes.
"""

from __future__ import annotations

import contextlib
import io
import time

from ..method.identify import find_neurons_by_method
from ..tiny.scenes import make_scenes
from .explorer import NeuronExplorer


def time_explorer(vlm, n_scenes: int = 4, seed: int = 0, repeats: int = 3, top_k: int = 10,
                  clock=time.perf_counter) -> dict:
    """``explorer_update_s``: the least time, over ``repeats`` rounds through the images
    ``1 … n_scenes - 1`` of ``make_scenes(n_scenes, seed)``, of one image change in a shown
    :class:`~mmneurons_utils.widgets.explorer.NeuronExplorer` given the scenes' identification
    (made once here, not timed: a change reads its caption and units, refills the unit list and
    renders the heatmap); ``explorer_update_median_s`` its median. The absolute times are this
    machine's."""
    if n_scenes < 2:
        raise ValueError(f"n_scenes must be at least 2 (an image to change to), got {n_scenes}")
    scenes = make_scenes(n_scenes, seed=seed)
    ident = find_neurons_by_method(vlm, [s.image for s in scenes], methods=("contribution",),
                                   top_k=top_k, seed=seed, image_activations=True)
    explorer = NeuronExplorer(vlm, scenes, ident, top_k=top_k)
    with contextlib.redirect_stdout(io.StringIO()):       # outside a front end display prints a repr
        explorer.show()
    times = []
    for _ in range(repeats):
        for index in (*range(1, n_scenes), 0):
            start = clock()
            explorer.image.value = index
            times.append(clock() - start)
    times.sort()
    return dict(explorer_update_s=round(times[0], 4),
                explorer_update_median_s=round(times[len(times) // 2], 4),
                explorer_updates=len(times))
