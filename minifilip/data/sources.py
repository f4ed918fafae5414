"""From a `--train-data` / `--val-data` string to a stream of samples, a DataLoader, captions, eval pairs.

A data spec is one of (open_clip's conventions):
    builtin                                    the built-in grounded shapes dataset (the default)
    cc3m/{00000..00331}.tar::more/*.tar        webdataset tar shards (brace ranges, globs, '::'-joined lists)
    cc3m/                                      a folder with *.tar shards in it (same as cc3m/*.tar)
    cc3m_files/                                a folder of img2dataset `files` output (00000/KEY.jpg + KEY.txt)
    train.tsv / train.csv                      a list with image-path and caption columns

    stream = open_stream("cc3m/{00000..00331}.tar", eval_transform(224), shuffle=False, epochs=1)
    loader = make_loader(stream, batch_size=256, num_workers=8)   # batches of (images, captions, keys, counts)
"""
from __future__ import annotations

import copy
import glob
import os
import random
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from .decode import BadSample, decode_captions, decode_sample, split_counts
from .lists import CsvDataset, FolderDataset, IndexStream
from .shards import ShardStream, expand_urls, iter_tar_groups
from .stream import SampleStream, collate, worker_init_fn
from .transforms import draft_side_for, eval_transform, train_transform


@dataclass
class CsvOptions:
    """Column names and separator of a TSV/CSV list (open_clip's --csv-img-key etc.)."""
    img_key: str = "filepath"
    caption_key: str = "title"
    sep: str = "\t"


def is_builtin(spec: str | None) -> bool:
    return spec is None or spec.strip().lower() == "builtin"


def source_kind(spec: str) -> str:
    """'shards', 'csv' or 'folder' (raises FileNotFoundError for a path that does not exist)."""
    plain = os.path.expanduser(spec.strip())
    if "::" in plain or "{" in plain or glob.has_magic(plain):
        return "shards"
    lower = plain.lower()
    if lower.endswith((".csv", ".tsv")):
        if not os.path.isfile(plain):
            raise FileNotFoundError(f"no such list file: {plain}")
        return "csv"
    if os.path.isdir(plain):
        return "shards" if glob.glob(os.path.join(glob.escape(plain), "*.tar")) else "folder"
    if os.path.isfile(plain):
        return "shards"
    raise FileNotFoundError(f"data source {spec!r} does not exist")


def shard_files(spec: str) -> list[str]:
    """The shard files of a 'shards' spec (a folder means its *.tar files)."""
    plain = os.path.expanduser(spec.strip())
    if os.path.isdir(plain):
        return expand_urls(os.path.join(glob.escape(plain), "*.tar"))
    return expand_urls(spec)


def list_dataset(spec: str, kind: str, csv: CsvOptions | None):
    """The random-access dataset behind a 'csv' or 'folder' spec (see source_kind): a CsvDataset or FolderDataset."""
    csv = csv or CsvOptions()
    if kind == "csv":
        return CsvDataset(os.path.expanduser(spec.strip()), img_key=csv.img_key, caption_key=csv.caption_key,
                          sep=csv.sep)
    return FolderDataset(os.path.expanduser(spec.strip()))


def open_stream(spec: str, transform, *, csv: CsvOptions | None = None, shuffle_buffer: int = 1000,
                **stream_kwargs) -> SampleStream:
    """A SampleStream over any real-data spec; stream_kwargs go to SampleStream (shuffle, seed, epochs, ...)."""
    kind = source_kind(spec)
    if kind == "shards":
        return ShardStream(shard_files(spec), transform, shuffle_buffer=shuffle_buffer, **stream_kwargs)
    dataset = list_dataset(spec, kind, csv)
    if len(dataset) == 0:
        raise ValueError(f"{spec} holds no samples")
    return IndexStream(dataset, transform, **stream_kwargs)


def train_stream(spec: str, image_size: int, seed: int = 0, start_epoch: int = 0, autoaugment: bool = True,
                 uint8: bool = False, **kwargs) -> SampleStream:
    """The training stream: shuffled, random crops + AutoAugment, forever from `start_epoch`. uint8: images come
    as uint8 tensors, for transforms.normalize_uint8 on the device (train.py does this)."""
    return open_stream(spec, train_transform(image_size, autoaugment, uint8=uint8), shuffle=True, seed=seed,
                       start_epoch=start_epoch, min_side=image_size, draft_side=draft_side_for(image_size, True),
                       **kwargs)


def eval_stream(spec: str, image_size: int, epochs: int | None = 1, **kwargs) -> SampleStream:
    """File order, first caption, resize + center crop: the same pairs every time."""
    return open_stream(spec, eval_transform(image_size), shuffle=False, epochs=epochs, min_side=image_size,
                       draft_side=draft_side_for(image_size, False), **kwargs)


def make_loader(stream: SampleStream, batch_size: int, num_workers: int = 0, pin_memory: bool = False,
                prefetch_factor: int = 4, seed: int = 0) -> DataLoader:
    """Batches (images (B, 3, S, S), captions, keys, counts[, position]) from a stream. Workers run one thread
    each and stay alive across epochs (the stream itself loops over epochs, so they are never re-forked).
    The loader's own generator (from `seed`) draws its worker seed, so starting it takes nothing from the
    process's torch generator (a resumed run's dropout stays in step with an uninterrupted one)."""
    extra = dict(persistent_workers=True, prefetch_factor=prefetch_factor, worker_init_fn=worker_init_fn) \
        if num_workers > 0 else {}
    return DataLoader(stream, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                      pin_memory=pin_memory, drop_last=True, generator=torch.Generator().manual_seed(seed), **extra)


def check_source(stream: SampleStream, spec: str, max_tries: int = 256) -> None:
    """Decode samples in this process until one is good; raise ValueError with the bad-sample counts if the
    first `max_tries` (or all) are bad, so a broken download stops the run before any worker starts."""
    probe = copy.copy(stream)
    probe.shuffle = False  # file order: no shuffle buffer to fill first
    counts: Counter = Counter()
    tried, exhausted = 0, True
    for _key, image, blobs in probe.raw_samples(probe.epoch_units(probe.start_epoch), random.Random(0), counts):
        if tried >= max_tries:
            exhausted = False
            break
        tried += 1
        try:
            decode_sample(image, blobs, None, probe.min_side, probe.max_pixels, counts, probe.draft_side)
            return
        except BadSample as e:
            counts[e.reason] += 1
    bad, _ = split_counts(counts)
    detail = ", ".join(f"{k}={v}" for k, v in sorted(bad.items())) or "no samples at all"
    scope = "all" if exhausted else f"the first {tried}"
    raise ValueError(f"no usable image-text pair in {spec!r}: {scope} samples are bad ({detail})")


def load_pairs(spec: str, n: int, image_size: int, csv: CsvOptions | None = None
               ) -> tuple[torch.Tensor, list[str], list[str], dict]:
    """The first n good samples of a source, eval transform, first caption: (images, captions, keys, counts)."""
    stream = eval_stream(spec, image_size, csv=csv)
    images, captions, keys = [], [], []
    for x, caption, key, _ in stream:
        images.append(x)
        captions.append(caption)
        keys.append(key)
        if len(images) == n:
            break
    if len(images) < 2:
        raise ValueError(f"{spec!r} gave {len(images)} usable pairs; retrieval needs at least 2")
    return torch.stack(images), captions, keys, dict(stream.counts)


def iter_captions(spec: str, limit: int = 0, csv: CsvOptions | None = None) -> Iterator[str]:
    """Every caption (all variants) of the first `limit` samples (0 = all), without decoding a single image:
    what WordTokenizer.fit needs. Bad captions are skipped silently (training counts them)."""
    kind = source_kind(spec)
    samples = 0
    if kind == "shards":
        groups = ((k, m) for url in shard_files(spec) for k, m in iter_tar_groups(url, Counter(), captions_only=True))
        blob_lists = ([m[e] for e in m if e.endswith("txt")] for _k, m in groups)
    else:
        dataset = list_dataset(spec, kind, csv)
        blob_lists = (dataset.captions(i) for i in range(len(dataset)))
    for blobs in blob_lists:
        try:
            yield from decode_captions(blobs)
        except BadSample:
            pass
        samples += 1
        if limit and samples >= limit:
            return
