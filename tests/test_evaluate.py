"""Retrieval R@1/5/10 with duplicates and ties, the side-by-side report, and the evaluate CLI."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from minifilip.checkpoint import save_checkpoint
from minifilip import evaluate
from minifilip.evaluate import main, markdown_table, retrieval
from minifilip.metrics import retrieval_metrics
from test_visualize import tiny_model

KS = (1, 5, 10)


def _scores_with_ranks(ranks):
    """(n, n) scores where image i's own caption i has exactly ranks[i] wrong captions above it."""
    n = len(ranks)
    s = torch.zeros(n, n)
    for i, r in enumerate(ranks):
        others = [j for j in range(n) if j != i]
        s[i, others] = -torch.arange(1, n, dtype=torch.float)  # wrong captions: -1, -2, ...
        s[i, i] = -r - 0.5  # r wrong ones above it
    return s


def test_recall_at_1_5_10_on_known_ranks():
    ranks = [0, 1, 4, 5, 9, 10, 13, 0, 2, 0, 7, 12, 3, 0]  # 14 distinct captions
    captions = [f"caption {i}" for i in range(14)]
    s = _scores_with_ranks(ranks)
    m = retrieval_metrics(s, s.t(), captions, ks=KS)  # t2i ranks images per caption: same ranks by symmetry
    for k in KS:
        want = sum(r < k for r in ranks) / 14
        assert m[f"i2t_R@{k}"] == pytest.approx(want) and m[f"t2i_R@{k}"] == pytest.approx(want)
    assert m["i2t_R@10"] == pytest.approx(11 / 14)


def test_ties_are_pessimistic_and_identical_captions_count_as_hits():
    captions = ["a red circle.", "a blue square.", "a red circle.", "a green star."]
    s = torch.eye(4)
    s[0, 0], s[0, 2] = 0.0, 0.9  # image 0 prefers caption 2: identical to its own -> a hit
    s[1, 3] = 1.0  # image 1: a wrong caption tied with the right one -> a miss at R@1
    m = retrieval_metrics(s, s, captions, ks=KS)
    assert m["i2t_R@1"] == pytest.approx(3 / 4)
    assert m["i2t_R@5"] == 1.0 and m["i2t_R@10"] == 1.0
    flat = retrieval_metrics(torch.zeros(4, 4), torch.zeros(4, 4), captions, ks=KS)
    assert flat["i2t_R@1"] == 0.0 and flat["t2i_R@1"] == 0.0  # equal scores for all: no lucky hits


def test_retrieval_on_a_model_reports_r10():
    model, tok = tiny_model()
    from minifilip.data.builtin import builtin_val_pairs
    images, captions, _ = builtin_val_pairs(12, 64)
    m = retrieval(model, tok, images, captions, batch_size=5)  # batches smaller than n: concatenation matters
    assert {"i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@10", "chance_R@1"} <= set(m) and m["n"] == 12
    s_i2t = model.similarity(images, tok.encode(captions, 24), "i2t")  # the model's own score, unbatched
    assert m["i2t_R@1"] == retrieval_metrics(s_i2t, s_i2t, captions)["i2t_R@1"]


def test_report_json_lists_checkpoints_in_order(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "FIGURE_SCENES", 1)  # one scene's figures keep the test fast
    paths = []
    for loss in ("filip", "clip"):
        (tmp_path / loss).mkdir()
        save_checkpoint(tmp_path / loss / "checkpoint.pt", *tiny_model(loss))
        paths += ["--checkpoint", str(tmp_path / loss / "checkpoint.pt")]
    rc = main([*paths, "--n", "12", "--n-zeroshot", "6", "--json", str(tmp_path / "r.json"),
               "--figures", str(tmp_path / "figs")])
    assert rc == 0
    rows = json.loads((tmp_path / "r.json").read_text())
    assert [r["name"] for r in rows] == ["filip", "clip"] and [r["loss"] for r in rows] == ["filip", "clip"]
    for r in rows:
        assert {"retrieval_i2t_R@10", "zeroshot_shape_similarity", "zeroshot_color_embedding", "pointing_acc",
                "pointing_chance", "pointing_acc_color", "pointing_acc_shape"} <= set(r)
        assert 0 < r["pointing_chance"] < 1
        assert len(r["figures"]) == 2 and all(p.endswith(".png") for p in r["figures"])  # fig4 + heatmaps
    table = capsys.readouterr().out
    assert "| metric | chance | centre | filip (filip) | untrained | clip (clip) | untrained |" in table
    assert "identical captions" in table and "| pointing game, all words |" in table and "R@10" in table
    for r in rows:  # the new grounding metrics, each with chance, untrained and (pointing) the centre baseline
        assert {"segmentation_miou_color", "segmentation_miou_shape", "binding_acc", "pointing_centre",
                "untrained_pointing_acc", "untrained_binding_acc", "untrained_segmentation_miou_color"} <= set(r)
        assert r["binding_chance"] == 0.5 and 0 < r["segmentation_chance_color"] < 1
    assert rows[0]["untrained_pointing_acc"] == rows[1]["untrained_pointing_acc"]  # same architecture and seed
    assert markdown_table(rows).splitlines()[0] == table.splitlines()[0]


def test_cli_help_and_missing_checkpoint(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "minifilip.evaluate", *a], capture_output=True,
                                    text=True, cwd=ROOT, timeout=120)
    proc = run("--help")
    assert proc.returncode == 0 and "--checkpoint" in proc.stdout and "--figures" in proc.stdout
    proc = run("--checkpoint", str(tmp_path / "missing.pt"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "no checkpoint at" in lines[0]
