"""What a result file holds: the settings of the run that wrote it and the identity of its inputs.

Every result the batch tools write (``mmneurons find``'s parquet and its part files, the atlas
folder, the caches) records, in its metadata, the *settings* that decide its numbers (model
name, a hash of the weights it reads, dtype, method, top-k, the seed where it draws at random,
where the caption nouns come from) and a *content hash per image* (of the decoded pixels, as
the model sees them). A rerun compares them with its own:

* the same settings, and every image it shares with the file unchanged → it resumes;
* anything else → :func:`differences` names what differs, and the caller refuses (or, for a
  cache, recomputes): a result is never reused for other inputs, nor mixed with theirs.
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Mapping

from PIL import Image


def image_hash(image: Image.Image) -> str:
    """A short content hash of ``image``'s decoded pixels (mode, size and bytes): the same
    picture saved under another name hashes the same, a changed pixel does not."""
    digest = hashlib.blake2b(digest_size=10)
    digest.update(f"{image.mode}|{image.size}|".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def image_hashes(names: Iterable[str], images: Iterable[Image.Image]) -> dict[str, str]:
    """``{name: image_hash(image)}`` for a run's images."""
    return {name: image_hash(image) for name, image in zip(names, images)}


def images_digest(hashes: Mapping[str, str]) -> str:
    """One hash of a whole image set (names and contents, in order)."""
    digest = hashlib.blake2b(digest_size=10)
    for name, value in hashes.items():
        digest.update(f"{name}\0{value}\n".encode())
    return digest.hexdigest()


def differences(recorded: Mapping, wanted: Mapping) -> list[str]:
    """``"key: recorded → wanted"`` for every key of ``wanted`` whose recorded value differs
    (a key the file lacks counts as ``not recorded``)."""
    out = []
    for key, value in wanted.items():
        old = recorded.get(key, "not recorded")
        if old != value:
            out.append(f"{key} {_short(old)} → {_short(value)}")
    return out


def changed_images(recorded: Mapping[str, str], wanted: Mapping[str, str]) -> list[str]:
    """The names that both sets hold with different contents."""
    return [name for name, value in wanted.items() if name in recorded and recorded[name] != value]


def _short(value) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "…"
