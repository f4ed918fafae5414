"""make_subset: a seeded subset that reads back with the right count, keys, captions and image sizes."""
import json
import os

import pytest
from PIL import Image

from minifilip.data.make_subset import choose, main, make_subset
from minifilip.data.shards import expand_urls, iter_tar_groups, shard_sizes
from minifilip.data.sources import eval_stream
from minifilip.data.writer import ShardWriter

from test_data_shards import build_dirty, image_bytes


def source(folder, n_shards=3, per_shard=10, side=80):
    with ShardWriter(str(folder), samples_per_shard=per_shard) as w:
        for i in range(n_shards * per_shard):
            w.write(image_bytes((side + 16, side), seed=i), f"caption {i}", extra_captions=[f"other {i}"])
    return os.path.join(str(folder), "{00000..%05d}.tar" % (n_shards - 1))


def read_back(out):
    samples = {}
    for url in expand_urls(os.path.join(out, "*.tar")):
        for key, m in iter_tar_groups(url, {}):
            samples[key] = m
    return samples


def test_subset_reads_back_with_count_keys_and_sizes(tmp_path):
    src = source(tmp_path / "src")
    out = str(tmp_path / "sub")
    summary = make_subset(src, out, n=12, size=40, seed=3, samples_per_shard=5, progress=False)
    assert summary["n_written"] == 12 and summary["shards"] == 3 and summary["source_total"] == 30
    assert shard_sizes(expand_urls(os.path.join(out, "*.tar"))) == [5, 5, 2]  # from the written _stats.json
    samples = read_back(out)
    assert sorted(samples) == [f"{s * 10000 + i:09d}" for s in range(3) for i in range(5)][:12]
    chosen = choose(30, 12, 3)
    src_keys = [json.loads(m["json"])["source_key"] for _k, m in sorted(samples.items())]
    assert src_keys == [f"{p // 10 * 10000 + p % 10:09d}" for p in chosen]
    for m in samples.values():
        img = Image.open(__import__("io").BytesIO(m["jpg"]))
        assert min(img.size) == 40 and img.size == (48, 40)  # shorter side 40, aspect kept (96x80 -> 48x40)
        i = int(m["txt"].decode().split()[-1])
        assert m["1.txt"].decode() == f"other {i}"  # extra captions travel along
    # the stream reads it: 12 samples, both captions reachable
    assert len([1 for _ in eval_stream(os.path.join(out, "{00000..00002}.tar"), 32)]) == 12


def test_subset_is_reproducible_and_seed_dependent(tmp_path):
    src = source(tmp_path / "src", n_shards=2)
    keys = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        make_subset(src, str(tmp_path / name), n=6, seed=seed, progress=False)
        keys.append([json.loads(m["json"])["source_key"] for _k, m in sorted(read_back(str(tmp_path / name)).items())])
    assert keys[0] == keys[1] and keys[0] != keys[2]


def test_subset_skips_bad_samples_and_copies_bytes_without_size(tmp_path):
    spec = build_dirty(tmp_path / "dirty")
    summary = make_subset(spec, str(tmp_path / "out"), n=100, progress=False)
    # every sample with an image: 7 + 8 + 3 = 18 positions; the broken ones are reported, not written
    assert summary["source_total"] == 18
    assert summary["bad"] == {"decode_error": 2, "no_caption": 1, "empty_caption": 1, "bad_utf8": 1, "truncated_tar": 1}
    assert summary["n_written"] == 13  # 2 + 8 + 3, the 120-px image included (only the loader has a pixel limit)
    exts = {e for m in read_back(str(tmp_path / "out")).values() for e in m}
    assert {"jpg", "png", "txt", "1.txt", "json"} <= exts


def test_cli_help_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--src" in out and "--size" in out and "--seed" in out
    assert main(["--src", str(tmp_path / "none-{0..3}.tar"), "--out", str(tmp_path / "o"), "--n", "5"]) == 2
    assert "make_subset: error:" in capsys.readouterr().err


def test_existing_out_is_refused_unless_overwrite(tmp_path, capsys):
    """A second subset into the same folder must not leave the first one's shards for a *.tar reader to mix in."""
    src = source(tmp_path / "src", n_shards=2)
    out = str(tmp_path / "sub")
    make_subset(src, out, n=12, samples_per_shard=4, progress=False)  # 3 shards
    before = sorted(os.listdir(out))
    argv = ["--src", src, "--out", out, "--n", "4", "--samples-per-shard", "4"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds shards" in err[0] and "--overwrite" in err[0]
    assert sorted(os.listdir(out)) == before
    (tmp_path / "sub" / "README").write_text("mine")
    assert main([*argv, "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["00000.tar", "00000_stats.json", "README", "subset.json"]
    assert len(read_back(out)) == 4 == json.loads((tmp_path / "sub" / "subset.json").read_text())["n_written"]


def test_out_that_is_a_file_is_one_line(tmp_path, capsys):
    src = source(tmp_path / "src", n_shards=1)
    (tmp_path / "f").write_text("x")
    assert main(["--src", src, "--out", str(tmp_path / "f"), "--n", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file, not a folder" in err[0]
