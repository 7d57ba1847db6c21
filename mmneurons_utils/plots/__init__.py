"""Figures. Each function returns a matplotlib Figure; notebooks show it and ``save`` it.

One module per part of the paper: ``identification`` (scenes, layer distribution,
neuron bars); the properties and causal/editing figures sit beside it.
"""

from .identification import layer_distribution, neuron_bars, save, scene_grid

__all__ = ["layer_distribution", "neuron_bars", "save", "scene_grid"]
