"""mmneurons_utils: find, test and edit multi-modal neurons (Pan et al., ACL Findings 2024)."""

from .scenes import Scene, make_scenes
from .vlm import VLM, Caption, load_vlm

__all__ = ["Caption", "Scene", "VLM", "load_vlm", "make_scenes"]
