"""The built-in grounded scenes as img2dataset-style shards, ground truth included, and read back as Scenes.

    python -m minifilip.data.make_subset --src builtin --n 50000 --size 224 --out scenes224/ --workers 15

Why: the real-data path (tar shards -> stream -> DataLoader workers -> device) can then be exercised end to end
offline, at any image size, on data whose answers are known, and the pointing game can be scored on shards.

Per sample (KEY = img2dataset's 9-digit key):
    KEY.jpg       the scene, JPEG (quality 90 by default)
    KEY.txt       caption 0; KEY.1.txt, KEY.2.txt the other phrasings (the training stream draws one per visit)
    KEY.seg.png   the object masks as one 8-bit label image: 0 = background, k + 1 = object k (objects never
                  overlap, so one label per pixel holds every mask exactly; PNG is lossless)
    KEY.json      {"key", "source_key": "builtin/<split>/<index>", "width", "height", "seed", "split", "index",
                   "objects": [...], "captions": [...], "words": [[...]] per caption,
                   "groundings": [[[token_index, object_index, kind, word], ...]] per caption}

A reader only needs the standard members (KEY.jpg, KEY.txt) to train; KEY.seg.png and the extra JSON fields are
what `read_scenes` turns back into `Scene`s for the pointing game (evaluate --data, train --eval-every).
"""
from __future__ import annotations

import io
import json
import sys
from collections import Counter
from typing import Iterator

import numpy as np
from PIL import Image

from .grounded import Grounding, Scene, render_scene
from .shards import iter_tar_groups
from .transforms import images_to_tensor

SEG_EXT = "seg.png"  # member extension of the label image (not an image the loader would train on: not in IMAGE_EXTS)


# ------------------------------------------------------------------------------------------ writing

def encode_labels(masks: np.ndarray) -> bytes:
    """(K, S, S) bool non-overlapping masks -> PNG bytes of an (S, S) uint8 label image (0 = none, k + 1 = mask k)."""
    if len(masks) > 254:
        raise ValueError("at most 254 objects fit an 8-bit label image")
    labels = np.zeros(masks.shape[1:], np.uint8)
    for k, m in enumerate(masks):
        labels[m] = k + 1
    buf = io.BytesIO()
    Image.fromarray(labels, mode="L").save(buf, "PNG", optimize=False)
    return buf.getvalue()


def decode_labels(data: bytes, n_objects: int, image_size: int | None = None) -> np.ndarray:
    """Inverse of encode_labels: (n_objects, S, S) bool; resized (nearest: labels stay labels) to image_size."""
    labels = Image.open(io.BytesIO(data)).convert("L")
    if image_size and labels.size != (image_size, image_size):
        labels = labels.resize((image_size, image_size), Image.NEAREST)
    return np.asarray(labels)[None] == np.arange(1, n_objects + 1, dtype=np.uint8)[:, None, None]  # (K, S, S)


def scene_sample(seed: int, split: str, index: int, image_size: int, quality: int = 90) -> dict:
    """Scene `index` of `split`, encoded: {"image": jpg bytes, "captions", "meta", "seg": png bytes}.
    A pure function of its arguments (writer processes may render scenes in any order)."""
    sc = render_scene(seed, split, index, image_size)
    buf = io.BytesIO()
    Image.fromarray(sc.image).save(buf, "JPEG", quality=quality)
    meta = {"source_key": f"builtin/{split}/{index:06d}", "width": image_size, "height": image_size, "seed": seed,
            "split": split, "index": index, "objects": sc.objects, "captions": sc.captions, "words": sc.words,
            "groundings": [[[g.token_index, g.object_index, g.kind, g.word] for g in gs] for gs in sc.groundings]}
    return {"image": buf.getvalue(), "captions": sc.captions, "meta": meta, "seg": encode_labels(sc.masks)}


def _render(job: tuple) -> dict:
    return scene_sample(*job)


def iter_scene_samples(n: int, image_size: int, seed: int = 0, split: str = "train", quality: int = 90,
                       workers: int = 1) -> Iterator[dict]:
    """scene_sample for indices 0..n-1, in index order; workers > 1 renders in that many processes (the order,
    and so every byte of the output, stays the same)."""
    jobs = ((seed, split, i, image_size, quality) for i in range(n))
    if workers <= 1:
        yield from map(_render, jobs)
        return
    import multiprocessing as mp
    with mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn").Pool(workers) as pool:
        yield from pool.imap(_render, jobs, chunksize=32)


# ------------------------------------------------------------------------------------------ reading

def is_grounded(meta: dict) -> bool:
    return isinstance(meta, dict) and "groundings" in meta and "objects" in meta


def sample_to_scene(members: dict, image_size: int | None = None) -> Scene:
    """{ext: bytes} of one grounded sample -> Scene, resized to image_size (bicubic image, nearest masks) if given
    and different. Raises ValueError if the sample carries no ground truth."""
    meta = json.loads(members.get("json", b"{}") or b"{}")
    if not is_grounded(meta) or SEG_EXT not in members:
        raise ValueError(f"sample {meta.get('key', '?')} carries no groundings (KEY.json groundings + KEY.{SEG_EXT})")
    objects = [dict(o, center=tuple(o["center"])) for o in meta["objects"]]
    img = Image.open(io.BytesIO(members["jpg"])).convert("RGB")
    side = img.size[0]
    if image_size and image_size != side:  # square scenes: a resize is what eval_transform would do
        img = img.resize((image_size, image_size), Image.BICUBIC)
        f = image_size / side
        objects = [dict(o, center=(o["center"][0] * f, o["center"][1] * f), radius=o["radius"] * f) for o in objects]
    masks = decode_labels(members[SEG_EXT], len(objects), image_size)
    groundings = [[Grounding(int(t), int(o), str(k), str(w)) for t, o, k, w in gs] for gs in meta["groundings"]]
    return Scene(image=np.asarray(img, dtype=np.uint8), objects=objects, masks=masks, captions=list(meta["captions"]),
                 words=[list(w) for w in meta.get("words", [])], groundings=groundings)


def read_scenes(spec: str, n: int, image_size: int | None = None) -> tuple[list[str], list[Scene], int]:
    """The first n grounded samples of a shard spec, file order: (keys, scenes, skipped). Samples without ground
    truth (or unreadable) are skipped and counted. ValueError when none carries groundings."""
    from .sources import shard_files
    keys, scenes, skipped = [], [], 0
    for url in shard_files(spec):
        for key, members in iter_tar_groups(url, Counter()):
            if len(scenes) == n:
                return keys, scenes, skipped
            try:
                scenes.append(sample_to_scene(members, image_size))
                keys.append(key)
            except (ValueError, KeyError, OSError):
                skipped += 1
    if not scenes:
        raise ValueError(f"{spec!r} holds no samples with groundings (write them with make_subset --src builtin)")
    return keys, scenes, skipped


def scene_pairs(spec: str, n: int, image_size: int):
    """(images (n, 3, S, S), first captions, scenes) of the first n grounded samples of shards, as
    `builtin_val_pairs` gives them for the rendered val split; samples without groundings are counted, not lost."""
    _keys, scenes, skipped = read_scenes(spec, n, image_size)
    if skipped:
        print(f"{spec}: skipped {skipped} samples without groundings", file=sys.stderr)
    return images_to_tensor([sc.image for sc in scenes]), [sc.captions[0] for sc in scenes], scenes


def has_groundings(spec: str) -> bool:
    """Whether the first sample of a source carries ground truth (tar shards only; never raises)."""
    from .sources import shard_files, source_kind
    try:
        if source_kind(spec) != "shards":
            return False
        for key, members in iter_tar_groups(shard_files(spec)[0], Counter()):
            return SEG_EXT in members and is_grounded(json.loads(members.get("json", b"{}") or b"{}"))
    except (OSError, ValueError):
        return False
    return False


def write_builtin(out: str, n: int, image_size: int, seed: int = 0, split: str = "train", quality: int = 90,
                  samples_per_shard: int = 10_000, workers: int = 1, progress: bool = True) -> dict:
    """Write n built-in scenes into `out` (already checked and emptied by the caller); returns the summary."""
    from tqdm import tqdm

    from .writer import ShardWriter
    bar = tqdm(total=n, desc=f"builtin {split} scenes", unit="img", disable=not progress or None)
    with ShardWriter(out, samples_per_shard) as writer:
        for s in iter_scene_samples(n, image_size, seed, split, quality, workers):
            writer.write(s["image"], s["captions"][0], extra_captions=s["captions"][1:], meta=s["meta"],
                         extra_members={SEG_EXT: s["seg"]})
            bar.update(1)
    bar.close()
    return {"src": "builtin", "split": split, "n_requested": n, "n_written": writer.total, "seed": seed,
            "size": image_size, "quality": quality, "shards": len(writer.paths), "bad": {}, "converted": {},
            "groundings": True}


__all__ = ["SEG_EXT", "encode_labels", "decode_labels", "scene_sample", "iter_scene_samples", "sample_to_scene",
           "read_scenes", "has_groundings", "write_builtin"]
