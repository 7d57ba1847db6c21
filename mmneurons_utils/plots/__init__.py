"""Figures. Each function returns a matplotlib Figure; notebooks show it and ``save`` it.

One module per part of the paper: ``identification`` (scenes, layer distribution,
neuron bars); the properties and causal/editing figures sit beside it.
"""

from .causal import ablation_curves, edit_bars
from .identification import layer_distribution, neuron_bars, save, scene_grid
from .properties import heatmap_overlay, heatmap_panels, jaccard_bars, metric_bars

__all__ = ["heatmap_overlay", "heatmap_panels", "jaccard_bars", "layer_distribution", "metric_bars", "neuron_bars",
           "save", "scene_grid"]
__all__ += ["ablation_curves", "edit_bars"]
