"""Tar shards: grouping by key, every class of bad sample skipped and counted, worker / rank splitting,
shard-list expansion, epoch length. All shards are built here with real JPEG/PNG bytes of small images."""
import io
import json
import os
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from minifilip.data.decode import split_counts
from minifilip.data.shards import ShardStream, expand_braces, expand_urls, shard_sizes
from minifilip.data.sources import check_source, eval_stream, make_loader, train_stream
from minifilip.data.stream import collate, worker_init_fn
from minifilip.data.transforms import eval_transform
from minifilip.data.writer import ShardWriter, add_member

SIZE = 32  # crop size used in these tests; images are 40-64 px


def image_bytes(size=48, mode="RGB", fmt="JPEG", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    w, h = (size, size) if isinstance(size, int) else size
    if mode == "I;16":
        img = Image.fromarray((rng.integers(0, 65535, (h, w))).astype(np.uint16))
    else:
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            add_member(tar, name, data)


# expected outcome of the dirty set: good keys and counts per reason
DIRTY_GOOD = {"000000000", "000000001", "000010000", "000010001", "000010002", "000010003", "000010004",
              "000010005", "000010007", "a-0", "a-1", "a-2"}
DIRTY_COUNTS = {"decode_error": 2, "no_caption": 1, "no_image": 1, "empty_caption": 1, "bad_utf8": 1,
                "too_large": 1, "truncated_tar": 1, "mode_CMYK": 1, "mode_L": 1, "mode_RGBA": 1, "mode_P": 1,
                "mode_I;16": 1, "upscaled": 1}
MAX_PIXELS = 100 * 100


def build_dirty(folder) -> str:
    """Three shards holding every class of bad sample; returns the brace spec of the three."""
    os.makedirs(folder, exist_ok=True)
    jpg = image_bytes(48)
    write_tar(os.path.join(folder, "00000.tar"), [
        ("000000000.jpg", jpg), ("000000000.txt", b"a good jpeg"), ("000000000.json", b"{}"),
        ("000000001.png", image_bytes(48, fmt="PNG")), ("000000001.txt", b"a good png"),
        ("000000002.jpg", b"\xff\xd8 this is not a jpeg at all"), ("000000002.txt", b"corrupt"),
        ("000000003.jpg", jpg[: len(jpg) // 2]), ("000000003.txt", b"truncated jpeg"),
        ("000000004.jpg", jpg), ("000000004.json", b"{}"),                        # no caption
        ("000000005.txt", b"a caption without image"), ("000000005.json", b"{}"),  # no image
        ("000000006.jpg", jpg), ("000000006.txt", b"  \n\t "),                     # empty caption
        ("000000007.jpg", jpg), ("000000007.txt", b"caf\xe9 \xff\xfe"),            # not UTF-8
    ])
    write_tar(os.path.join(folder, "00001.tar"), [
        ("000010000.jpg", image_bytes(48, "CMYK")), ("000010000.txt", b"cmyk"),
        ("000010001.jpg", image_bytes(48, "L")), ("000010001.txt", b"gray"),
        ("000010002.png", image_bytes(48, "RGBA", "PNG")), ("000010002.txt", b"rgba"),
        ("000010003.png", image_bytes(48, "P", "PNG")), ("000010003.txt", b"palette"),
        ("000010004.png", image_bytes(48, "I;16", "PNG")), ("000010004.txt", b"sixteen bit"),
        ("000010005.jpg", image_bytes(16)), ("000010005.txt", b"tiny"),           # smaller than the crop
        ("000010006.png", image_bytes(120, fmt="PNG")), ("000010006.txt", b"huge"),  # over MAX_PIXELS
        ("000010007.jpg", jpg), ("000010007.txt", b"first caption"), ("000010007.1.txt", b"second caption"),
    ])
    # cut off mid-member: three whole samples, then half of the fourth image
    path = os.path.join(folder, "00002.tar")
    write_tar(path, [m for i in range(4) for m in ((f"a-{i}.jpg", image_bytes(48, seed=i)), (f"a-{i}.txt", b"x"))])
    with tarfile.open(path) as tar:
        cut = tar.getmember("a-3.jpg").offset_data + 100
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:cut])
    return os.path.join(folder, "{00000..00002}.tar")


def read_all(stream):
    return [(key, caption, delta) for _x, caption, key, delta in stream]


def test_dirty_shards_good_samples_and_bad_counts(tmp_path):
    spec = build_dirty(tmp_path)
    stream = eval_stream(spec, SIZE, max_pixels=MAX_PIXELS)
    got = read_all(stream)
    assert {k for k, _, _ in got} == DIRTY_GOOD and len(got) == len(DIRTY_GOOD)
    assert dict(stream.counts) == DIRTY_COUNTS
    total = Counter()
    for _, _, d in got:
        total.update(d)
    assert dict(total) == DIRTY_COUNTS  # the per-sample deltas add up to the same: nothing lost at the end
    bad, converted = split_counts(DIRTY_COUNTS)
    assert sum(bad.values()) == 8 and sum(converted.values()) == 6


def test_samples_are_rgb_tensors_of_the_crop_size(tmp_path):
    spec = build_dirty(tmp_path)
    for x, _, _, _ in train_stream(spec, SIZE, epochs=1, max_pixels=MAX_PIXELS, shuffle_buffer=4):
        assert x.shape == (3, SIZE, SIZE) and x.dtype == torch.float32 and torch.isfinite(x).all()


def test_counts_aggregate_across_two_workers(tmp_path):
    spec = build_dirty(tmp_path)
    stream = eval_stream(spec, SIZE, max_pixels=MAX_PIXELS)
    loader = DataLoader(stream, batch_size=1, num_workers=2, collate_fn=collate, worker_init_fn=worker_init_fn)
    keys, total = [], Counter()
    for _images, _captions, batch_keys, counts in loader:
        keys += batch_keys
        total.update(counts)
    assert sorted(keys) == sorted(DIRTY_GOOD) and dict(total) == DIRTY_COUNTS


def clean_shards(folder, n_shards=4, per_shard=5):
    with ShardWriter(str(folder), samples_per_shard=per_shard) as w:
        for i in range(n_shards * per_shard):
            w.write(image_bytes(40, seed=i), f"caption {i}")
    return os.path.join(str(folder), "{00000..%05d}.tar" % (n_shards - 1))


def test_two_workers_see_every_sample_exactly_once_per_epoch(tmp_path):
    spec = clean_shards(tmp_path)
    stream = train_stream(spec, SIZE, epochs=2, shuffle_buffer=3, autoaugment=False)
    loader = DataLoader(stream, batch_size=None, num_workers=2, worker_init_fn=worker_init_fn)
    keys = [key for _x, _c, key, _d in loader]
    assert len(keys) == 40 and Counter(keys) == Counter({f"{s * 10000 + i:09d}": 2 for s in range(4) for i in range(5)})


def test_rank_split_is_disjoint_and_complete(tmp_path):
    spec = clean_shards(tmp_path)
    parts = [{k for _x, _c, k, _d in eval_stream(spec, SIZE, rank=r, world_size=2)} for r in range(2)]
    assert not parts[0] & parts[1] and len(parts[0] | parts[1]) == 20


def test_order_is_reproducible_from_seed_and_epoch(tmp_path):
    spec = clean_shards(tmp_path)

    def order(seed, start_epoch):
        s = train_stream(spec, SIZE, seed=seed, start_epoch=start_epoch, epochs=1, shuffle_buffer=4,
                         autoaugment=False)
        return [k for _x, _c, k, _d in s]

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)
    assert sorted(order(0, 1)) == sorted(order(0, 0))


def test_make_loader_batches_with_workers(tmp_path):
    spec = clean_shards(tmp_path)
    loader = make_loader(train_stream(spec, SIZE, autoaugment=False), batch_size=8, num_workers=2)
    it = iter(loader)
    for _ in range(4):  # 32 samples > one epoch of 20: the stream goes on into epoch 2
        images, captions, keys, counts = next(it)
        assert images.shape == (8, 3, SIZE, SIZE) and len(captions) == len(keys) == 8 and counts == {}


def test_multi_caption_sample_gives_both_captions(tmp_path):
    spec = build_dirty(tmp_path)
    stream = train_stream(os.path.join(tmp_path, "00001.tar"), SIZE, epochs=30, shuffle_buffer=0,
                          autoaugment=False, max_pixels=MAX_PIXELS)
    seen = Counter(c for _x, c, k, _d in stream if k == "000010007")
    assert set(seen) == {"first caption", "second caption"} and sum(seen.values()) == 30
    # evaluation always takes the first caption
    assert {c for _x, c, k, _d in eval_stream(os.path.join(tmp_path, "00001.tar"), SIZE)
            if k == "000010007"} == {"first caption"}


def test_json_list_caption_is_several_captions(tmp_path):
    write_tar(tmp_path / "x.tar", [("k.jpg", image_bytes(40)), ("k.txt", json.dumps(["one", "two"]).encode())])
    seen = {c for _x, c, _k, _d in train_stream(str(tmp_path / "x.tar"), SIZE, epochs=20, autoaugment=False)}
    assert seen == {"one", "two"}


def test_brace_glob_and_double_colon_expansion(tmp_path):
    assert expand_braces("a{08..11}b") == ["a08b", "a09b", "a10b", "a11b"]
    assert expand_braces("{0..2}") == ["0", "1", "2"]
    assert expand_braces("x{a,b}{1..2}") == ["xa1", "xa2", "xb1", "xb2"]
    for name in ("cc3m-train-0000.tar", "cc3m-train-0001.tar", "cc3m-validation-0000.tar", "00000.tar"):
        write_tar(tmp_path / name, [("k.jpg", image_bytes(40)), ("k.txt", b"c")])
    d = str(tmp_path)
    assert [os.path.basename(u) for u in expand_urls(f"{d}/cc3m-train-{{0000..0001}}.tar")] == \
        ["cc3m-train-0000.tar", "cc3m-train-0001.tar"]
    assert len(expand_urls(f"{d}/cc3m-*.tar")) == 3
    assert [os.path.basename(u) for u in expand_urls(f"{d}/00000.tar::{d}/cc3m-validation-*.tar")] == \
        ["00000.tar", "cc3m-validation-0000.tar"]
    with pytest.raises(FileNotFoundError, match="matches no file"):
        expand_urls(f"{d}/nothing-*.tar")
    with pytest.raises(FileNotFoundError, match="do not exist"):
        expand_urls(f"{d}/cc3m-train-{{0000..0003}}.tar")


def test_epoch_length_from_stats_or_a_cached_scan(tmp_path):
    spec = clean_shards(tmp_path / "stats", n_shards=2, per_shard=3)  # ShardWriter writes _stats.json
    assert shard_sizes(expand_urls(spec)) == [3, 3]
    assert ShardStream(spec, eval_transform(SIZE)).epoch_length() == 6
    build_dirty(tmp_path / "scan")
    urls = expand_urls(str(tmp_path / "scan" / "{00000..00002}.tar"))
    assert shard_sizes(urls) == [7, 8, 3]  # samples with an image (a cut-off one does not count)
    cache = json.loads((tmp_path / "scan" / "minifilip_sizes.json").read_text())
    assert cache["00001.tar"][2] == 8
    cache["00001.tar"][2] = 99  # the cache is used when size and mtime match
    (tmp_path / "scan" / "minifilip_sizes.json").write_text(json.dumps(cache))
    assert shard_sizes(urls) == [7, 99, 3]


def test_every_sample_bad_is_a_clear_error_not_a_hang(tmp_path):
    write_tar(tmp_path / "bad.tar", [(f"{i}.jpg", b"garbage") for i in range(5)] +
              [(f"{i}.txt", b"c") for i in range(5)])
    stream = train_stream(str(tmp_path / "bad.tar"), SIZE)  # epochs=None: would loop forever if not guarded
    with pytest.raises(ValueError, match="no usable image-text pair.*all samples are bad"):
        check_source(stream, "bad.tar")
    assert list(stream) == []  # the infinite stream ends instead of spinning
