"""Weights that ``accelerate`` keeps off the device: read and change them where they are used.

A model loaded with a ``device_map`` larger than the device (``load_vlm(name,
device_map="auto", max_memory=…, offload_folder=…)``) keeps some modules' weights in CPU
memory or on disk; between forward passes those parameters sit on the ``meta`` device and
accelerate's hook (``module._hf_hook``) loads them from its ``weights_map`` for each call.
Reading ``down_proj.weight`` or ``lm_head.weight`` there gives an empty meta tensor, and
writing into it changes nothing that a forward pass uses. So every read of a weight in the
package goes through :func:`weight`, and every change through :func:`write_columns`:

* :func:`weight` returns the weight a forward pass would use (from the offload store when
  the module is offloaded), on the module's execution device;
* :func:`write_columns` changes columns of it *in the store* (an in-memory entry that takes
  priority over the disk copy), so later forward passes use the change; writing the
  original columns back restores it bit for bit.

Without accelerate, or for a module that is not offloaded, both act on ``module.weight``.
"""

from __future__ import annotations

import torch


def offloaded(module: torch.nn.Module) -> bool:
    """Whether accelerate keeps ``module``'s parameters off the device between calls."""
    try:
        from accelerate.utils import has_offloaded_params
    except ImportError:
        return False
    return has_offloaded_params(module)


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where ``module`` computes: its hook's execution device when accelerate dispatched it,
    else the device of its weight."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device) if not isinstance(device, torch.device) else device
    return module.weight.device


def _store(module: torch.nn.Module, name: str = "weight"):
    """``(mapping, key)``: where to write ``module.<name>`` so that the next forward pass loads
    the written value (reads go through the hook's ``weights_map``, which looks there first)."""
    from accelerate.utils.offload import PrefixedDataset

    weights = module._hf_hook.weights_map
    base, key = (weights.dataset, weights.prefix + name) if isinstance(weights, PrefixedDataset) \
        else (weights, name)
    # an OffloadedWeightsLoader reads its in-memory state_dict before the files on disk
    return (base.state_dict if hasattr(base, "state_dict") and hasattr(base, "index") else base), key


@torch.no_grad()
def weight(module: torch.nn.Module) -> torch.Tensor:
    """The weight a forward pass of ``module`` uses (``Float[Tensor, "out in"]``), on its
    execution device; for an offloaded module, loaded from the offload store (a copy:
    changing it changes nothing — use :func:`write_columns`)."""
    if not offloaded(module):
        return module.weight
    return module._hf_hook.weights_map["weight"].to(execution_device(module))


@torch.no_grad()
def write_columns(module: torch.nn.Module, columns: torch.Tensor, values: torch.Tensor) -> None:
    """Set ``weight[:, columns] = values`` where forward passes read it (``values``:
    ``Float[Tensor, "out N"]``, cast to the weight's dtype)."""
    if not offloaded(module):
        w = module.weight
        w[:, columns.to(w.device)] = values.to(w.device, w.dtype)
        return
    mapping, key = _store(module)
    changed = module._hf_hook.weights_map["weight"].clone()   # the disk copy stays as it was;
    # the in-memory entry written below takes priority over it
    changed[:, columns.to(changed.device)] = values.to(changed.device, changed.dtype)
    mapping[key] = changed
