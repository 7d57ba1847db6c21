"""The neuron atlas (a layer above the interventions): per noun, its recurring units with
purity, modality and dataset examples (:mod:`.build`), from a streaming top-k of every
unit's dataset images (:mod:`.examples`), and the atlas as one static page (:mod:`.page`)."""

from .build import ATLAS_COLUMNS, build_atlas, read_atlas, summary, write_atlas

__all__ = ["ATLAS_COLUMNS", "build_atlas", "read_atlas", "summary", "write_atlas"]
