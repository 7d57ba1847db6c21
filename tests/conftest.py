import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


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
