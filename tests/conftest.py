"""Shared fixtures and the test tiers.

Tiers (markers registered in ``pyproject.toml``): ``browser`` (tests/test_browser.py marks itself),
``notebooks`` (the notebooks under nbval, and tests that execute notebooks) and ``slow``
(:data:`SLOW`: they train edits, run many scenes or whole CLI pipelines, measured at one
thread). The fast tier is ``pytest -m "not slow and not notebooks and not browser"``;
``python3 tasks.py test`` runs everything.
"""

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))

# tests that take seconds to minutes each (measured at one thread): a module, or module::test-name prefix
SLOW = ("test_parallel", "test_fidelity", "test_editing", "test_editors", "test_bench_official", "test_atlas", "test_offload",
        "test_vocabulary::test_bench_reports", "test_vlm::test_committed_weights",
        "test_properties::test_semantic_sensitivity", "test_properties::test_region_invariance",
        "test_properties::test_a_permutation", "test_properties::test_an_identity_permutation",
        "test_properties::test_specificity_scores", "test_properties::test_cross_image",
        "test_interventions::test_identified_units", "test_handoff::test_the_method_core",
        "test_handoff::test_the_identification", "test_cli_causal::test_edit",
        "test_causal_widgets::test_edit_playground", "test_cli::test_atlas", "test_atlas::test_cli",
        "test_scenes::test_one_two_and_three", "test_own_images", "test_smol_cli", "test_smol_widgets",
        "test_faults::test_outputs_on_pseudo", "test_faults::test_a_lock_file_that_cannot",
        "test_faults::test_ctrl_c", "test_faults::test_an_export_killed",
        "test_faults_runner::test_a_second_comparison", "test_faults_runner::test_a_failed_comparison",
        "test_text_twin::test_smol_")
# tests that execute notebooks (papermill); the notebooks themselves run under nbval
NOTEBOOK_TESTS = ("test_own_images::test_notebook_",)


def _matches(item, patterns) -> bool:
    module, name = item.path.stem, item.name
    return any(module == p or (p.startswith(module + "::") and name.startswith(p.split("::")[1]))
               for p in patterns)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.suffix == ".ipynb" or _matches(item, NOTEBOOK_TESTS):
            item.add_marker(pytest.mark.notebooks)
        if _matches(item, SLOW):
            item.add_marker(pytest.mark.slow)


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
