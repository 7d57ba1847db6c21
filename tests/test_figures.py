"""Every public figure function of ``mmneurons_utils.plots``, drawn on small hand-made data
(shaped like the notebooks' calls; no model): no two drawn text labels overlap, every figure has
a title, and every axis that draws tick labels says what it measures.

The texts checked are the ones the renderer really draws (``Text.draw`` is watched during
``fig.canvas.draw()``): titles, axis labels, tick labels, legend texts, annotations and figure
texts; a hidden or empty text and a tick outside the view are not drawn, so not checked.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.text  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from mmneurons_utils import plots  # noqa: E402

METHODS = ("contribution", "gradient", "gradient_image", "random")


# -- small data shaped like the notebooks' -------------------------------------------------------
def _image(seed: int = 0, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = rng.integers(0, size - 20, 2)
        draw.ellipse((int(x), int(y), int(x) + 18, int(y) + 18), fill=tuple(rng.integers(0, 255, 3).tolist()))
    return image


def _heat(seed: int, size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.kron(rng.normal(size=(8, 8)), np.ones((size // 8, size // 8)))


def _ci(rows: list[dict]) -> pd.DataFrame:
    """``model, method, metric, mean, low, high`` as ``metrics.summarize_ci`` returns."""
    frame = pd.DataFrame(rows)
    return frame.assign(low=frame["mean"] - 0.05, high=frame["mean"] + 0.05)


def _neuron_table(noun: str = "carrot", n: int = 10) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    words = ["carrot", "shoe", "umbrella", "black", "snake", "pig", "bicycle", "tree", "rabbit", "plane"]
    return pd.DataFrame(dict(
        noun=noun, token_id=7, rank=range(n), layer=3, unit=rng.integers(0, 768, n),
        score=np.sort(rng.uniform(0.5, 2.2, n))[::-1], polarity=[1, -1] * (n // 2),
        top_tokens=[list(rng.choice(words, 4, replace=False)) for _ in range(n)]))


def _shares(layers: int) -> pd.Series:
    share = np.linspace(0.05, 0.4, layers)
    return pd.Series(share / share.sum(), index=pd.Index(range(layers), name="layer"))


def _edit_summary() -> pd.DataFrame:
    """``summarize_edits`` rows as notebook 05 shows them: one setting applied no edit (NaN)."""
    settings = [("contribution", 1), ("contribution", 5), ("contribution", 20), ("gradient", 5),
                ("gradient_image", 5), ("random", 5)]
    rows = []
    for (units, n), applied in zip(settings, (3, 17, 20, 18, 11, 0)):
        rows.append(dict(units=units, n_neurons=n, n_pairs=20, n_applied=applied,
                         success=applied / 20,
                         generalization=np.nan if applied == 0 else 0.75,
                         locality=np.nan if applied == 0 else 0.95))
    return pd.DataFrame(rows)


def _editor_summary() -> pd.DataFrame:
    """``summarize_editors`` rows like smol-llava's: many editors at the same success and size."""
    rows = [("contribution", 5, 1.0, 0.93, 2880, 2880), ("contribution", 1, 0.95, 0.95, 576, 576),
            ("contribution", 20, 1.0, 0.95, 11520, 11520), ("gradient", 5, 1.0, 0.93, 2880, 2880),
            ("gradient_image", 5, 0.95, 0.99, 2880, 2880), ("random", 5, 0.0, np.nan, 2880, 2880),
            ("ft", 5, 1.0, 0.86, 884736, 884736), ("lora", 5, 0.975, 0.92, 884736, 8448),
            ("rome", 5, 0.85, 1.0, 884736, 576)]
    frame = pd.DataFrame(rows, columns=["method", "k", "success", "m_locality", "params_changed",
                                        "params_trained"]).assign(n_pairs=20)
    for metric in ("success", "m_locality", "params_changed", "params_trained"):
        frame[f"{metric}_low"] = frame[metric] * (0.9 if metric.startswith(("success", "m_")) else 1)
        frame[f"{metric}_high"] = frame[metric].clip(upper=1) if metric.startswith(("success", "m_")) \
            else frame[metric]
    return frame


def _curves(x: str) -> pd.DataFrame:
    steps = (1, 5, 20, 50) if x == "k" else (0.5, 1.0, 2.0, 4.0)
    rows = [dict(perturbation="zero", method=m, **{x: s}, margin_drop=i * s / 10, prob_drop=0.1 * i,
                 noun_removed=min(1, 0.1 * i * j), caption_changed=min(1, 0.15 * i * j))
            for i, m in enumerate(METHODS) for j, s in enumerate(steps)]
    frame = pd.DataFrame(rows)
    return frame if x == "k" else frame.assign(perturbation="noise on top-10").drop(columns="prob_drop")


def _locality() -> pd.DataFrame:
    stages = ["vision layer 0", "vision layer 1", "projector", "LM layer 0", "LM layer 1", "LM layer 2"]
    rng = np.random.default_rng(0)
    return pd.DataFrame([dict(model=model, stage=stage, stage_index=i, share_in_box=rng.uniform(),
                              box_share=0.2, max_in_box=rng.uniform())
                         for model in ("tiny-llava", "smol-llava") for i, stage in enumerate(stages)
                         for _ in range(5)])


def _atlas() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    nouns = ["dog", "cat", "carrot", "rocket", "rabbit", "pizza"]
    return pd.DataFrame([dict(noun=n, purity=rng.uniform(0.3, 0.9), purity_random=rng.uniform(0, 0.3),
                              base_rate=0.1, n_images=int(rng.integers(2, 10)), modality=rng.uniform())
                         for n in nouns for _ in range(3)])


class _NoGridVLM:
    """Stands in for a model without a patch grid: ``example_strip`` then draws the plain images."""
    arch = SimpleNamespace(patch_grid=False, family="instructblip")
    n_image_tokens = 32


def _heatmap_panels():
    ks = ("top-1", "top-10", "top-50")
    heats = {f"{m}: {k}": _heat(i) for i, (m, k) in enumerate(itertools.product(METHODS, ks))}
    masks = {title: heat >= np.percentile(heat, 95) for title, heat in heats.items()}
    return plots.heatmap_panels(_image(), heats, masks, boxes=[(2, 2, 30, 30)], width=1.9, noun="rabbit")


def _widget_heatmaps():
    """Two panels as ``widgets.properties`` draws them (titles without a method prefix)."""
    heats = {"top-1 (contribution)": _heat(1), "top-10 (contribution)": _heat(2)}
    return plots.heatmap_panels(_image(), heats, boxes=[(2, 2, 30, 30)], noun="rabbit")


CASES = {
    "scene_grid": lambda: plots.scene_grid(
        [SimpleNamespace(image=_image(i), caption="a dog and a cat", nouns=["dog", "cat"]) for i in range(5)],
        [SimpleNamespace(text="a dog and a cat" if i else "a dog and a hat") for i in range(5)]),
    "layer_distribution": lambda: plots.layer_distribution({"tiny-llava": _shares(4), "smol-llava": _shares(30)}, 50),
    "layer_depth": lambda: plots.layer_depth({"tiny-llava": _shares(4), "smol-llava": _shares(30)}, 50),
    "neuron_bars": lambda: plots.neuron_bars(_neuron_table(), "carrot"),
    "heatmap_overlay": lambda: plots.heatmap_overlay(_image(), _heat(0), _heat(0) > 1, boxes=[(2, 2, 30, 30)],
                                                     title="L3.741 (−) on 'rabbit'"),
    "heatmap_panels": _heatmap_panels,
    "heatmap_panels (widget)": _widget_heatmaps,
    "metric_bars": lambda: plots.metric_bars(
        _ci([dict(model=mo, method=me, metric="auroc", mean=0.5 + 0.1 * i)
             for mo in ("tiny-llava", "smol-llava") for i, me in enumerate(METHODS)]), "auroc",
        chance={"tiny-llava": 0.5, "smol-llava": 0.5}),
    "jaccard_bars": lambda: plots.jaccard_bars(
        _ci([dict(model=mo, method=me, metric=me2, mean=0.3 + 0.1 * i)
             for mo in ("tiny-llava", "smol-llava") for i, me in enumerate(METHODS)
             for me2 in ("jaccard_same", "jaccard_different")])),
    "occlusion_locality_plot": lambda: plots.occlusion_locality_plot(_locality()),
    "ablation_curves": lambda: plots.ablation_curves(_curves("k")),
    "ablation_curves (sigma)": lambda: plots.ablation_curves(_curves("sigma"), x="sigma"),
    "edit_bars": lambda: plots.edit_bars(_edit_summary()),
    "editor_comparison": lambda: plots.editor_comparison(
        _editor_summary(), title="smol-llava: editors on the same 20 source → target pairs (95 % bootstrap intervals)"),
    "example_strip": lambda: plots.example_strip(
        _NoGridVLM(), [_image(i) for i in range(8)],
        dict(layer=3, unit=741, polarity=-1, noun="rabbit", example_images=[4, 1, 7, 0, 2, 5],
             example_scores=[2.5, 2.1, 1.9, 1.2, 0.8, 0.4]),
        n=6, captions=[f"a rabbit and a {w}" for w in ("dog", "cat", "hat", "car", "sun", "pig", "bee", "cow")],
        width=1.5),
    "purity_scatter": lambda: plots.purity_scatter(_atlas()),
    "modality_histogram": lambda: plots.modality_histogram(_atlas()),
}


# -- what the renderer draws ----------------------------------------------------------------------
def drawn_texts(fig, monkeypatch) -> list:
    """``[(Text, Bbox)]``: the visible, non-empty texts ``fig`` draws, with their extents."""
    drawn = []
    original = matplotlib.text.Text.draw

    def draw(self, renderer):
        original(self, renderer)
        if self.get_visible() and self.get_text().strip():
            drawn.append((self, self.get_window_extent(renderer)))

    monkeypatch.setattr(matplotlib.text.Text, "draw", draw)
    fig.canvas.draw()
    monkeypatch.undo()
    unique = {id(text): (text, box) for text, box in drawn}   # a text drawn twice counts once
    return list(unique.values())


def overlaps(texts, tolerance: float = 0.5) -> list[tuple[str, str]]:
    """Pairs of distinct texts whose boxes share more than ``tolerance`` pixels both ways."""
    found = []
    for (a, box_a), (b, box_b) in itertools.combinations(texts, 2):
        width = min(box_a.x1, box_b.x1) - max(box_a.x0, box_b.x0)
        height = min(box_a.y1, box_b.y1) - max(box_a.y0, box_b.y0)
        if width > tolerance and height > tolerance:
            found.append((a.get_text(), b.get_text()))
    return found


def _used(ax) -> bool:
    return ax.axison and bool(ax.images or ax.lines or ax.patches or ax.collections) \
        or bool(ax.images)


def missing_titles(fig) -> list[str]:
    """Axes that show something but have no title while the figure has none either."""
    if fig._suptitle is not None and fig._suptitle.get_text().strip():
        return []
    return [repr(ax) for ax in fig.axes
            if not hasattr(ax, "_colorbar") and _used(ax)
            and not any(ax.get_title(loc=loc).strip() for loc in ("left", "center", "right"))]


def unlabelled_axes(fig, texts) -> list[str]:
    """Axes whose drawn tick labels have no axis label (nor the figure's ``supxlabel``/``supylabel``)."""
    drawn = {id(text) for text, _ in texts}
    figure_label = {"x": fig._supxlabel, "y": fig._supylabel}
    missing = []
    for ax in fig.axes:
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            ticks = [t for t in axis.get_ticklabels(which="both") if id(t) in drawn]
            labelled = axis.get_label().get_text().strip() or (
                figure_label[name] is not None and figure_label[name].get_text().strip())
            if ticks and not labelled:
                missing.append(f"{name} axis of {ax!r} ({ticks[0].get_text()!r}, …)")
    return missing


# -- the tests ----------------------------------------------------------------------------------
def test_every_public_figure_function_has_a_case():
    functions = {name for name in plots.__all__ if name != "save"}
    covered = {name.split(" ")[0] for name in CASES}
    assert functions <= covered, f"figure functions without a case here: {sorted(functions - covered)}"


@pytest.mark.parametrize("name", list(CASES))
def test_figure_is_readable(name, monkeypatch):
    fig = CASES[name]()
    try:
        texts = drawn_texts(fig, monkeypatch)
        assert texts, "the figure draws no text"
        assert not overlaps(texts), f"{name}: text labels overlap: {overlaps(texts)}"
        assert not missing_titles(fig), f"{name}: no title on the figure or on {missing_titles(fig)}"
        assert not unlabelled_axes(fig, texts), f"{name}: unlabelled {unlabelled_axes(fig, texts)}"
    finally:
        plt.close(fig)


def test_the_overlap_check_catches_a_pile_of_labels(monkeypatch):
    """The check itself can fail: two annotations at one point overlap, a text with itself does not."""
    fig, ax = plt.subplots()
    ax.set_title("title")
    ax.annotate("contribution k=5", (0.5, 0.5))
    ax.annotate("gradient k=5", (0.5, 0.5))
    try:
        found = overlaps(drawn_texts(fig, monkeypatch))
        assert found == [("contribution k=5", "gradient k=5")]
    finally:
        plt.close(fig)


def test_plural_forms():
    """One unit is "1 unit", never "1 units"."""
    fig = plots.edit_bars(_edit_summary())
    try:
        labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
        assert any("\n1 unit\n" in label for label in labels), labels
        assert not any("1 units" in label.replace("20 units", "") for label in labels), labels
    finally:
        plt.close(fig)


def test_heatmaps_form_a_grid_and_name_the_noun():
    fig = _heatmap_panels()
    try:
        panels = [ax for ax in fig.axes if ax.images and not hasattr(ax, "_colorbar")]
        rows = {round(ax.get_position().y0, 3) for ax in panels}
        columns = {round(ax.get_position().x0, 3) for ax in panels}
        assert (len(rows), len(columns)) == (4, 3)                      # methods × k
        texts = [fig._suptitle.get_text() if fig._suptitle else ""] + [ax.get_title() for ax in panels]
        assert any("rabbit" in text for text in texts)
        assert any(hasattr(ax, "_colorbar") for ax in fig.axes), "no colour bar"
    finally:
        plt.close(fig)
