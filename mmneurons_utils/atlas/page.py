"""The atlas as one self-contained static page (``index.html``): no scripts, no external
assets; thumbnails are base64 PNG data URIs.

A section per noun (most-said nouns first, a contents line at the top), a card per unit
(``L{layer}.{unit} (+/−)``, its top tokens with the noun in bold, frequency, purity vs the
random units' purity, modality) with thumbnails of its top dataset images, each overlaid
with the unit's activation map in its polarity (``p · a`` over the patch grid, upsampled
smoothly, normalised to the map's maximum: the image is dimmed where the unit is silent).
Models whose image tokens are not a patch grid (InstructBLIP) show the plain images. The
page is kept small by ``cards_per_noun``, ``examples_per_card`` and 64-colour PNGs (about
2.5 kB per thumbnail as base64).

Stable class names for scripts and tests: ``mmn-noun`` (a noun's section heading),
``mmn-card`` (a unit's card), ``mmn-name`` (its ``L3.479 (+)`` title), ``mmn-thumb`` (a
thumbnail ``img``).
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ..method.units import Unit
from ..store.results import atomic_write
from .examples import covered_images
from ..properties.specificity import patch_grid, unit_maps, upsample

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1200px}
h1{font-size:1.4em} h2{font-size:1.15em;border-bottom:1px solid #ccc;margin-top:1.6em}
.meta{color:#555;font-size:.9em} nav a{margin-right:.6em}
.cards{display:flex;flex-wrap:wrap;gap:.8em}
.card{border:1px solid #ddd;border-radius:6px;padding:.5em;width:300px;font-size:.85em}
.card .name{font-weight:600;font-family:monospace;font-size:1.05em}
.neg{color:#1f5fbf} .pos{color:#b8321f}
.tokens{font-family:monospace;color:#444;margin:.2em 0}
.stats td{padding:0 .5em 0 0} .thumbs img{width:64px;height:64px;margin:1px;image-rendering:auto}
"""


GENERATOR = "<meta name='generator' content='mmneurons atlas'>"


def is_atlas_page(path: str | Path) -> bool:
    """Whether the file at ``path`` is a page :func:`render_atlas_html` wrote (it carries
    :data:`GENERATOR`; pages of earlier versions: their ``mmn-`` class names)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            head = handle.read(4096)
    except OSError:
        return False
    return GENERATOR in head or ("<title>Neuron atlas" in head and "mmn-" in Path(path).read_text(
        encoding="utf-8", errors="replace"))


def render_atlas_html(vlm, table: pd.DataFrame, images: Sequence, path: str | Path,
                      captions: Sequence[str] | None = None, title: str = "Neuron atlas",
                      meta: dict | None = None, cards_per_noun: int = 3,
                      examples_per_card: int = 4, thumb: int = 64, batch_size: int = 16,
                      progress: bool = False, names: Sequence[str] | None = None,
                      ident=None) -> Path:
    """Write the atlas page to ``path`` (atomically) and return it.

    ``table``: :func:`~mmneurons_utils.atlas.build.build_atlas` rows; ``images``: the images its
    ``example_images`` index; ``captions``: their caption texts (thumbnail tooltips);
    ``meta``: key → value pairs shown under the title; ``names``: the images' file names
    (thumbnails are named by them, else by their index). Maps need the example images'
    activations: those images (at most ``nouns × cards_per_noun × examples_per_card``)
    are run once more through the model, ``batch_size`` at a time (prefill only), except those
    that ``ident`` holds: the :class:`~mmneurons_utils.method.identification.Identification` of
    the first ``ident.n_images`` of ``images`` (with image activations), whose maps are read
    from its captions' activations.
    """
    covered = covered_images(ident, images)
    is_generic = table["generic"].eq(True) if "generic" in table else pd.Series(False, index=table.index)
    generic = table[is_generic].drop_duplicates(["layer", "unit"])
    shown = _shown_rows(table[~is_generic], cards_per_noun)
    thumbs = _thumbnails(vlm, shown, images, examples_per_card, thumb, batch_size, progress,
                         ident.captions[:covered] if covered else [])
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"{GENERATOR}<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    if meta:
        parts.append("<p class='meta'>" + " · ".join(
            f"{html.escape(str(k))}: {html.escape(_fmt(v))}" for k, v in meta.items()) + "</p>")
    parts.append("<p class='meta'>Per unit: <b>frequency</b> = share of the noun's images whose top "
                 "units include it; <b>purity</b> = share of its top dataset images (in its polarity) "
                 "whose caption says the noun, vs the same for random units; <b>modality</b> = 1 fires "
                 "only on image tokens, 0 only at the caption steps. Thumbnails: the unit's top images, "
                 "dimmed where <i>p·a</i> is low (bright = where it fires).</p>")
    if len(generic):
        parts.append(_generic_section(generic))
    nouns = list(dict.fromkeys(shown["noun"]))
    parts.append("<nav>" + "".join(f"<a href='#{_anchor(n)}'>{html.escape(n)}</a>" for n in nouns)
                 + "</nav>")
    for noun in nouns:
        rows = shown[shown["noun"] == noun]
        n_images, base = int(rows["n_images"].iloc[0]), float(rows["base_rate"].iloc[0])
        parts.append(f"<h2 class='mmn-noun' id='{_anchor(noun)}'>{html.escape(noun)} <span class='meta'>"
                     f"({n_images} images, {base:.1%} of the dataset)</span></h2><div class='cards'>")
        for _, row in rows.iterrows():
            parts.append(_card(row, thumbs, captions, examples_per_card, names))
        parts.append("</div>")
    parts.append("</body></html>")
    page = "\n".join(parts)
    return atomic_write(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))


def _generic_section(generic: pd.DataFrame) -> str:
    """The units kept for most nouns, listed apart from the nouns' cards (rule: atlas.build)."""
    items = "".join(
        f"<li>{Unit.of(r)}: kept for "
        f"{r.noun_share:.0%} of the nouns; top tokens {html.escape(' '.join(map(str, r.top_tokens[:6])))}</li>"
        for r in generic.itertuples())
    return ("<h2>Generic units</h2><p class='meta'>Kept for at least half of the nouns (and three or "
            "more): they write every noun, so they are listed here and left out of the nouns' "
            f"cards.</p><ul>{items}</ul>")


def _shown_rows(table: pd.DataFrame, cards_per_noun: int) -> pd.DataFrame:
    """Nouns by how many images say them (then name); each noun's first ``cards_per_noun`` rows."""
    if not len(table):
        return table
    order = (table[["noun", "n_images"]].drop_duplicates("noun")
             .sort_values(["n_images", "noun"], ascending=[False, True])["noun"].tolist())
    return pd.concat([table[table["noun"] == n].head(cards_per_noun) for n in order],
                     ignore_index=True)


def _card(row, thumbs: dict, captions, examples_per_card: int, names=None) -> str:
    sign = "neg" if int(row["polarity"]) < 0 else "pos"
    noun = row["noun"]
    tokens = ", ".join(f"<b>{html.escape(str(t))}</b>" if str(t).strip("▁Ġ ") == noun
                       else html.escape(str(t)) for t in list(row["top_tokens"])[:8])
    stats = (f"<table class='stats'><tr><td>frequency</td><td>{row['frequency']:.2f}</td>"
             f"<td>mean score</td><td>{row['mean_score']:+.3f}</td></tr>"
             f"<tr><td>purity</td><td><b>{row['purity']:.2f}</b> vs random "
             f"{row['purity_random']:.2f}</td><td>modality</td><td>{_fmt(row['modality'])}</td></tr>"
             "</table>")
    images = []
    for index, score in list(zip(row["example_images"], row["example_scores"]))[:examples_per_card]:
        uri = thumbs.get((int(index), int(row["layer"]), int(row["unit"]), int(row["polarity"])))
        if uri is None:
            continue
        label = names[int(index)] if names is not None and int(index) < len(names) else f"image {int(index)}"
        tip = f"{label}, max p·a = {float(score):.3f}"
        if captions is not None and int(index) < len(captions):
            tip += f": {captions[int(index)]}"
        images.append(f"<img class='mmn-thumb' src='{uri}' alt='{html.escape(label, quote=True)}' title='{html.escape(tip, quote=True)}'>")
    return (f"<div class='card mmn-card'><div class='name mmn-name {sign}'>{html.escape(str(Unit.of(row)))}</div>"
            f"<div class='tokens'>{tokens}</div>{stats}<div class='thumbs'>{''.join(images)}</div></div>")


def _thumbnails(vlm, shown: pd.DataFrame, images, examples_per_card, thumb, batch_size, progress,
                known=()):
    """``(image, layer, unit, polarity)`` → data URI of the thumbnail with that unit's map;
    ``known``: the captions (with image activations) of the first images, not run again."""
    from tqdm.auto import tqdm

    wanted: dict[int, list[tuple[int, int, int]]] = {}
    for row in shown.itertuples(index=False):
        for index in list(row.example_images)[:examples_per_card]:
            wanted.setdefault(int(index), []).append((int(row.layer), int(row.unit), int(row.polarity)))
    order = sorted(wanted)
    grid = patch_grid(vlm) if order else None
    out: dict[tuple, str] = {}
    read = [i for i in order if i < len(known)]           # their activations are at hand
    run = [i for i in order if i >= len(known)]
    batches = ([read] if read else []) + [run[s:s + batch_size] for s in range(0, len(run), batch_size)]
    for batch in tqdm(batches, desc="atlas page", disable=not progress):
        pictures = [images[i].convert("RGB").resize((thumb, thumb)) for i in batch]
        if grid is None:
            captions = [None] * len(batch)
        elif batch is read:
            captions = [known[i] for i in batch]
        else:
            captions = vlm.describe([images[i] for i in batch], max_new_tokens=1, batch_size=len(batch),
                                    activation="down_proj_input", image_activations=True)
        for index, picture, caption in zip(batch, pictures, captions):
            units = sorted(set(wanted[index]))
            if grid is None:
                plain = _data_uri(picture)
                out.update({(index, *u): plain for u in units})
                continue
            maps = unit_maps(vlm, caption.activations, [u[:2] for u in units], [u[2] for u in units])
            for unit, grid_map in zip(units, maps):
                out[(index, *unit)] = _data_uri(_overlay(picture, grid_map))
    return out


def _overlay(picture, grid_map: np.ndarray):
    """A spotlight: the picture dimmed where ``grid_map``'s positive part is low
    (brightness ``0.25 + 0.75 · map / max``), so it reads on objects of any colour."""
    from PIL import Image

    heat = np.clip(upsample(grid_map, (picture.height, picture.width), smooth=True), 0, None)
    top = heat.max()
    if not top > 0:
        return picture
    light = (0.25 + 0.75 * heat / top)[..., None]
    base = np.asarray(picture, dtype=np.float32)
    return Image.fromarray(np.clip(base * light, 0, 255).astype(np.uint8))


def _data_uri(picture) -> str:
    from PIL import Image

    buffer = io.BytesIO()      # a 64-colour palette: about a third of the RGB file's bytes
    picture.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _anchor(noun: str) -> str:
    return "noun-" + "".join(c if c.isalnum() else "-" for c in noun)


def _fmt(value) -> str:
    if isinstance(value, float):
        return "—" if value != value else f"{value:.3g}"
    return str(value)
