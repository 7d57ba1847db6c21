"""The neuron atlas (a layer above the interventions): per noun, its recurring units with
purity, modality and dataset examples (:mod:`.build`), from a streaming top-k of every
unit's dataset images (:mod:`.examples`)."""

from .build import ATLAS_COLUMNS, build_atlas, read_atlas, summary, write_atlas

__all__ = ["ATLAS_COLUMNS", "build_atlas", "read_atlas", "summary", "write_atlas"]
