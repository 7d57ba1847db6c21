"""Figures. Each function returns a matplotlib Figure; notebooks show it and ``save`` it.

One module per part of the paper: ``identification`` (scenes, layer distribution,
neuron bars), ``properties`` (heatmaps, metric and Jaccard bars, occlusion locality per stage), ``causal``
(ablation curves, edit bars), ``atlas`` (a unit's strip of top dataset images, the atlas
units' purity vs random units, their modality).
"""

from .atlas import example_strip, modality_histogram, purity_scatter
from .causal import ablation_curves, edit_bars
from .editors import editor_comparison
from .identification import layer_depth, layer_distribution, neuron_bars, save, scene_grid
from .properties import heatmap_overlay, heatmap_panels, jaccard_bars, metric_bars, occlusion_locality_plot

__all__ = [
    "ablation_curves", "edit_bars",                                        # causal effect, editing
    "editor_comparison",                                                   # editors compared
    "example_strip", "modality_histogram", "purity_scatter",               # atlas
    "heatmap_overlay", "heatmap_panels", "jaccard_bars", "metric_bars",    # properties
    "occlusion_locality_plot",
    "layer_depth", "layer_distribution", "neuron_bars", "save", "scene_grid",             # identification
]
