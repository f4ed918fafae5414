"""SampleStream: the IterableDataset every real-data source is read through.

One stream yields `(image tensor (3, S, S), caption, key, counts)` per good sample, where `counts` is a small
dict of the bad / converted samples met since the previous yield ({"decode_error": 1, "mode_CMYK": 2}). The
counts travel with the samples because a DataLoader worker is a separate process: piggy-backing on the
batches is the simplest way to get them back to the training loop, which sums them (see `collate`).

What the base class takes care of, so the concrete sources (tar shards, TSV lists, folders) only have to list
their "units" (shards, or sample indices) and read raw samples from them:
  * splitting units across ranks (multi-GPU) and DataLoader workers: unit i of an epoch goes to
    slot i % (world_size * num_workers), so each sample is seen once per epoch across all processes;
  * epochs: a reproducible unit order per (seed, epoch), shared by all workers; epochs=None streams forever;
  * skipping and counting bad samples, and never spinning forever: a worker whose units give no good sample
    in a whole epoch stops instead of starting the next epoch;
  * exact mid-epoch resume: every sample's randomness (caption choice, augmentation) comes from its own seed
    (seed, epoch, slot, index in the slot's epoch), so nothing depends on what came before it. With
    `track_positions`, each sample also carries its slot's position (epoch, raw samples consumed), and a stream
    given `resume_positions` replays each slot's raw sample order up to there without decoding, then goes on
    exactly where the stopped run left off (train.py stores the positions in the checkpoint).
"""
from __future__ import annotations

import itertools
import random
from collections import Counter
from typing import Callable, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .decode import DEFAULT_MAX_PIXELS, BadSample, decode_sample

RawSample = tuple  # (key: str, image: bytes | path | None, caption_blobs: list[bytes])


def _seeded(*parts) -> random.Random:
    """A Random seeded from a string: stable across processes and Python runs (unlike hash())."""
    return random.Random("-".join(str(p) for p in parts))


class SampleStream(IterableDataset):
    """Base class; subclasses implement `units()` and `raw_samples(units, rng, counts)`.

    transform:  PIL RGB -> tensor (train_transform or eval_transform)
    shuffle:    shuffle unit order per epoch (and, for subclasses, samples); also picks a random caption per
                visit when a sample has several. shuffle=False: file order, always the first caption.
    epochs:     None = repeat forever (training); an int = that many epochs (tests, evaluation).
    """

    def __init__(self, transform: Callable, *, shuffle: bool = True, seed: int = 0, epochs: int | None = None,
                 start_epoch: int = 0, rank: int = 0, world_size: int = 1, min_side: int = 0,
                 max_pixels: int = DEFAULT_MAX_PIXELS, draft_side: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.transform, self.shuffle, self.seed = transform, shuffle, seed
        self.epochs, self.start_epoch, self.rank, self.world_size = epochs, start_epoch, rank, world_size
        self.min_side, self.max_pixels, self.draft_side = min_side, max_pixels, draft_side
        self.counts: Counter = Counter()  # totals seen by THIS process (workers report through the yields)
        self.track_positions = False  # yield (x, caption, key, counts, (slot, n_slots, epoch, consumed))
        self.resume_positions: dict[int, tuple[int, int]] = {}  # slot -> (epoch, raw samples consumed in it)
        # DataLoader worker w plays slot (w + rotation) % workers: the loader always asks worker 0 first, so a
        # resumed run rotates the slots to hand over its batches in the order the stopped run would have
        self.worker_rotation = 0

    # --- to implement ---
    def units(self) -> list:
        raise NotImplementedError

    def raw_samples(self, units: list, rng: random.Random, counts: Counter) -> Iterator[RawSample]:
        raise NotImplementedError

    def epoch_length(self) -> int | None:
        """Samples per epoch if known (before bad ones are skipped), else None."""
        return None

    # --- shared machinery ---
    def epoch_units(self, epoch: int) -> list:
        units = list(self.units())
        if self.shuffle:
            _seeded(self.seed, "units", epoch).shuffle(units)  # same order in every worker: they must agree
        return units

    def _slot(self) -> tuple[int, int]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * workers + (worker + self.worker_rotation) % workers, self.world_size * workers

    def __iter__(self) -> Iterator[tuple]:
        slot, n_slots = self._slot()
        pending: Counter = Counter()  # bad / converted samples not yet reported
        held = None  # the last good sample, yielded one step late so it can carry the counts that follow it
        last = None  # the resume point after the last good sample (for the final report)
        first, skip = self.resume_positions.get(slot, (self.start_epoch, 0))  # resume: replay `skip` raw samples
        epochs = itertools.count(first) if self.epochs is None else range(first, self.start_epoch + self.epochs)
        try:
            for epoch in epochs:
                mine = self.epoch_units(epoch)[slot::n_slots]
                rng = _seeded(self.seed, "samples", epoch, slot)  # the raw order (shuffle buffer) only
                good, reading = 0, Counter()  # reading: what the reader met (cut-off tars, ...) pulling a sample
                for index, (key, image, blobs) in enumerate(self.raw_samples(mine, rng, reading)):
                    if not skip or index > skip:
                        pending.update(reading)
                    reading.clear()  # else: met before the checkpoint, whose counts already hold it
                    if index < skip:  # seen before the checkpoint: not decoded
                        continue
                    own: Counter = Counter()  # this sample's conversions: reported with it, not with the held one
                    try:
                        x, caption = self._sample(image, blobs, epoch, slot, index, own)
                    except BadSample as e:
                        pending.update(own)
                        pending[e.reason] += 1
                        continue
                    good += 1
                    if held is not None:  # resume point of the held sample: this one (the bad ones between counted)
                        yield self._report(held, pending, (slot, n_slots, epoch, index))
                    pending.update(own)
                    held = (x, caption, key)
                    last = (slot, n_slots, epoch, index + 1)
                pending.update(reading)
                if good == 0 and skip == 0:
                    # nothing usable in my share (or no share at all, e.g. more workers than shards): stop here
                    # rather than loop over bad data forever; the other workers carry on
                    break
                skip = 0
            if held is not None:  # the last sample takes every count still pending: none is lost
                yield self._report(held, pending, last)
        finally:
            self.counts.update(pending)

    def _sample(self, image, blobs, epoch: int, slot: int, index: int, pending: Counter) -> tuple:
        """(tensor, caption) of one raw sample or BadSample. Shuffled streams draw the caption and seed the
        augmentation from the sample's own generator (so a resumed stream gives the same sample the same crop);
        the process's torch generator is left as it was."""
        if not self.shuffle:
            img, caption = decode_sample(image, blobs, None, self.min_side, self.max_pixels, pending,
                                         self.draft_side)
            return self.transform(img), caption
        rng = _seeded(self.seed, "sample", epoch, slot, index)
        img, caption = decode_sample(image, blobs, rng, self.min_side, self.max_pixels, pending, self.draft_side)
        with torch.random.fork_rng(devices=[]):  # CPU generator only: CUDA's is never touched here
            torch.default_generator.manual_seed(rng.getrandbits(62))
            return self.transform(img), caption

    def _report(self, held: tuple, pending: Counter, position: tuple) -> tuple:
        """The held sample with the counts met since it; position: (slot, n_slots, epoch, raw index to resume
        from), i.e. the first raw sample whose counts are not in this report."""
        delta = dict(pending)
        self.counts.update(pending)
        pending.clear()
        return (*held, delta, position) if self.track_positions else (*held, delta)


def collate(batch: list[tuple]) -> tuple:
    """DataLoader collate_fn: (images (B, 3, S, S), captions, keys, summed counts), plus, for a stream with
    track_positions, the position after the batch's last sample: a DataLoader worker batches its own samples, so
    every sample of a batch comes from one slot and the last one's position covers them all."""
    images, captions, keys, deltas = list(zip(*batch))[:4]
    total: Counter = Counter()
    for d in deltas:
        total.update(d)
    out = (torch.stack(images), list(captions), list(keys), dict(total))
    return (*out, batch[-1][4]) if len(batch[-1]) == 5 else out


def worker_init_fn(_worker_id: int) -> None:
    """One intra-op thread per DataLoader worker. A forked worker inherits PyTorch's default thread count
    (all cores); with N workers each running N threads on tensor ops, the machine thrashes: measured ~370
    img/s per worker alone vs ~50 img/s for all of them together on 16 cores."""
    torch.set_num_threads(1)
