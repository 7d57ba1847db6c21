"""Shared fixtures and the test tiers.

Tiers (markers registered in ``pyproject.toml``): ``browser`` (tests/test_browser.py marks itself),
``notebooks`` (the notebooks under nbval, and tests that execute notebooks: marked on the test)
and ``slow`` (``@pytest.mark.slow`` on the test, or ``pytestmark = pytest.mark.slow`` for a whole
module: they train edits, run many scenes or whole CLI pipelines, seconds to minutes each at one
thread). The fast tier is ``pytest -m "not slow and not notebooks and not browser"``;
``python3 tasks.py test`` runs everything.
"""

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    for item in items:   # the notebooks themselves (nbval); the slow tests mark themselves
        if item.path.suffix == ".ipynb":
            item.add_marker(pytest.mark.notebooks)


def pytest_generate_tests(metafunc):
    """``random_vlm`` is tiny-llava, or each family a module lists in ``RANDOM_VLM_FAMILIES``."""
    if "random_vlm" in metafunc.fixturenames:
        families = getattr(metafunc.module, "RANDOM_VLM_FAMILIES", ("tiny-llava",))
        metafunc.parametrize("random_vlm", families, indirect=True, scope="module")


@pytest.fixture(scope="module")
def random_vlm(request):
    """An embedded architecture with random weights (seed 1), built in code: no training."""
    from mmneurons_utils.model.vlm import VLM
    from mmneurons_utils.tiny.build import build_tiny_instructblip, build_tiny_llava

    build = build_tiny_llava if request.param == "tiny-llava" else build_tiny_instructblip
    model, processor = build(seed=1)
    return VLM.from_parts(model, processor, family=request.param)


@pytest.fixture(scope="session")
def tiny_llava():
    from mmneurons_utils import load_vlm

    return load_vlm("tiny-llava")


@pytest.fixture(scope="session")
def tiny_instructblip():
    from mmneurons_utils import load_vlm

    return load_vlm("tiny-instructblip")


@pytest.fixture
def cli(capsys):
    """Run the ``mmneurons`` console script in-process: ``cli(*argv) → (exit code, stdout, stderr)``."""
    from mmneurons_utils.cli import main

    def run(*argv):
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run
