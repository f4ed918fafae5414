"""make_subset --src builtin: grounded scenes as shards (round trip of images, captions, masks, groundings), the
pointing game read from such shards, and training on them."""
import json
import os

import numpy as np
import pytest
import torch

from minifilip.data.grounded import render_scene
from minifilip.data.grounded_shards import decode_labels, encode_labels, has_groundings, read_scenes
from minifilip.data.make_subset import main, make_subset
from minifilip.data.shards import expand_urls, iter_tar_groups
from minifilip.pointing import pointing_game
from minifilip.model import FILIP
from minifilip.config import FILIPConfig
from minifilip.tokenizer import WordTokenizer
from minifilip.data.grounded import vocabulary


def members(out):
    return {k: m for url in expand_urls(os.path.join(out, "*.tar")) for k, m in iter_tar_groups(url, {})}


def test_labels_round_trip_exactly():
    masks = render_scene(3, "val", 5, 48).masks
    assert (decode_labels(encode_labels(masks), len(masks)) == masks).all()


def test_builtin_shards_round_trip(tmp_path):
    out = str(tmp_path / "scenes")
    summary = make_subset("builtin", out, n=7, size=48, seed=2, split="val", samples_per_shard=3, progress=False)
    assert summary["n_written"] == 7 and summary["shards"] == 3 and summary["groundings"]
    keys, scenes, skipped = read_scenes(out, 100)
    assert len(scenes) == 7 and skipped == 0 and has_groundings(out)
    m = members(out)
    for i, (key, sc) in enumerate(zip(keys, scenes)):
        ref = render_scene(2, "val", i, 48)
        err = np.abs(sc.image.astype(float) - ref.image).mean() / 255  # JPEG q90: close, not equal
        assert err < 0.03, err
        assert (sc.masks == ref.masks).all() and sc.captions == ref.captions and sc.words == ref.words
        assert sc.groundings == ref.groundings and sc.objects == ref.objects
        assert [m[key].get(e, b"").decode() for e in ("txt", "1.txt", "2.txt")] == ref.captions  # the loader's view
        assert json.loads(m[key]["json"])["source_key"] == f"builtin/val/{i:06d}"
    # read at another size: masks resized with the image, groundings unchanged
    _k, small, _s = read_scenes(out, 2, image_size=24)
    assert small[0].image.shape == (24, 24, 3) and small[0].masks.shape[1:] == (24, 24)
    assert small[0].groundings == scenes[0].groundings


def test_writer_processes_give_the_same_samples(tmp_path):
    make_subset("builtin", str(tmp_path / "a"), n=5, size=32, progress=False)
    make_subset("builtin", str(tmp_path / "b"), n=5, size=32, progress=False, workers=2)
    assert members(str(tmp_path / "a")) == members(str(tmp_path / "b"))


def test_cli_builtin_and_overwrite_rule(tmp_path, capsys):
    out = str(tmp_path / "s")
    argv = ["--src", "builtin", "--n", "3", "--size", "32", "--out", out]
    assert main(argv) == 0 and "wrote 3 of 3" in capsys.readouterr().out
    assert main(argv) == 2 and "already holds shards" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "--split", "val"]) == 0
    assert json.loads((tmp_path / "s" / "subset.json").read_text())["split"] == "val"
    assert main([*argv, "--overwrite", "--workers", "0"]) == 2


def test_pointing_game_on_shards_matches_the_rendered_scenes(tmp_path):
    """Same model, same scenes: only the JPEG round trip differs, so the accuracies agree closely."""
    out = str(tmp_path / "scenes")
    make_subset("builtin", out, n=12, size=32, split="val", progress=False)
    _k, from_shards, _s = read_scenes(out, 12)
    rendered = [render_scene(0, "val", i, 32) for i in range(12)]
    torch.manual_seed(0)
    tok = WordTokenizer(vocabulary())
    model = FILIP(FILIPConfig.preset("tiny", image_size=32, vocab_size=len(tok)))
    a, b = pointing_game(model, tok, from_shards), pointing_game(model, tok, rendered)
    assert a["pointing_n"] == b["pointing_n"] and a["pointing_chance"] == pytest.approx(b["pointing_chance"])
    assert abs(a["pointing_acc"] - b["pointing_acc"]) <= 0.15


def test_shards_without_groundings_are_refused(tmp_path):
    from test_data_shards import clean_shards
    spec = clean_shards(tmp_path, n_shards=1, per_shard=2)
    assert not has_groundings(spec)
    with pytest.raises(ValueError, match="no samples with groundings"):
        read_scenes(spec, 2)


def test_training_on_grounded_shards_scores_the_pointing_game(tmp_path, capsys):
    """train_small.py on shards of built-in scenes: --eval-every scores the pointing game from the val shards, and
    every metrics line carries the loader's share of the wall time (data_wait_frac) next to img/s."""
    from minifilip.train import main as train_main
    train, val = str(tmp_path / "train"), str(tmp_path / "val")
    make_subset("builtin", train, n=16, size=32, samples_per_shard=8, progress=False)
    make_subset("builtin", val, n=8, size=32, split="val", progress=False)
    out = tmp_path / "run"
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train_main(["--train-data", train, "--val-data", val, "--set", "image_size=32", "--steps", "4",
                           "--batch-size", "8", "--warmup", "1", "--log-every", "2", "--eval-every", "2",
                           "--eval-size", "8", "--val-size", "8", "--num-workers", "0", "--min-count", "1",
                           "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(saved)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_pointing_acc" in r]
    assert [r["step"] for r in evals] == [0, 2, 4] and all(0 <= r["val_pointing_acc"] <= 1 for r in evals)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [2, 4]
    assert all(0 <= r["data_wait_frac"] <= 1 and r["img_per_s"] > 0 for r in steps)
    final = json.loads((out / "final.json").read_text())
    assert "val_pointing_acc" in final["alignment"]["last"] and final["val"]["n"] == 8
    # the evaluation CLI scores the pointing game on the same shards (--data)
    from minifilip.evaluate import main as evaluate_main
    report = tmp_path / "eval.json"
    assert evaluate_main(["--checkpoint", str(out / "checkpoint.pt"), "--data", val, "--n", "8", "--n-zeroshot", "2",
                          "--no-untrained", "--json", str(report)]) == 0
    row = json.loads(report.read_text())[0]
    assert 0 <= row["pointing_acc"] <= 1 and row["retrieval_n"] == 8 and "pointing_centre" in row
