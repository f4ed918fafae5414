"""TSV/CSV lists and img2dataset folders, source dispatch, captions-only vocabulary pass, eval pairs."""
import os

import pytest
from torch.utils.data import DataLoader

from minifilip.data.decode import BadSample
from minifilip.data.lists import CsvDataset, FolderDataset
from minifilip.data.sources import (CsvOptions, check_source, eval_stream, iter_captions, load_pairs, source_kind,
                                    train_stream)
from minifilip.data.stream import worker_init_fn
from minifilip.tokenizer import WordTokenizer

from test_data_shards import SIZE, build_dirty, clean_shards, image_bytes


def build_tsv(folder, sep="\t", img_col="filepath", cap_col="title"):
    os.makedirs(folder / "images", exist_ok=True)
    rows = [f"{img_col}{sep}{cap_col}"]
    for i in range(6):
        (folder / "images" / f"{i}.jpg").write_bytes(image_bytes(40, seed=i))
        rows.append(f"images/{i}.jpg{sep}photo number {i}")
    rows.append(f"images/missing.jpg{sep}a file that is not there")   # no_image
    rows.append(f"images/0.jpg{sep}   ")                                # empty_caption
    (folder / "list.tsv").write_text("\n".join(rows) + "\n")
    return str(folder / "list.tsv")


def build_folder(root):
    """img2dataset --output_format files: 00000/KEY.jpg + KEY.txt (+ KEY.1.txt), 00001/..."""
    for shard in range(2):
        d = root / f"{shard:05d}"
        os.makedirs(d, exist_ok=True)
        for i in range(3):
            key = f"{shard * 10000 + i:09d}"
            (d / f"{key}.jpg").write_bytes(image_bytes(40, seed=i))
            (d / f"{key}.txt").write_text(f"folder caption {shard} {i}")
            (d / f"{key}.json").write_text("{}")
    (root / "00000" / "000000000.1.txt").write_text("another caption")
    (root / "00001" / "000010009.jpg").write_bytes(image_bytes(40))  # no caption
    return str(root)


def test_tsv_list_resolves_relative_paths_and_skips_bad_rows(tmp_path):
    spec = build_tsv(tmp_path)
    assert source_kind(spec) == "csv"
    stream = eval_stream(spec, SIZE)
    got = [(k, c) for _x, c, k, _d in stream]
    assert got == [(str(i), f"photo number {i}") for i in range(6)]
    assert dict(stream.counts) == {"no_image": 1, "empty_caption": 1}
    ds = CsvDataset(spec)
    assert len(ds) == 8 and ds[2][1] == "photo number 2"
    with pytest.raises(BadSample, match="no_image"):
        ds[6]


def test_csv_with_other_columns_and_separator(tmp_path):
    spec = build_tsv(tmp_path, sep=",", img_col="image", cap_col="caption")
    os.rename(spec, tmp_path / "list.csv")
    opts = CsvOptions(img_key="image", caption_key="caption", sep=",")
    assert len([1 for _ in eval_stream(str(tmp_path / "list.csv"), SIZE, csv=opts)]) == 6
    with pytest.raises(ValueError, match="no column 'filepath'"):
        eval_stream(str(tmp_path / "list.csv"), SIZE, csv=CsvOptions(sep=","))


def test_folder_source_img2dataset_files_layout(tmp_path):
    spec = build_folder(tmp_path / "files")
    assert source_kind(spec) == "folder"
    stream = eval_stream(spec, SIZE)
    keys = [k for _x, _c, k, _d in stream]
    assert keys == [os.path.join(f"{s:05d}", f"{s * 10000 + i:09d}") for s in range(2) for i in range(3)]
    assert dict(stream.counts) == {"no_caption": 1}
    assert len(FolderDataset(spec)) == 7
    seen = {c for _x, c, k, _d in train_stream(spec, SIZE, epochs=25, autoaugment=False) if k.endswith("000000000")}
    assert seen == {"folder caption 0 0", "another caption"}


def test_list_stream_splits_across_workers(tmp_path):
    spec = build_folder(tmp_path / "files")
    stream = train_stream(spec, SIZE, epochs=1, autoaugment=False)
    stream.CHUNK = 2  # several units, so both workers get some
    keys = [k for _x, _c, k, _d in DataLoader(stream, batch_size=None, num_workers=2, worker_init_fn=worker_init_fn)]
    assert sorted(keys) == sorted(k for _x, _c, k, _d in eval_stream(spec, SIZE))


def test_captions_only_pass_feeds_the_tokenizer(tmp_path):
    spec = build_dirty(tmp_path / "shards")
    caps = list(iter_captions(spec))
    assert "a good jpeg" in caps and "second caption" in caps and "a caption without image" in caps
    assert not any(c.strip() == "" for c in caps)
    assert len(list(iter_captions(spec, limit=2))) == 2
    tok = WordTokenizer.fit(iter_captions(spec), max_size=10)
    assert len(tok) == 10 and "caption" in tok.stoi
    assert "photo" in WordTokenizer.fit(iter_captions(build_tsv(tmp_path))).stoi
    assert "folder" in WordTokenizer.fit(iter_captions(build_folder(tmp_path / "files"))).stoi


def test_load_pairs_takes_the_first_good_samples(tmp_path):
    spec = clean_shards(tmp_path, n_shards=2, per_shard=4)
    images, captions, keys, counts = load_pairs(spec, 5, SIZE)
    assert images.shape == (5, 3, SIZE, SIZE) and captions == [f"caption {i}" for i in range(5)]
    assert keys[4] == "000010000" and counts == {}
    assert len(load_pairs(spec, 100, SIZE)[1]) == 8  # fewer available: all of them


def test_source_dispatch_and_missing_paths(tmp_path):
    spec = clean_shards(tmp_path / "s", n_shards=2, per_shard=2)
    assert source_kind(str(tmp_path / "s")) == "shards"  # a folder of .tar files
    assert len([1 for _ in eval_stream(str(tmp_path / "s"), SIZE)]) == 4
    assert source_kind(spec) == "shards"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        source_kind(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError):
        eval_stream(str(tmp_path / "nope.tsv"), SIZE)
    check_source(train_stream(spec, SIZE), spec)  # fine: no exception
