"""mmneurons_utils: find, test and edit multi-modal neurons (Pan et al., ACL Findings 2024).

Words: prose says *neuron*, code says *unit*. A unit ``(l, i)`` is coefficient ``i`` of
decoder layer ``l``'s FFN, the input of its ``down_proj`` (write vector ``W_out[l][:, i]``).

Shapes: every shape in the package's docstrings and comments (``Float[Tensor, "S L F"]``,
``Int[ndarray, "K 2"]``, ``# (B, T, F)``) uses one set of letters:

* ``B`` batch (images)
* ``T`` sequence positions (prompt + caption)
* ``S`` generated caption steps
* ``L`` decoder layers
* ``F`` units per layer (``d_ff``)
* ``D`` ``d_model``
* ``V`` vocabulary
* ``I`` image tokens
* ``N`` rows / units of a list
* ``K`` top-k (``K`` = the call's ``k`` or ``top_k``)

A module names any other axis where it uses one (``H W`` pixels, ``rows cols`` the patch
grid, ``E`` dataset examples per unit).
"""

# the embedded models' weights and scenes, registered with the layers that use them by name
from .tiny import registry as _registry   # noqa: F401
from .data.datasets import load_images
from .interventions import causal, editing
from .method.identification import Identification
from .method.identify import find_neurons, find_neurons_by_method, identify
from .model.vlm import VLM, Caption, load_vlm
from .properties import metrics


def __getattr__(name):
    # The embedded scenes load on first use, so importing the method never imports them.
    if name in ("Scene", "make_scenes"):
        from .tiny import scenes

        return getattr(scenes, name)
    raise AttributeError(f"module 'mmneurons_utils' has no attribute {name!r}")

__all__ = ["Caption", "Identification", "Scene", "VLM", "causal", "editing", "find_neurons",
           "find_neurons_by_method", "identify", "load_images", "load_vlm", "make_scenes", "metrics"]
