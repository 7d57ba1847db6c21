"""Train an embedded model on freshly generated scenes, reproducibly.

    python -m mmneurons_utils.tiny.train --model tiny-llava
    python -m mmneurons_utils.tiny.train --model tiny-instructblip
    python -m mmneurons_utils.tiny.train --model smol-llava          # tiny/smol.py: resumable, bf16

Each step draws a new batch of training scenes (seeds ≥ ``TRAIN_SEED_BASE``; the
evaluation range 0–9,999 is never seen), teacher-forces the paper's prompt
followed by the caption and ``</s>``, and puts the loss on the caption and
``</s>`` only. AdamW with linear warm-up and cosine decay, gradient clipping 1.0.
Every ``--eval-every`` steps it captions held-out scenes greedily and prints
noun recall / exact match; the curve is saved next to the weights
(``training_log.json``). The weights are saved in fp16 (safetensors) together
with the tokenizer and processor, so ``load_vlm(name)`` finds them offline.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .scenes import NOUNS, TRAIN_SEED_BASE, make_scene, make_scenes
from .batches import MONITOR_SEED, CaptionBatcher, caption_quality, lr_factor
from .build import BUILDERS
from . import smol
from ..model.vlm import VLM
from .registry import WEIGHTS_DIR

# The committed weights were trained with exactly these stages; each later stage
# continues from the previous one's weights with a fresh optimizer and new scenes.
RECIPES = {
    "tiny-llava": [dict(steps=3000, batch=32, lr=1e-3, warmup=100, seed=0),
                   dict(steps=1500, batch=32, lr=3e-4, warmup=50, seed=0)],
    "tiny-instructblip": [dict(steps=5000, batch=32, lr=1e-3, warmup=100, seed=0),
                          dict(steps=6000, batch=32, lr=1e-3, warmup=100, seed=0)],
}


def train(name: str, steps: int, batch: int, lr: float, warmup: int, seed: int,
          eval_every: int = 250, eval_n: int = 200, out_dir: Path | None = None,
          threads: int | None = None, init: Path | None = None, stage: int = 0) -> dict:
    """Train ``name`` from scratch (or continue from the checkpoint folder ``init``).

    ``stage`` offsets the training-scene seeds so a continuation sees new scenes.
    """

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    previous = []  # the earlier stages' logs, read before out_dir (maybe == init) is replaced
    if init is not None and (Path(init) / "training_log.json").is_file():
        old = json.loads((Path(init) / "training_log.json").read_text())
        previous = old.get("stages", [old] if "curve" in old else [])
    model, processor = BUILDERS[name](seed=seed)
    if init is not None:  # continue from a saved checkpoint (weights only; fresh optimizer)
        model = type(model).from_pretrained(init, dtype=torch.float32)
    vlm = VLM.from_parts(model, processor, family=name)
    batcher = CaptionBatcher(processor, vlm.prompt())
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, steps))

    monitor = make_scenes(eval_n, seed=MONITOR_SEED)
    log: list[dict] = []
    start = time.time()
    bar = tqdm(range(steps), desc=f"train {name}")
    for step in bar:
        model.train()
        scenes = [make_scene(TRAIN_SEED_BASE + seed * 1_000_000 + stage * 100_000 + step, i)
                  for i in range(batch)]
        loss = model(**batcher(scenes)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            model.eval()
            quality = caption_quality(vlm, monitor)
            entry = dict(step=step + 1, loss=round(loss.item(), 4),
                         minutes=round((time.time() - start) / 60, 2), **quality)
            log.append(entry)
            tqdm.write(json.dumps(entry))
    model.eval()
    out_dir = Path(out_dir or WEIGHTS_DIR / name)
    save_embedded(model, processor, out_dir)
    recipe = dict(steps=steps, batch=batch, lr=lr, warmup=warmup, seed=seed, stage=stage,
                  init=str(init) if init else None)
    stages = previous + [dict(recipe=recipe, threads=torch.get_num_threads(),
                              minutes=round((time.time() - start) / 60, 2), curve=log)]
    (out_dir / "training_log.json").write_text(json.dumps(dict(model=name, stages=stages), indent=1))
    return log[-1]


def save_embedded(model, processor, out_dir: Path) -> None:
    """fp16 safetensors + processor, written to a temp folder and renamed (no partial folder)."""
    import shutil

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.float16).save_pretrained(tmp)
    model.to(torch.float32)
    processor.save_pretrained(tmp)
    # marks a checkpoint trained on the scenes: its nouns are the scene vocabulary
    (tmp / "mmneurons.json").write_text(json.dumps({"nouns": list(NOUNS), "source": "mmneurons_utils.tiny"}))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mmneurons_utils.tiny.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, choices=sorted(RECIPES) + ["smol-llava"],
                        help="the embedded model to train (its committed recipe, every stage, unless a "
                             "setting below is given)")
    parser.add_argument("--steps", type=int, help="optimiser steps (default: the recipe's)")
    parser.add_argument("--batch", type=int, help="scenes per step (default: the recipe's)")
    parser.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's)")
    parser.add_argument("--warmup", type=int, help="linear warm-up steps (default: the recipe's)")
    parser.add_argument("--seed", type=int, help="initialisation and shuffling seed (default: the recipe's)")
    parser.add_argument("--eval-every", type=int, default=250,
                        help="steps between held-out caption checks (default 250; smol-llava 100)")
    parser.add_argument("--eval-n", type=int, default=200,
                        help="held-out scenes per check (default 200; smol-llava 48)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, help="output folder (default: the committed weights)")
    parser.add_argument("--init", type=Path, help="continue from this checkpoint folder")
    parser.add_argument("--stage", type=int, default=0, help="continuation number (new scene seeds)")
    args = parser.parse_args(argv)
    common = dict(eval_every=args.eval_every, eval_n=args.eval_n, threads=args.threads)
    if args.model == "smol-llava":  # pretrained LM, frozen: its own resumable recipe (tiny/smol.py)
        out = args.out or WEIGHTS_DIR / "smol-llava"
        stages = [args.stage] if args.stage else range(len(smol.STAGES))
        for stage in stages:
            recipe = dict(smol.STAGES[min(stage, len(smol.STAGES) - 1)],
                          **{k: v for k in ("steps", "batch", "warmup", "seed") if (v := getattr(args, k)) is not None})
            final = smol.train(out, **recipe, stage=stage, threads=args.threads,
                               eval_every=args.eval_every if args.eval_every != 250 else 100,
                               eval_n=args.eval_n if args.eval_n != 200 else 48)
        print(json.dumps(final))
        return
    out = args.out or WEIGHTS_DIR / args.model
    custom = {k: v for k in RECIPES[args.model][0] if (v := getattr(args, k)) is not None}
    if custom or args.init is not None or args.stage:  # one run, the first stage's settings as defaults
        recipe = dict(RECIPES[args.model][0], **custom)
        final = train(args.model, **recipe, out_dir=out, init=args.init, stage=args.stage, **common)
    else:  # the committed recipe, every stage
        for stage, recipe in enumerate(RECIPES[args.model]):
            final = train(args.model, **recipe, out_dir=out, init=out if stage else None,
                          stage=stage, **common)
    print(json.dumps(final))


if __name__ == "__main__":
    main()
