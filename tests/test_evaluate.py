"""Retrieval R@1/5/10 with duplicates and ties, the side-by-side report, and the evaluate CLI."""
import json
import os
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


@pytest.fixture
def tiny_checkpoint(tmp_path):
    path = tmp_path / "ckpt" / "checkpoint.pt"
    path.parent.mkdir()
    save_checkpoint(path, *tiny_model())
    return str(path)


def one_line_error(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("minifilip.evaluate: error:"), err
    return err[0]


def test_bad_output_paths_and_device_fail_before_the_work(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    monkeypatch.setattr(evaluate, "evaluate_checkpoint", lambda *a: pytest.fail("evaluated despite a bad flag"))
    (tmp_path / "file").write_text("x")
    assert "is a folder" in one_line_error(["--checkpoint", tiny_checkpoint, "--json", str(tmp_path)], capsys)
    assert "is a file" in one_line_error(["--checkpoint", tiny_checkpoint, "--json",
                                          str(tmp_path / "file" / "r.json")], capsys)
    assert "is a file" in one_line_error(["--checkpoint", tiny_checkpoint, "--figures", str(tmp_path / "file")],
                                         capsys)
    assert "is not a device" in one_line_error(["--checkpoint", tiny_checkpoint, "--device", "bogus"], capsys)


def test_checkpoints_whose_weights_do_not_fit_their_config(tmp_path, tiny_checkpoint, capsys):
    raw = torch.load(tiny_checkpoint, weights_only=True)
    raw["model"]["logit_scale"] = torch.zeros(5)
    torch.save(raw, tmp_path / "misfit.pt")
    assert "do not fit" in one_line_error(["--checkpoint", str(tmp_path / "misfit.pt")], capsys)
    # a small file whose config asks for a ~16 TB model: refused from the shapes, before any allocation
    raw = torch.load(tiny_checkpoint, weights_only=True)
    raw["config"].update(vision_width=2 ** 20, vision_heads=1)
    raw["model"] = {"logit_scale": torch.zeros(())}
    torch.save(raw, tmp_path / "huge.pt")
    assert os.path.getsize(tmp_path / "huge.pt") < 10_000
    assert "do not fit" in one_line_error(["--checkpoint", str(tmp_path / "huge.pt")], capsys)


def test_skipped_bad_samples_of_data_are_reported(tmp_path, tiny_checkpoint, capsys):
    from PIL import Image
    rows = ["filepath\ttitle"]
    for i in range(3):
        Image.new("RGB", (40, 40), (60 * i, 100, 200)).save(tmp_path / f"{i}.png")
        rows.append(f"{tmp_path / f'{i}.png'}\ta red circle {i}")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    rows.insert(2, f"{tmp_path / 'broken.png'}\ta blue square")
    (tmp_path / "list.tsv").write_text("\n".join(rows) + "\n")
    assert main(["--checkpoint", tiny_checkpoint, "--data", str(tmp_path / "list.tsv"), "--n", "3",
                 "--n-zeroshot", "2", "--ensemble", "similarity", "--json", str(tmp_path / "r.json")]) == 0
    assert "skipped 1 bad samples (decode_error: 1)" in capsys.readouterr().err
    row = json.loads((tmp_path / "r.json").read_text())[0]
    assert row["data_bad_samples"] == {"decode_error": 1} and row["retrieval_n"] == 3


def test_builtin_captions_follow_the_checkpoints_caption_style(tmp_path, monkeypatch):
    seen = {}

    def fake_metrics(model, tokenizer, images, captions, scenes, args, warn=True):
        seen["captions"] = captions
        return {}
    monkeypatch.setattr(evaluate, "model_metrics", fake_metrics)
    args = evaluate.build_parser().parse_args(["--checkpoint", "x", "--n", "4", "--no-untrained"])
    for style, suffix in (("color-first+background", " background."), (None, "")):
        path = tmp_path / f"{style}.pt"
        save_checkpoint(path, *tiny_model(), args={"caption_style": style} if style else {})
        row = evaluate.evaluate_checkpoint(str(path), "m", args)
        assert row["caption_style"] == (style or "color-first")
        assert all(c.endswith(suffix) for c in seen["captions"])
        assert any(c.endswith(" background.") for c in seen["captions"]) == bool(style)
    args.caption_style = "shape-first"  # asked for: overrides the checkpoint's style
    assert evaluate.evaluate_checkpoint(str(path), "m", args)["caption_style"] == "shape-first"
    assert all(" in " in c for c in seen["captions"])


def test_caption_style_needs_builtin_data(tiny_checkpoint, capsys):
    err = one_line_error(["--checkpoint", tiny_checkpoint, "--data", "x.tsv", "--caption-style", "shape-first"],
                         capsys)
    assert "--caption-style applies to the built-in data only" in err
