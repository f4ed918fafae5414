"""Alignment figures (fig4 and heatmaps) and the visualize CLI, on a tiny random model."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from minifilip import FILIP, FILIPConfig, WordTokenizer
from minifilip.checkpoint import save_checkpoint
from minifilip.data.grounded import render_scene, vocabulary
from minifilip.visualize import DPI, FIG4_SIZE, HEATMAP_PANEL, alignment, load_image, main, render


def tiny_model(loss="filip"):
    torch.manual_seed(0)
    tok = WordTokenizer(vocabulary())
    cfg = FILIPConfig.preset("tiny", vocab_size=len(tok), loss=loss, vision_layers=1, text_layers=1,
                             vision_width=32, text_width=32, embed_dim=16)
    return FILIP(cfg).eval(), tok


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, *tiny_model())
    return str(path)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "minifilip.visualize", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_alignment_numbers_tokens_like_the_paper_and_masks_specials():
    model, tok = tiny_model()
    a = alignment(model, tok, render_scene(0, "val", 0, 64).image, "a photo of a balloon.")
    assert a["tokens"] == ["[BOS]", "a", "photo", "of", "a", "[UNK]", ".", "[EOS]"]  # balloon -> index 5
    assert a["candidates"].tolist() == [False, True, True, True, True, True, True, False]
    assert a["sim"].shape == (64, 8) and a["grid"] == 8


@pytest.mark.parametrize("loss", ["filip", "clip"])
def test_both_views_write_pngs_of_the_expected_size(tmp_path, loss):
    model, tok = tiny_model(loss)
    image = render_scene(0, "val", 3, 64).image
    paths = render(model, tok, image, "a red circle", str(tmp_path / "fig.png"), "both")
    assert [os.path.basename(p) for p in paths] == ["fig_fig4.png", "fig_heatmaps.png"]
    fig4, heat = (Image.open(p) for p in paths)
    assert fig4.size == (round(FIG4_SIZE[0] * DPI), round(FIG4_SIZE[1] * DPI))
    # heatmaps: the image + one panel per content word ("red", "circle") in one row
    assert heat.size == (round(3 * HEATMAP_PANEL[0] * DPI), round(HEATMAP_PANEL[1] * DPI))
    assert np.asarray(heat.convert("L")).std() > 5  # not a blank canvas


def test_load_image_resizes_and_center_crops(tmp_path):
    arr = np.zeros((40, 100, 3), np.uint8)
    arr[:, 30:70] = 255  # a white band in the middle 40 columns
    Image.fromarray(arr).save(tmp_path / "wide.png")
    out = load_image(str(tmp_path / "wide.png"), 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert out[:, 10:54].mean() > 250  # the center crop keeps the band


def test_cli_help():
    proc = cli("--help")
    assert proc.returncode == 0 and "--builtin-index" in proc.stdout and "fig4" in proc.stdout


def test_main_writes_builtin_figure(tmp_path, checkpoint):  # in-process: the same code path as the CLI
    rc = main(["--checkpoint", checkpoint, "--builtin-index", "1", "--out", str(tmp_path / "f.png"), "--view", "fig4",
               "--highlight", "4,5"])
    assert rc == 0 and (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["--checkpoint", checkpoint, "--builtin-index", "1", "--out", str(tmp_path / "g.png"),
                 "--highlight", "0"]) == 2  # [BOS] is not a candidate token


@pytest.mark.parametrize("case", ["missing checkpoint", "unreadable image", "empty caption"])
def test_cli_errors_are_one_line(tmp_path, checkpoint, case):
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"this is not a png")
    good = tmp_path / "ok.png"
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(good)
    args = {"missing checkpoint": ["--checkpoint", str(tmp_path / "nope.pt"), "--image", str(good), "--text", "a"],
            "unreadable image": ["--checkpoint", checkpoint, "--image", str(bad), "--text", "a red circle"],
            "empty caption": ["--checkpoint", checkpoint, "--image", str(good), "--text", "   "]}[case]
    proc = cli(*args, "--out", str(tmp_path / "x.png"))
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0]
    assert {"missing checkpoint": "no checkpoint", "unreadable image": "cannot read image",
            "empty caption": "empty caption"}[case] in lines[0]
    assert not (tmp_path / "x.png").exists()
