"""ipywidgets front ends used by the notebooks, one module per panel.

Each panel renders its default state as ordinary output first (so papermill runs
and nbval keep the figures and tables), then, in a live kernel, shows the controls
that re-render it.
"""

from .ablation import AblationPanel
from .edit import EditPlayground
from .explorer import BrowserView, NeuronExplorer
from .pickers import ImagePicker, TokenPicker
from .properties import InvariancePanel, SpecificityPanel

__all__ = ["BrowserView", "ImagePicker", "NeuronExplorer", "TokenPicker",
           "InvariancePanel", "SpecificityPanel"]
__all__ += ["AblationPanel", "EditPlayground"]
