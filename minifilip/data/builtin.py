"""Batches of the built-in grounded dataset, shaped like those of the real sources.

The training stream is indexed by step: batch `s` holds scenes s*B ... s*B + B - 1 (modulo the split size)
with one of each scene's captions drawn at random from a generator seeded by (seed, step). So a run
resumed at step s sees exactly the batches an uninterrupted run would have seen. With several processes
(torchrun), rank r of W renders only its slice [r*B/W, (r+1)*B/W) of that same global batch.

Like a real-data DataLoader (`sources.make_loader`), the stream yields (images, captions, keys, counts): the
keys name the scenes ("train/000123") and the counts of bad / converted samples are always empty, because a
rendered scene is never bad. So the training loop reads both kinds of data the same way.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .grounded import CAPTIONS_PER_SCENE, Scene, render_scene
from .transforms import images_to_tensor


class BuiltinTrainStream:
    """Iterates (images (B, 3, S, S), captions list[str], keys list[str], counts {}) from step `start_step`
    on, forever.

    batch_size is the global batch B; with world_size W > 1 each batch is this rank's B / W pairs of it.
    """

    def __init__(self, batch_size: int, image_size: int = 64, seed: int = 0, start_step: int = 0,
                 num_scenes: int = 200_000, rank: int = 0, world_size: int = 1, caption_style: str = "color-first"):
        if batch_size % world_size or not 0 <= rank < world_size:
            raise ValueError(f"batch_size {batch_size} must split evenly over world_size {world_size} "
                             f"(rank {rank})")
        self.batch_size, self.image_size, self.seed = batch_size, image_size, seed
        self.step, self.num_scenes, self.caption_style = start_step, num_scenes, caption_style
        self.rank, self.world_size = rank, world_size

    def batch(self, step: int):
        """Batch number `step`: (images (B, 3, S, S), captions, keys, counts {})."""
        rng = np.random.default_rng([self.seed, 7, step])  # caption choice: one of each scene's phrasings
        local = self.batch_size // self.world_size
        mine = range(self.rank * local, (self.rank + 1) * local)  # my slice of the global batch
        first = step * self.batch_size
        indices = [(first + b) % self.num_scenes for b in mine]
        scenes = [render_scene(self.seed, "train", i, self.image_size, self.caption_style) for i in indices]
        picks = rng.integers(CAPTIONS_PER_SCENE, size=self.batch_size)[mine.start:mine.stop]  # global draw, sliced
        captions = [sc.captions[k] for sc, k in zip(scenes, picks)]
        return images_to_tensor([sc.image for sc in scenes]), captions, [f"train/{i:06d}" for i in indices], {}

    def __iter__(self):
        while True:
            yield self.batch(self.step)
            self.step += 1


def builtin_val_pairs(n: int = 1000, image_size: int = 64, seed: int = 0, caption_style: str = "color-first"):
    """The first n validation scenes: (images (n, 3, S, S), captions (their first phrasing), scenes)."""
    scenes = [render_scene(seed, "val", i, image_size, caption_style) for i in range(n)]
    return images_to_tensor([sc.image for sc in scenes]), [sc.captions[0] for sc in scenes], scenes


def find_val_scenes(keep: Callable[[Scene], bool], count: int, image_size: int = 64, seed: int = 0,
                    search: int = 100_000) -> list[tuple[int, Scene]]:
    """(index, scene) of the first `count` val scenes with keep(scene) true, in index order: a fixed choice, so
    figures and zero-shot sets are the same in every run. Looks at most `search` scenes."""
    found = []
    for i in range(search):
        if len(found) == count:
            break
        scene = render_scene(seed, "val", i, image_size)
        if keep(scene):
            found.append((i, scene))
    if len(found) < count:
        raise ValueError(f"only {len(found)} of the first {search} val scenes qualify; {count} asked for")
    return found
