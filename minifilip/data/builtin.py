"""Batches of the built-in grounded dataset, ready for the model.

The training stream is indexed by step: batch `s` holds scenes s*B ... s*B + B - 1 (modulo the split size)
with one of each scene's captions drawn at random from a generator seeded by (seed, step). So a run
resumed at step s sees exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import numpy as np
import torch

from .grounded import CAPTIONS_PER_SCENE, render_scene

# CLIP's normalisation constants, used for every source so checkpoints are interchangeable
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def images_to_tensor(images: np.ndarray | list[np.ndarray]) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W), CLIP-normalised."""
    x = torch.from_numpy(np.ascontiguousarray(np.stack(images))).permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class BuiltinTrainStream:
    """Iterates (images (B, 3, S, S), captions list[str]) from step `start_step` on, forever."""

    def __init__(self, batch_size: int, image_size: int = 64, seed: int = 0, start_step: int = 0,
                 num_scenes: int = 200_000, caption_style: str = "color-first"):
        self.batch_size, self.image_size, self.seed = batch_size, image_size, seed
        self.step, self.num_scenes, self.caption_style = start_step, num_scenes, caption_style

    def batch(self, step: int):
        rng = np.random.default_rng([self.seed, 7, step])  # caption choice: one of each scene's phrasings
        first = step * self.batch_size
        scenes = [render_scene(self.seed, "train", (first + b) % self.num_scenes, self.image_size, self.caption_style)
                  for b in range(self.batch_size)]
        picks = rng.integers(CAPTIONS_PER_SCENE, size=len(scenes))
        return images_to_tensor([sc.image for sc in scenes]), [sc.captions[k] for sc, k in zip(scenes, picks)]

    def __iter__(self):
        while True:
            yield self.batch(self.step)
            self.step += 1


def builtin_val_pairs(n: int = 1000, image_size: int = 64, seed: int = 0, caption_style: str = "color-first"):
    """The first n validation scenes: (images (n, 3, S, S), captions (their first phrasing), scenes)."""
    scenes = [render_scene(seed, "val", i, image_size, caption_style) for i in range(n)]
    return images_to_tensor([sc.image for sc in scenes]), [sc.captions[0] for sc in scenes], scenes
