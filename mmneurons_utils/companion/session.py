"""A notebook's set-up in one call: where it writes, its models, the images it studies.

    session = start(output_dir, model, compare_model, device=device, dtype=dtype,
                    images=images, annotations=annotations)
    outputs, models, vlm = session.outputs, session.models, session.vlm
    scenes = session.load(n_images, seed)      # the embedded scenes, or your folder

:meth:`Session.load` prints the image set's summary and, for each model, where its caption
nouns come from (the annotation's categories are a real model's candidate nouns when no
tagger is installed).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..data.datasets import ImageSet, load_images, prepare_model
from ..model.vlm import VLM, load_vlm
from .outputs import Outputs


@dataclass
class Session:
    """``outputs``: figures and tables under the output folder; ``models``: name → VLM, the
    notebook's model first; ``images`` / ``annotations``: the image folder and its COCO file
    (``""``: the embedded scenes)."""

    outputs: Outputs
    models: dict[str, VLM]
    images: str = ""
    annotations: str = ""

    @property
    def vlm(self) -> VLM:
        """The notebook's model (the first)."""
        return next(iter(self.models.values()))

    def load(self, n: int | None, seed: int = 0) -> ImageSet:
        """``n`` images (embedded scenes of ``seed``, or the folder's first ``n``), told to every model."""
        data = load_images(self.images, self.annotations, n=n, seed=seed)
        print(data.summary())
        for vlm in self.models.values():
            print(prepare_model(vlm, data))
        return data


def start(output_dir: str, model: str, compare_model: str = "", device: str = "cpu",
          dtype: str = "float32", images: str = "", annotations: str = "") -> Session:
    """The :class:`Session` of a notebook: ``Outputs(output_dir)`` and the loaded ``model``
    (plus ``compare_model`` when given)."""
    names = [model] + ([compare_model] if compare_model else [])
    models = {name: load_vlm(name, device=device, dtype=dtype) for name in names}
    return Session(Outputs(output_dir), models, images or "", annotations or "")
