"""What this layer lends the layers below it, registered when the package is imported:

* the embedded models' weights, with the model layer's registry
  (:mod:`mmneurons_utils.model.embedded`): ``load_vlm("tiny-llava")`` finds them by name, and
  nothing below this layer knows where they lie;
* the embedded scenes, with the data layer's
  (:func:`~mmneurons_utils.data.datasets.register_scene_source`): ``load_images()`` with no
  folder draws them. They load on first use: importing the package loads no scene code.
"""

from __future__ import annotations

from pathlib import Path

from ..data.datasets import SceneSource, register_scene_source
from ..model.embedded import register_embedded

WEIGHTS_DIR = Path(__file__).parent / "weights"   # one folder per model (what tiny.train writes)
NAMES = ("tiny-llava", "tiny-instructblip", "smol-llava")

for _name in NAMES:
    register_embedded(_name, WEIGHTS_DIR / _name)


def embedded_scenes() -> SceneSource:
    """The embedded scenes (:mod:`mmneurons_utils.tiny.scenes`), imported here on first use."""
    from . import scenes

    return SceneSource(make=scenes.make_scenes, nouns=tuple(scenes.NOUNS), attribution=scenes.ATTRIBUTION)


register_scene_source(embedded_scenes)
