"""smol-llava: pretrained SmolLM2-135M-Instruct, frozen, behind a vision tower and projector.

    python -m mmneurons_utils.tiny.train --model smol-llava     # resumable; bf16 autocast on CPU

The real ``LlavaForConditionalGeneration``: tiny-llava's CLIP tower (64 × 64 px, patch 8:
64 image tokens of width 128), a LLaVA-1.5 projector (128 → 576 → 576, GELU) and SmolLM2
(30 layers, d_model 576, SwiGLU d_ff 1,536: 46,080 units; vocabulary 49,152, tied).

What is trained, and why:

* the projector (new) and the vision tower (from tiny-llava's weights): the language model
  must read the image, and the tower was trained against another language model;
* low-rank adapters (rank 16) on the language model's *attention* projections: projector-only
  prototypes flattened at loss 0.7–0.8 with noun recall ~0.35, failing on three-object scenes —
  the frozen attention does not know where to look among 64 image tokens. The adapters are
  merged into q/k/v/o at load time.

Never trained: the MLPs (gate, up, down — the neurons studied) and the embedding /
unembedding matrix (tied): they stay exactly the pretrained ones (tested bit for bit).
The prompt is ChatML with the paper's words; the caption ends with ``<|im_end|>``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import (CLIPImageProcessorPil, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                          LlavaProcessor)

from ..model import pretrained_lm as P
from ..model.vlm import VLM
from .batches import MONITOR_SEED, CaptionBatcher, caption_quality, lr_factor
from .build import PATCH, _image_processor_kwargs
from .registry import WEIGHTS_DIR
from .scenes import NOUNS, TRAIN_SEED_BASE, make_scene, make_scenes

NAME = "smol-llava"
LORA_RANK, LORA_ALPHA = 16, 32
LORA_TARGETS = r".*language_model\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)"
# the committed weights were trained with exactly these stages (a stage continues the one before
# with a fresh optimizer and new scenes)
STAGES = [dict(steps=600, batch=16, lr_projector=2e-3, lr_tower=3e-4, lr_lora=1e-3, warmup=30, seed=0)]
CHECKPOINT_EVERY = 20


def build(seed: int = 0, init: Path | None = None):
    """smol-llava for training: ``(model, processor)``, language model pretrained and frozen,
    LoRA adapters (peft) on attention; tower from tiny-llava and projector new, or — with
    ``init``, a saved smol-llava folder — its trained tower, projector and adapters."""
    text_config_dict, lm_state, digest = P.cached_language_model()
    tokenizer = P.image_token_tokenizer(P.language_model_tokenizer())
    tiny_config = LlavaConfig.from_pretrained(WEIGHTS_DIR / "tiny-llava")
    text_config = LlamaConfig(**{k: v for k, v in text_config_dict.items()
                                 if k not in ("architectures", "model_type", "transformers_version")})
    text_config.pad_token_id = tokenizer.pad_token_id
    config = LlavaConfig(
        vision_config=tiny_config.vision_config, text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(P.IMAGE_TOKEN), vision_feature_layer=-1,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    tower = LlavaForConditionalGeneration.from_pretrained(WEIGHTS_DIR / "tiny-llava", dtype=torch.float32)
    model.model.vision_tower.load_state_dict(tower.model.vision_tower.state_dict())
    model.load_state_dict(P.language_model_state_for(lm_state), strict=False)
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    gc = model.generation_config
    gc.eos_token_id, gc.pad_token_id, gc.bos_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id, None
    gc.do_sample, gc.max_new_tokens = False, 16
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(**_image_processor_kwargs()), tokenizer=tokenizer,
        patch_size=PATCH, vision_feature_select_strategy="default", num_additional_image_tokens=1)
    model.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                       target_modules=LORA_TARGETS), model)
    for module in (model.model.vision_tower, model.model.multi_modal_projector):
        module.requires_grad_(True)
    model.gguf_sha256 = digest
    if init is not None:
        load_trained(model, Path(init) / P.TRAINED_FILE)
    return model, processor


def load_trained(model, path: Path) -> None:
    """Put a saved ``trained.safetensors`` (tower, projector, adapters' A / B) into a model
    built by :func:`build`; every saved tensor must find its parameter."""
    state = {}
    for name, tensor in load_file(str(path)).items():
        if name.startswith(P.LORA_PREFIX):
            module, kind = name[len(P.LORA_PREFIX):].rsplit(".", 1)
            name = f"{module}.lora_{kind}.default.weight"
        state[name] = tensor.float()
    unexpected = model.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"{path}: {len(unexpected)} tensors match no parameter, e.g. {unexpected[0]}")


def trained_state(model) -> dict[str, torch.Tensor]:
    """What this project trained: vision tower, projector, and each adapter's A / B."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name.startswith(("model.vision_tower.", "model.multi_modal_projector.")):
            state[name] = tensor
        elif ".lora_A.default." in name or ".lora_B.default." in name:
            module, kind = name.split(".lora_")[0], name.split(".lora_")[1][0]
            state[f"{P.LORA_PREFIX}{module}.{kind}"] = tensor
    return {k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}


def save(model, processor, out_dir: Path, log: dict) -> None:
    """The committed folder: config, processor + tokenizer, trained parts (fp16), marker, log."""
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = model.config.to_dict()
    config["text_config"].pop("_name_or_path", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=1))
    model.generation_config.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    save_file(trained_state(model), str(tmp / P.TRAINED_FILE))
    (tmp / "mmneurons.json").write_text(json.dumps({
        "nouns": list(NOUNS), "source": "mmneurons_utils.tiny.smol",
        "prompt_template": P.CHATML_PROMPT,
        "language_model": {"wheel": P.WHEEL_PIN, "gguf": P.GGUF_NAME, "gguf_sha256": model.gguf_sha256},
        "lora": {"rank": LORA_RANK, "alpha": LORA_ALPHA, "scale": LORA_ALPHA / LORA_RANK,
                 "targets": "q_proj k_proj v_proj o_proj of every language-model layer"}}, indent=1))
    (tmp / "training_log.json").write_text(json.dumps(log, indent=1))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


def train(out_dir: Path, steps: int, batch: int, lr_projector: float, lr_tower: float,
          lr_lora: float, warmup: int, seed: int, stage: int = 0, eval_every: int = 100,
          eval_n: int = 48, threads: int | None = None, checkpoint: Path | None = None) -> dict:
    """Train one stage (resuming from ``checkpoint`` when it holds this stage) and save the
    folder ``out_dir`` (at every evaluation too, so a snapshot is usable mid-run). Stage 0
    starts from the pretrained language model, tiny-llava's tower and a new projector;
    stage ``s > 0`` continues from the trained parts in ``out_dir`` with a fresh optimizer and
    new scenes. Returns the last evaluation."""
    if threads:
        torch.set_num_threads(threads)
    recipe = dict(steps=steps, batch=batch, lr_projector=lr_projector, lr_tower=lr_tower,
                  lr_lora=lr_lora, warmup=warmup, seed=seed, stage=stage)
    checkpoint = Path(checkpoint or out_dir.with_name(out_dir.name + ".checkpoint.pt"))
    earlier = _earlier_stages(out_dir, stage)
    model, processor = build(seed, init=out_dir if stage else None)
    vlm = VLM.from_parts(model, processor, family=NAME, noun_vocabulary=NOUNS,
                         prompt_template=P.CHATML_PROMPT)
    optimizer, schedule, trainable = _optimizer(model, recipe)
    start_step, curve, minutes_before = _resume(checkpoint, recipe, model, optimizer, schedule)
    batcher = CaptionBatcher(processor, vlm.prompt())
    monitor = make_scenes(eval_n, seed=MONITOR_SEED)
    start = time.time()
    minutes = lambda: round(minutes_before + (time.time() - start) / 60, 2)   # noqa: E731
    log = lambda done: dict(model=NAME, stages=earlier + [dict(   # noqa: E731
        recipe=recipe, threads=torch.get_num_threads(), autocast="bfloat16", trained=TRAINED,
        frozen=FROZEN, minutes=minutes(), complete=done, curve=curve)])
    for step in tqdm(range(start_step, steps), desc=f"train {NAME}", initial=start_step, total=steps):
        scenes = [make_scene(TRAIN_SEED_BASE + seed * 1_000_000 + stage * 100_000 + step, i)
                  for i in range(batch)]
        curve.append(dict(step=step + 1, loss=_step(model, batcher(scenes), optimizer, schedule, trainable),
                          minutes=minutes()))
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            model.eval()
            curve[-1].update(caption_quality(vlm, monitor))  # fp32, the captions the companion reads
            tqdm.write(json.dumps(curve[-1]))
            save(model, processor, out_dir, log(step + 1 == steps))
        if (step + 1) % CHECKPOINT_EVERY == 0 or step + 1 == steps:
            _checkpoint(checkpoint, recipe, step + 1, model, optimizer, schedule, curve, minutes())
    return curve[-1]


TRAINED = "vision tower, projector, rank-16 LoRA on attention q/k/v/o"
FROZEN = "every MLP (gate/up/down), embeddings = unembedding (tied), norms"


def _earlier_stages(out_dir: Path, stage: int) -> list[dict]:
    """The logs of stages ``0 … stage-1`` from ``out_dir`` (they must all be there)."""
    if not stage:
        return []
    log = json.loads((out_dir / "training_log.json").read_text())
    stages = [s for s in log.get("stages", []) if s["recipe"].get("stage", 0) < stage]
    if len(stages) != stage or not all(s.get("complete") for s in stages):
        raise SystemExit(f"stage {stage} continues stages 0…{stage - 1}, but {out_dir} holds "
                         f"{[s['recipe'].get('stage', 0) for s in stages]} (complete ones only count)")
    return stages


def _optimizer(model, recipe: dict):
    """AdamW with one group per trained part, linear warm-up then cosine to 10 %."""
    groups = [
        {"params": list(model.model.multi_modal_projector.parameters()), "lr": recipe["lr_projector"]},
        {"params": list(model.model.vision_tower.parameters()), "lr": recipe["lr_tower"]},
        {"params": [p for n, p in model.named_parameters() if "lora_" in n], "lr": recipe["lr_lora"]},
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, recipe["warmup"], recipe["steps"]))
    return optimizer, schedule, [p for g in groups for p in g["params"]]


def _step(model, batch: dict, optimizer, schedule, trainable) -> float:
    """One bf16-autocast step (the loss is on the caption and ``<|im_end|>`` only)."""
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    optimizer.step()
    schedule.step()
    return round(loss.item(), 4)


def _resume(checkpoint: Path, recipe: dict, model, optimizer, schedule) -> tuple[int, list, float]:
    """``(step, curve, minutes)`` from ``checkpoint`` when it holds this recipe, else a fresh start."""
    if not checkpoint.is_file():
        return 0, [], 0.0
    saved = torch.load(checkpoint, weights_only=False)
    finished_earlier = (saved["recipe"].get("stage", 0) < recipe["stage"]
                        and saved["step"] == saved["recipe"]["steps"])
    if finished_earlier:   # an earlier stage's finished run: its weights are in the folder
        return 0, [], 0.0
    if saved["recipe"] != recipe:
        raise SystemExit(f"{checkpoint} was written with {saved['recipe']}, not {recipe}: "
                         "delete it to start again")
    model.load_state_dict(saved["trainable"], strict=False)
    optimizer.load_state_dict(saved["optimizer"])
    schedule.load_state_dict(saved["schedule"])
    print(f"resuming {NAME} stage {recipe['stage']} at step {saved['step']}", flush=True)
    return saved["step"], saved["curve"], saved["minutes"]


def _checkpoint(path: Path, recipe: dict, step: int, model, optimizer, schedule, curve, minutes) -> None:
    """Trainable weights, optimizer and schedule, written atomically."""
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(dict(recipe=recipe, step=step, trainable=trainable, curve=curve, minutes=minutes,
                    optimizer=optimizer.state_dict(), schedule=schedule.state_dict()), tmp)
    tmp.replace(path)
