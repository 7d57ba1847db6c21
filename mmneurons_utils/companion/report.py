"""Environment report for the setup notebook and bug reports."""

from __future__ import annotations

import platform


def environment_report() -> dict:
    """Versions and hardware: what a reader needs to reproduce a run."""
    import torch
    import transformers

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu memory (GiB)"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info
