"""Cut a reproducible random subset of an image-text source into new shards, optionally pre-resized.

    python -m minifilip.data.make_subset --src 'cc3m/{00000..00331}.tar' --n 100000 --size 128 --out cc3m_100k/
    python -m minifilip.data.make_subset --src builtin --n 50000 --size 224 --out scenes224/ --workers 15

The second form writes the built-in grounded scenes (rendered at --size px) with their ground truth (object masks,
word groundings, all captions), see grounded_shards.py: real-data training and the pointing game on shards.

Why: small-scale experiments (a 100k subset, 64-128 px models) spend most of their data time decoding 256-px
or full-size JPEGs only to shrink them again. Re-encoding each image once with its shorter side at --size makes
every later epoch decode ~4x fewer pixels, and a fixed subset file makes runs comparable.

How: the source's sample count comes from img2dataset's *_stats.json (or a cached scan, see shards.shard_sizes);
--n positions out of that total are drawn with a seeded RNG, and the shards are streamed once, in order,
keeping the chosen samples. A chosen sample that turns out bad (broken JPEG, empty caption, ...) is skipped
and reported, so the output may hold slightly fewer than --n. The output is img2dataset's layout:
00000.tar (KEY.jpg, KEY.txt[, KEY.1.txt ...], KEY.json with the source key) + 00000_stats.json.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import sys
from collections import Counter

from PIL import Image
from tqdm import tqdm

from ..cli import DefaultsHelpFormatter, one_line
from ..runs import check_output_folder
from .decode import BadSample, decode_captions, decode_image, split_counts
from .shards import group_to_raw, iter_tar_groups, shard_sizes
from .grounded import SPLITS
from .grounded_shards import write_builtin
from .sources import CsvOptions, is_builtin, list_dataset, shard_files, source_kind
from .writer import ShardWriter


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size` (never upscales), aspect ratio kept."""
    w, h = img.size
    if min(w, h) <= size:
        return img
    scale = size / min(w, h)
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)


def _ext_of(data: bytes) -> str:
    fmt = Image.open(io.BytesIO(data)).format or ""
    return {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}.get(fmt, "jpg")


def choose(total: int, n: int, seed: int) -> list[int]:
    """n distinct positions out of range(total), sorted, reproducible from the seed."""
    return sorted(random.Random(f"subset-{seed}").sample(range(total), min(n, total)))


def iter_chosen(spec: str, chosen: list[int], csv: CsvOptions | None, counts: Counter):
    """Raw samples (key, image bytes/path, caption blobs) at the chosen global positions, in source order."""
    kind = source_kind(spec)
    if kind != "shards":
        dataset = list_dataset(spec, kind, csv)
        for i in chosen:
            yield dataset.raw(i)
        return
    urls = shard_files(spec)
    sizes = shard_sizes(urls)
    wanted, start, j = set(chosen), 0, 0
    for url, size in zip(urls, sizes):
        end = start + size
        while j < len(chosen) and chosen[j] < start:
            j += 1
        if j == len(chosen) or chosen[j] >= end:  # nothing chosen in this shard: do not even open it
            start = end
            continue
        pos = start
        for key, members in iter_tar_groups(url, counts):
            raw = group_to_raw(key, members)
            if raw[1] is None:  # image-less groups are not counted in the stats either
                continue
            if pos in wanted:
                yield raw
            pos += 1
        start = end


# what a subset folder holds (and what a reader globbing *.tar would mix in): shards, their stats, the summary
SUBSET_FILES = re.compile(r"^(.*\.tar|.*\.tar\.tmp|.*_stats\.json|subset\.json|minifilip_sizes\.json)$")


def prepare_out(out: str, overwrite: bool = False) -> None:
    """Refuse an --out folder that already holds shards (old and new ones would be read together), unless
    overwrite: then those files are removed first. Other files are left alone."""
    check_output_folder(out)
    found = sorted(f for f in os.listdir(out) if SUBSET_FILES.match(f)) if os.path.isdir(out) else []
    if found and not overwrite:
        raise ValueError(f"{out} already holds shards ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}): "
                         "choose a new folder, or give --overwrite to remove them first")
    for name in found:
        os.remove(os.path.join(out, name))


def write_summary(out: str, summary: dict) -> None:
    path = os.path.join(out, "subset.json")
    with open(path + ".tmp", "w") as f:  # temp + rename: a killed run leaves no half summary
        json.dump(summary, f, indent=2)
    os.replace(path + ".tmp", path)


def make_subset(src: str, out: str, n: int, size: int = 0, seed: int = 0, quality: int = 90,
                samples_per_shard: int = 10_000, csv: CsvOptions | None = None, progress: bool = True,
                overwrite: bool = False, split: str = "train", workers: int = 1) -> dict:
    """Write the subset; returns a summary dict (also saved as out/subset.json). An `out` that already holds
    shards is refused unless overwrite (see prepare_out). src "builtin": the first n scenes of `split` rendered
    at `size` px (default 64) with their ground truth, `workers` processes rendering (grounded_shards.py)."""
    check_output_folder(out)
    if is_builtin(src):
        if split not in SPLITS:
            raise ValueError(f"--split must be one of {list(SPLITS)}, got {split!r}")
        prepare_out(out, overwrite)
        summary = write_builtin(out, n, size or 64, seed, split, quality, samples_per_shard, workers, progress)
        write_summary(out, summary)
        return summary
    kind = source_kind(src)
    total = sum(shard_sizes(shard_files(src))) if kind == "shards" else len(list_dataset(src, kind, csv))
    if total == 0:
        raise ValueError(f"{src!r} holds no samples")
    chosen = choose(total, n, seed)
    prepare_out(out, overwrite)  # after the source checks: a typo in --src removes nothing
    counts: Counter = Counter()
    bar = tqdm(total=len(chosen), desc="subset", unit="img", disable=not progress or None)
    with ShardWriter(out, samples_per_shard) as writer:
        for key, image, blobs in iter_chosen(src, chosen, csv, counts):
            bar.update(1)
            try:
                if image is None:
                    raise BadSample("no_image")
                decode_captions(blobs)  # validate; the original bytes (all variants) are what we copy
                img = decode_image(image, counts=counts)
            except BadSample as e:
                counts[e.reason] += 1
                continue
            if size:  # shrink once here so that every training epoch decodes fewer pixels
                img = resize_shorter(img, size)
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=quality)
                data, ext = buf.getvalue(), "jpg"
            else:  # copy the original bytes untouched
                data = image if isinstance(image, bytes) else open(image, "rb").read()
                ext = _ext_of(data)
            writer.write(data, blobs[0], ext=ext, extra_captions=blobs[1:],
                         meta={"source_key": key, "width": img.size[0], "height": img.size[1]})
    bar.close()
    bad, converted = split_counts(counts)
    summary = {"src": src, "n_requested": n, "n_written": writer.total, "source_total": total, "seed": seed,
               "size": size, "shards": len(writer.paths), "bad": bad, "converted": converted}
    write_summary(out, summary)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m minifilip.data.make_subset",
                                description="Cut a seeded random subset of an image-text source (tar shards, "
                                            "TSV/CSV list or img2dataset folder) into new img2dataset-style shards.",
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--src", required=True, help="source spec, e.g. 'cc3m/{00000..00331}.tar' (see sources.py), or "
                   "'builtin': the built-in grounded scenes with their masks and word groundings")
    p.add_argument("--out", required=True, help="output folder for 00000.tar, 00000_stats.json, ...; a folder that "
                   "already holds shards is refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="remove the shards (*.tar, *_stats.json, subset.json) already in --out first")
    p.add_argument("--n", type=int, required=True, help="samples to draw")
    p.add_argument("--size", type=int, default=0,
                   help="re-encode as JPEG with the shorter side at most SIZE px (0 = copy the bytes as they are); "
                        "--src builtin: the side the scenes are rendered at (0 = 64)")
    p.add_argument("--seed", type=int, default=0, help="the same seed and source give the same subset")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality when re-encoding")
    p.add_argument("--samples-per-shard", type=int, default=10_000, help="samples per output shard")
    p.add_argument("--split", default="train", choices=sorted(SPLITS),
                   help="--src builtin: the scene split (train, or val for held-out evaluation shards)")
    p.add_argument("--workers", type=int, default=1,
                   help="--src builtin: processes rendering scenes (the output is the same for any number)")
    p.add_argument("--csv-img-key", default="filepath", help="image-path column of a TSV/CSV source")
    p.add_argument("--csv-caption-key", default="title", help="caption column of a TSV/CSV source")
    p.add_argument("--csv-separator", default="\t", help="field separator of a TSV/CSV source (default: a tab)")
    args = p.parse_args(argv)
    try:
        if args.n <= 0 or args.size < 0 or args.workers < 1:
            raise ValueError("--n and --workers must be positive and --size non-negative")
        summary = make_subset(args.src, args.out, args.n, args.size, args.seed, args.quality,
                              args.samples_per_shard, CsvOptions(args.csv_img_key, args.csv_caption_key,
                                                                 args.csv_separator), overwrite=args.overwrite,
                              split=args.split, workers=args.workers)
    except (ValueError, FileNotFoundError) as e:
        print(f"make_subset: error: {one_line(e)}", file=sys.stderr)
        return 2
    print(f"wrote {summary['n_written']} of {summary['n_requested']} requested samples "
          f"({summary['shards']} shards) to {args.out}; bad skipped: {summary['bad'] or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
