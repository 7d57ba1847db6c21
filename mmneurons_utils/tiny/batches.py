"""What every embedded model's training shares: teacher-forced caption batches, the learning-rate
schedule and the held-out caption quality printed along the way."""

from __future__ import annotations

import math

import torch

from .scenes import caption_scores, make_scene

MONITOR_SEED = 9_999  # held-out seed used for the training curve (final numbers use other seeds)


class CaptionBatcher:
    """Turns scenes into teacher-forced training batches for one model's processor."""

    def __init__(self, processor, prompt: str):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        probe = processor(images=[make_scene(0, 0).image], text=[prompt], return_tensors="pt")
        self.prompt_inputs = {k: v[0] for k, v in probe.items() if k not in ("pixel_values",)}
        self.prompt_ids = self.prompt_inputs.pop("input_ids")
        self.prompt_inputs.pop("attention_mask")

    def __call__(self, scenes) -> dict[str, torch.Tensor]:
        tok = self.tokenizer
        seqs, labels = [], []
        for scene in scenes:
            caption_ids = tok(" " + scene.caption, add_special_tokens=False).input_ids + [tok.eos_token_id]
            seqs.append(self.prompt_ids.tolist() + caption_ids)
            labels.append([-100] * len(self.prompt_ids) + caption_ids)
        width = max(map(len, seqs))
        pad = lambda rows, value: torch.tensor([r + [value] * (width - len(r)) for r in rows])
        batch = {
            "input_ids": pad(seqs, tok.pad_token_id),
            "attention_mask": pad([[1] * len(s) for s in seqs], 0),
            "labels": pad(labels, -100),
            "pixel_values": self.processor.image_processor(
                [s.image for s in scenes], return_tensors="pt")["pixel_values"],
        }
        for key, value in self.prompt_inputs.items():  # e.g. the Q-Former's copy of the prompt
            batch[key] = value.unsqueeze(0).expand(len(scenes), -1)
        return batch


def lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def caption_quality(vlm, scenes) -> dict:
    """Noun recall / precision and exact match of greedy captions against ground truth."""

    captions = vlm.describe([s.image for s in scenes])
    return caption_scores([c.text for c in captions], scenes)
