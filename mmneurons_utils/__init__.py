"""mmneurons_utils: find, test and edit multi-modal neurons (Pan et al., ACL Findings 2024)."""

from .identify import find_neurons
from .tiny.scenes import Scene, make_scenes
from .vlm import VLM, Caption, load_vlm

__all__ = ["Caption", "Scene", "VLM", "find_neurons", "load_vlm", "make_scenes"]
