"""ShardWriter: write samples as webdataset tar shards in img2dataset's layout.

    out/00000.tar           000000000.jpg 000000000.txt 000000000.json 000000001.jpg ...
    out/00000_stats.json    {"count": n, "successes": n, "failed_to_download": 0, ...}

Used by `make_subset` and by the tests and benchmark to synthesise shards. Keys are img2dataset's: 9 digits,
shard * 10**4 + index within the shard (so keys stay unique with up to 10,000 samples per shard).
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import time


def add_member(tar: tarfile.TarFile, name: str, data: bytes, mtime: float | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(mtime if mtime is not None else time.time()), 0o644
    tar.addfile(info, io.BytesIO(data))


class ShardWriter:
    """writer.write(image_bytes, caption, ext="jpg", extra_captions=(), meta=None); shards roll over every
    `samples_per_shard`. Use as a context manager (close() writes the last shard's stats)."""

    def __init__(self, folder: str, samples_per_shard: int = 10_000, start_shard: int = 0):
        if not 0 < samples_per_shard <= 10_000:
            raise ValueError("samples_per_shard must be in 1..10000 (img2dataset keys hold 4 digits of index)")
        os.makedirs(folder, exist_ok=True)
        self.folder, self.per_shard = folder, samples_per_shard
        self.shard, self.index, self.tar, self.total, self.paths = start_shard - 1, 0, None, 0, []

    def _roll(self) -> None:
        self._close_shard()
        self.shard += 1
        self.index = 0
        path = os.path.join(self.folder, f"{self.shard:05d}.tar")
        self.tar = tarfile.open(path + ".tmp", "w")  # renamed on close: a killed run leaves no half shard
        self.paths.append(path)

    def _close_shard(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        path = self.paths[-1]
        os.replace(path + ".tmp", path)
        stats = {"count": self.index, "successes": self.index, "failed_to_download": 0, "failed_to_resize": 0}
        with open(os.path.join(self.folder, f"{self.shard:05d}_stats.json"), "w") as f:
            json.dump(stats, f)
        self.tar = None

    def write(self, image: bytes, caption: str | bytes, ext: str = "jpg", extra_captions=(),
              meta: dict | None = None, key: str | None = None, extra_members: dict | None = None) -> str:
        """Append one sample; returns its key. extra_members: {ext: bytes} written as KEY.ext (e.g. "seg.png")."""
        if self.tar is None or self.index >= self.per_shard:
            self._roll()
        key = key or f"{self.shard * 10_000 + self.index:09d}"
        add_member(self.tar, f"{key}.{ext}", image)
        add_member(self.tar, f"{key}.txt", caption if isinstance(caption, bytes) else caption.encode("utf-8"))
        for i, extra in enumerate(extra_captions, start=1):
            add_member(self.tar, f"{key}.{i}.txt", extra if isinstance(extra, bytes) else extra.encode("utf-8"))
        if meta is not None:
            add_member(self.tar, f"{key}.json", json.dumps({"key": key, **meta}).encode("utf-8"))
        for ext_, data in (extra_members or {}).items():
            add_member(self.tar, f"{key}.{ext_}", data)
        self.index += 1
        self.total += 1
        return key

    def close(self) -> None:
        self._close_shard()

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
