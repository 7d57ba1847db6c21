"""mmneurons_utils: find, test and edit multi-modal neurons (Pan et al., ACL Findings 2024)."""

from .identify import find_neurons
from .vlm import VLM, Caption, load_vlm


def __getattr__(name):
    # The embedded models' scenes load on first use, so importing the method never imports them.
    if name in ("Scene", "make_scenes"):
        from .tiny import scenes

        return getattr(scenes, name)
    raise AttributeError(f"module 'mmneurons_utils' has no attribute {name!r}")

__all__ = ["Caption", "Scene", "VLM", "find_neurons", "load_vlm", "make_scenes"]
