"""webdataset-style tar shards, read with nothing but the standard library's `tarfile`.

A shard is a plain tar whose members are grouped into samples by key, the member name up to the first dot of
its file name:

    000010000.jpg  000010000.txt  000010000.json  000010001.jpg  000010001.txt ...   (img2dataset)
    0a1b2c.jpg     0a1b2c.txt                                                       (cc3m-wds mirrors)
    KEY.txt + KEY.1.txt + KEY.2.txt                                                 (several captions)

Members of one sample are consecutive, so a shard is read front to back in streaming mode (`r|*`): no seeking,
no index, gzip'ed shards work too, and a shard cut off by an interrupted download yields everything before the
cut (then counts one `truncated_tar`).

Shard lists use webdataset / open_clip syntax: brace ranges `cc3m/{00000..00331}.tar` (zero padding kept),
brace alternatives `{a,b}`, shell globs `cc3m/*.tar`, and several lists joined with `::`.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import re
import tarfile
from collections import Counter
from typing import Iterator

from .decode import CAPTION_EXT, IMAGE_EXTS
from .stream import RawSample, SampleStream

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """'a{00..02}b{x,y}' -> a00bx a00by a01bx ... ; ranges keep the zero padding of their first number."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[:m.start()], pattern[m.end():]
    r = _RANGE.match(body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        width = len(r.group(1)) if r.group(1).startswith("0") else 0
        step = 1 if hi >= lo else -1
        options = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    else:
        options = body.split(",")
    return [x for opt in options for x in expand_braces(head + opt + tail)]


def expand_urls(spec: str) -> list[str]:
    """Shard spec -> existing files, in order, without duplicates. Raises FileNotFoundError if a part matches
    nothing (a typo in a shard list should stop a run, not train on a tenth of the data)."""
    if not spec or not spec.strip():
        raise ValueError("empty shard list")
    files, missing = [], []
    for part in spec.split("::"):
        part = os.path.expanduser(part.strip())
        found = []
        for pattern in expand_braces(part):
            if glob.has_magic(pattern):
                found += sorted(glob.glob(pattern))
            elif os.path.isfile(pattern):
                found.append(pattern)
            else:
                missing.append(pattern)
        if not found:
            raise FileNotFoundError(f"shard list {part!r} matches no file")
        files += found
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FileNotFoundError(f"{len(missing)} shard(s) of {spec!r} do not exist: {shown}")
    return list(dict.fromkeys(files))


def split_member_name(name: str) -> tuple[str, str]:
    """'dir/000010000.1.txt' -> ('dir/000010000', '1.txt'): key up to the first dot of the file name."""
    folder, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(folder, stem) if folder else stem, ext.lower()


def caption_exts(exts) -> list[str]:
    """'txt' first, then '1.txt', '2.txt', ... (the extra captions of a sample)."""
    extra = sorted((e for e in exts if e.endswith("." + CAPTION_EXT) and e.split(".")[0].isdigit()),
                   key=lambda e: int(e.split(".")[0]))
    return ([CAPTION_EXT] if CAPTION_EXT in exts else []) + extra


def group_to_raw(key: str, members: dict) -> RawSample:
    """{ext: bytes} of one key -> (key, image bytes or None, caption blobs)."""
    image = next((members[e] for e in IMAGE_EXTS if e in members), None)
    return key, image, [members[e] for e in caption_exts(members)]


def iter_tar_groups(path: str, counts: Counter, captions_only: bool = False) -> Iterator[tuple[str, dict]]:
    """(key, {ext: bytes}) for each sample of one shard, streaming. A shard that cannot be opened or is cut
    off counts one 'unreadable_shard' / 'truncated_tar' and ends; the sample being read when it broke is lost.
    captions_only: skip reading image members (for vocabulary fitting; tarfile still streams past them)."""
    key, members, started = None, {}, False
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            started = True
            for info in tar:
                if not info.isfile():
                    continue
                k, ext = split_member_name(info.name)
                if k != key:
                    if key is not None:
                        yield key, members
                    key, members = k, {}
                if captions_only and not ext.endswith(CAPTION_EXT):
                    members[ext] = b""  # remember it exists without reading it
                    continue
                members[ext] = tar.extractfile(info).read()
    except (tarfile.ReadError, EOFError, OSError) as e:
        # ReadError("unexpected end of data") is the download cut mid-member; a missing file is an OSError
        # (or an unreadable shard: missing, not a tar at all); either way: count it, keep the run going
        counts["truncated_tar" if started else "unreadable_shard"] += 1
        return
    if key is not None:
        yield key, members


# ------------------------------------------------------------------------------------------ epoch length

def _stats_size(path: str) -> int | None:
    """Samples in a shard from img2dataset's `NNNNN_stats.json` ('successes', else 'count') or a webdataset
    `sizes.json` ({shard file name: count}) in the same folder."""
    folder, base = os.path.split(path)
    stem = base.split(".")[0]
    stats = os.path.join(folder, stem + "_stats.json")
    if os.path.isfile(stats):
        with open(stats) as f:
            s = json.load(f)
        for field in ("successes", "count"):
            if isinstance(s.get(field), int):
                return s[field]
    sizes = os.path.join(folder, "sizes.json")
    if os.path.isfile(sizes):
        with open(sizes) as f:
            s = json.load(f)
        if isinstance(s.get(base), int):
            return s[base]
    return None


def _scan_size(path: str) -> int:
    """Count samples that have an image by streaming the shard once (no decode)."""
    return sum(1 for _k, m in iter_tar_groups(path, Counter(), captions_only=True) if any(e in m for e in IMAGE_EXTS))


def shard_sizes(urls: list[str], cache_dir: str | None = None) -> list[int]:
    """Samples per shard: from the stats files if present, else scanned once and cached in
    `minifilip_sizes.json` next to the shards (or in cache_dir, default ~/.cache/minifilip, if that folder is
    read-only). A cache entry is keyed by file name, size and mtime, so a re-downloaded shard is re-scanned."""
    sizes, to_scan = [], []
    for u in urls:
        n = _stats_size(u)
        sizes.append(n)
        if n is None:
            to_scan.append(u)
    if not to_scan:
        return sizes
    caches: dict[str, dict] = {}

    def cache_file(u: str) -> str:
        folder = os.path.dirname(os.path.abspath(u))
        local = os.path.join(folder, "minifilip_sizes.json")
        if os.access(folder, os.W_OK):
            return local
        root = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "minifilip")
        return os.path.join(root, "sizes-" + hashlib.sha1(folder.encode()).hexdigest()[:16] + ".json")

    def stamp(u: str) -> list:
        st = os.stat(u)
        return [st.st_size, int(st.st_mtime)]

    from tqdm import tqdm  # a first scan of a large download takes minutes: show it
    bar = tqdm(total=len(to_scan), desc="counting samples (once, then cached)", unit="shard", disable=None,
               leave=False)
    for i, u in enumerate(urls):
        if sizes[i] is not None:
            continue
        bar.update(1)
        cf = cache_file(u)
        if cf not in caches:
            try:
                with open(cf) as f:
                    caches[cf] = json.load(f)
            except (OSError, ValueError):
                caches[cf] = {}
        entry = caches[cf].get(os.path.basename(u))
        if entry and entry[:2] == stamp(u):
            sizes[i] = entry[2]
        else:
            sizes[i] = _scan_size(u)
            caches[cf][os.path.basename(u)] = stamp(u) + [sizes[i]]
    bar.close()
    for cf, data in caches.items():
        try:
            os.makedirs(os.path.dirname(cf), exist_ok=True)
            with open(cf + ".tmp", "w") as f:
                json.dump(data, f)
            os.replace(cf + ".tmp", cf)
        except OSError:
            pass  # a cache we cannot write only costs a re-scan next time
    return sizes


# ------------------------------------------------------------------------------------------ the stream

class ShardStream(SampleStream):
    """Samples of a list of tar shards (see SampleStream for splitting, epochs and bad-sample counting).

    shuffle_buffer: samples a worker keeps in memory (as encoded bytes, ~30 KB each) to shuffle across the
    boundaries of its shards; shards themselves are shuffled per epoch. 0 or shuffle=False: file order.
    """

    def __init__(self, urls: str | list[str], transform, *, shuffle_buffer: int = 1000, **kwargs):
        super().__init__(transform, **kwargs)
        self.urls = expand_urls(urls) if isinstance(urls, str) else list(urls)
        self.shuffle_buffer = shuffle_buffer
        self._length: int | None = None

    def units(self) -> list[str]:
        return self.urls

    def epoch_length(self) -> int:
        if self._length is None:
            self._length = sum(shard_sizes(self.urls))
        return self._length

    def raw_samples(self, units: list[str], rng: random.Random, counts: Counter) -> Iterator[RawSample]:
        groups = (group_to_raw(k, m) for url in units for k, m in iter_tar_groups(url, counts))
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from groups
            return
        buffer: list = []
        for sample in groups:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            i = rng.randrange(len(buffer))  # emit a random buffered sample, its slot takes the new one
            buffer[i], sample = sample, buffer[i]
            yield sample
        rng.shuffle(buffer)
        yield from buffer
