"""Map-style sources: a TSV/CSV list of (image path, caption) rows, and img2dataset's `files` folder layout.

    filepath<TAB>title                       (open_clip's default column names; configurable)
    images/000.jpg<TAB>a dog on a beach      relative paths resolve against the list file's folder

    cc3m_files/00000/000000000.jpg + 000000000.txt (+ .json)     img2dataset --output_format files
                                   + 000000000.1.txt ...          extra captions, one picked per visit

Both are plain `torch.utils.data.Dataset`s: `ds[i]` is (image tensor, caption, key) or raises BadSample.
For training they are read through `IndexStream`, which gives them the same epoch shuffling, worker split and
bad-sample skipping as the tar shards (random access makes a shuffle buffer unnecessary).
"""
from __future__ import annotations

import csv
import os
import random
import sys
from collections import Counter
from typing import Callable, Iterator

from torch.utils.data import Dataset

from .decode import CAPTION_EXT, DEFAULT_MAX_PIXELS, IMAGE_EXTS, decode_sample
from .shards import caption_exts, split_member_name
from .stream import RawSample, SampleStream


class _RawList(Dataset):
    """Common part: self.items[i] = (key, image path or None, caption source); subclasses define raw(i)."""

    items: list

    def __init__(self, transform: Callable | None = None, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.transform, self.max_pixels = transform, max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def raw(self, i: int) -> RawSample:
        raise NotImplementedError

    def captions(self, i: int) -> list[bytes]:
        return self.raw(i)[2]

    def __getitem__(self, i: int):
        """(image tensor or PIL image, first caption, key); raises BadSample for a bad row."""
        key, image, blobs = self.raw(i)
        img, caption = decode_sample(image, blobs, None, max_pixels=self.max_pixels)
        return (self.transform(img) if self.transform else img), caption, key


class CsvDataset(_RawList):
    """Rows of a TSV/CSV file. img_key / caption_key name the columns; sep is the field separator."""

    def __init__(self, path: str, transform: Callable | None = None, img_key: str = "filepath",
                 caption_key: str = "title", sep: str = "\t", max_pixels: int = DEFAULT_MAX_PIXELS):
        super().__init__(transform, max_pixels)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such list file: {path}")
        sep = sep.encode().decode("unicode_escape")  # let "\\t" typed on a command line mean a tab
        folder = os.path.dirname(os.path.abspath(path))
        csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))  # long caption fields must not abort the read
        with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
            reader = csv.DictReader(f, delimiter=sep)
            columns = reader.fieldnames or []
            for name, flag in ((img_key, "--csv-img-key"), (caption_key, "--csv-caption-key")):
                if name not in columns:
                    raise ValueError(f"{path} has no column {name!r} (columns: {columns}; set {flag} / "
                                     f"--csv-separator)")
            self.items = []
            for row_no, row in enumerate(reader):
                p = row.get(img_key) or ""
                p = os.path.join(folder, os.path.expanduser(p)) if p and not os.path.isabs(p) else p
                self.items.append((str(row_no), p or None, row.get(caption_key) or ""))
        self.path = path

    def raw(self, i: int) -> RawSample:
        key, image, caption = self.items[i]
        # back to bytes so CSV captions go through the same checks as tar members (surrogates = bad UTF-8)
        return key, image, [caption.encode("utf-8", errors="surrogateescape")]


class FolderDataset(_RawList):
    """img2dataset's `files` output (or any tree of KEY.jpg + KEY.txt files), sorted by path."""

    def __init__(self, root: str, transform: Callable | None = None, max_pixels: int = DEFAULT_MAX_PIXELS):
        super().__init__(transform, max_pixels)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"no such folder: {root}")
        groups: dict[str, dict[str, str]] = {}
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            for name in sorted(files):
                key, ext = split_member_name(name)
                if ext in IMAGE_EXTS or ext.endswith(CAPTION_EXT):
                    rel = os.path.relpath(os.path.join(folder, key), root)
                    groups.setdefault(rel, {})[ext] = os.path.join(folder, name)
        self.items = []
        for key in sorted(groups):
            g = groups[key]
            image = next((g[e] for e in IMAGE_EXTS if e in g), None)
            self.items.append((key, image, [g[e] for e in caption_exts(g)]))
        self.root = root

    def raw(self, i: int) -> RawSample:
        key, image, caption_paths = self.items[i]
        blobs = []
        for p in caption_paths:
            with open(p, "rb") as f:
                blobs.append(f.read())
        return key, image, blobs


class IndexStream(SampleStream):
    """A map-style _RawList read as a stream: per epoch a seeded permutation of all indices (file order if
    shuffle=False), dealt to ranks/workers in chunks so each worker reads neighbouring files."""

    CHUNK = 64  # indices per unit: large enough to keep the unit list small, small enough to balance workers

    def __init__(self, dataset: _RawList, transform, **kwargs):
        super().__init__(transform, **kwargs)
        self.dataset = dataset

    def units(self) -> list[range]:
        n = len(self.dataset)
        return [range(i, min(i + self.CHUNK, n)) for i in range(0, n, self.CHUNK)]

    def epoch_length(self) -> int:
        return len(self.dataset)

    def raw_samples(self, units: list[range], rng: random.Random, counts: Counter) -> Iterator[RawSample]:
        order = [i for u in units for i in u]
        if self.shuffle:
            rng.shuffle(order)
        for i in order:
            try:
                yield self.dataset.raw(i)
            except OSError:  # a caption file that vanished: the image path check happens at decode
                counts["no_caption"] += 1
