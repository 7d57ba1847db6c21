"""Turning a model name, device and dtype into a loaded model: device and dtype parsing,
device maps (CPU / disk offload through accelerate), the hub lookup, and the one error type
for all of it (:class:`ModelLoadError`). :func:`~mmneurons_utils.model.vlm.load_vlm` uses them.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig


class ModelLoadError(ValueError):
    """The model name, path or device cannot be used (the message says what is accepted)."""


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def load_mapped(model_class, source, dtype, local, device_map, max_memory, offload_folder):
    """``from_pretrained`` with a device map; its errors said in this package's terms."""
    try:
        model = model_class.from_pretrained(source, dtype=dtype, local_files_only=local,
                                            device_map=device_map, max_memory=max_memory,
                                            offload_folder=offload_folder)
    except ValueError as exc:
        text = str(exc)
        if "offload_folder" in text or "offload" in text and "disk" in text:
            raise ModelLoadError("the device map puts some layers on disk; pass offload_folder="
                                 "<a folder with room for them>") from exc
        raise ModelLoadError(f"device_map={device_map!r} / max_memory={max_memory!r} cannot be "
                             f"used: {text.splitlines()[0]}") from exc
    except (RuntimeError, AssertionError, KeyError) as exc:
        raise ModelLoadError(f"device_map={device_map!r} cannot be used here: "
                             f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    return model.eval()


def hub_model_type(hub_id: str) -> str:
    """The ``model_type`` of a hub repository's config (the one lookup that reaches the network)."""
    try:
        return AutoConfig.from_pretrained(hub_id).model_type
    except OSError as exc:
        raise ModelLoadError(f"cannot fetch {hub_id!r} from the hub (offline, or no such repo); "
                             "download it first and pass the local folder") from exc


def parse_device(device) -> torch.device:
    """``device`` (default CPU) as a ``torch.device`` that is available here."""
    try:
        dev = torch.device(device or "cpu")
    except (RuntimeError, TypeError) as exc:
        raise ModelLoadError(f"bad device {device!r}; use cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but CUDA is not available; use cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but MPS is not available; use cpu")
    return dev


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype) -> torch.dtype:
    """``dtype`` (default float32; a name or a ``torch.dtype``) as a ``torch.dtype``."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype) in _DTYPES:
        return _DTYPES[str(dtype)]
    raise ModelLoadError(f"bad dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
