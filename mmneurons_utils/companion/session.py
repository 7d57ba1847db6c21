"""A notebook's set-up in one call: where it writes, its models, the images it studies.

    session = start(output_dir, model, compare_model, device=device, dtype=dtype,
                    images=images, annotations=annotations)
    outputs, models, vlm = session.outputs, session.models, session.vlm
    scenes = session.load(n_images, seed)      # the embedded scenes, or your folder
    ident = session.identify(scenes)           # computed once per output folder, then loaded

:meth:`Session.identify` is the one identification that notebooks 01–06 share: every method
(the paper's four, ``noun_contrast`` and the selection-matched null), ``top_k`` 50 units each,
activations at the image positions kept. Notebook 01 computes it and saves it under
``<output_dir>/identifications/``; a later notebook that asks for the same model weights, images
and settings loads it (under a second) instead of computing it again, and anything changed is
computed afresh.

:meth:`Session.load` prints the image set's summary and, for each model, where its caption
nouns come from (the annotation's categories are a real model's candidate nouns when no
tagger is installed).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..data.datasets import ImageSet, load_images, prepare_model
from ..method.identification import Identification
from ..method.identify import ALL_METHODS, identify
from ..model.vlm import VLM, load_vlm
from .outputs import Outputs


IDENTIFY_TOP_K = 50    # units kept per (image, noun, method): the notebooks read k ≤ 50


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

    def identify(self, data: ImageSet, vlm: VLM | None = None, seed: int = 0,
                 top_k: int = IDENTIFY_TOP_K) -> Identification:
        """The shared :class:`Identification` of ``data`` on ``vlm`` (default: the notebook's
        model): every method in ``ALL_METHODS``, ``top_k`` units per (image, noun, method),
        random units and null draws seeded by ``seed``. Loaded from
        ``<output_dir>/identifications/`` when an earlier notebook computed it for the same
        weights, images and settings; computed (and saved) otherwise."""
        vlm = self.vlm if vlm is None else vlm
        return identify(vlm, data.images, store=self.outputs.root / "identifications",
                        methods=ALL_METHODS, top_k=top_k, seed=seed, image_activations=True,
                        image_keys=data.names, progress=True)


def start(output_dir: str, model: str, compare_model: str = "", device: str = "cpu",
          dtype: str = "float32", images: str = "", annotations: str = "") -> Session:
    """The :class:`Session` of a notebook: ``Outputs(output_dir)`` and the loaded ``model``
    (plus ``compare_model`` when given)."""
    names = [model] + ([compare_model] if compare_model else [])
    models = {name: load_vlm(name, device=device, dtype=dtype) for name in names}
    return Session(Outputs(output_dir), models, images or "", annotations or "")
