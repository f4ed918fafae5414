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
def test_each_view_writes_the_named_png_of_the_expected_size(tmp_path, loss):
    model, tok = tiny_model(loss)
    image = render_scene(0, "val", 3, 64).image
    sizes = {}
    for view in ("fig4", "heatmaps", "both"):
        paths = render(model, tok, image, "a red circle", str(tmp_path / f"{view}.png"), view)
        assert paths == [str(tmp_path / f"{view}.png")]  # exactly the file the user named
        sizes[view] = Image.open(paths[0]).size
    assert sorted(os.listdir(tmp_path)) == ["both.png", "fig4.png", "heatmaps.png"]
    assert sizes["fig4"] == (round(FIG4_SIZE[0] * DPI), round(FIG4_SIZE[1] * DPI))
    # heatmaps: the image + one panel per content word ("red", "circle") in one row
    assert sizes["heatmaps"] == (round(3 * HEATMAP_PANEL[0] * DPI), round(HEATMAP_PANEL[1] * DPI))
    # both: one file, the fig4 view above the heatmaps
    assert sizes["both"] == (max(sizes["fig4"][0], sizes["heatmaps"][0]), sizes["fig4"][1] + sizes["heatmaps"][1])
    heat = Image.open(tmp_path / "heatmaps.png")
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


def test_load_image_decodes_like_training(tmp_path):
    """16-bit PNGs are rescaled (not clipped to white) and transparency lands on white, as in training."""
    from minifilip import zeroshot
    Image.fromarray(np.full((32, 32), 32768, np.uint16)).save(tmp_path / "grey16.png")  # mid grey, 16 bit
    rgba = np.zeros((32, 32, 4), np.uint8)  # fully transparent black: training puts it on white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    assert abs(load_image(str(tmp_path / "grey16.png"), 16).mean() - 128) < 2
    assert load_image(str(tmp_path / "clear.png"), 16).min() == 255
    from minifilip.data import transforms
    assert load_image is transforms.load_image  # visualize and zeroshot share the training decode path
    (tmp_path / "classes" / "grey").mkdir(parents=True)
    Image.fromarray(np.full((32, 32), 32768, np.uint16)).save(tmp_path / "classes" / "grey" / "a.png")
    images, _labels, _names = zeroshot.image_folder(str(tmp_path / "classes"), 16)  # normalised tensors
    grey = (images * torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
            + torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1))
    assert abs(float(grey.mean()) - 128 / 255) < 0.01


def test_heatmaps_are_readable(tmp_path):
    """Perceptual colour map, one scale and a colour bar for the figure, a title saying what colour means, and
    dissimilar (background) patches darker than the most similar patch."""
    import matplotlib.pyplot as plt
    from minifilip.visualize import plot_heatmaps
    g = 4
    sim = torch.zeros(g * g, 4)
    sim[5, 1], sim[10, 2] = 0.9, 0.5  # word 1 matches patch 5, word 2 patch 10 (weaker)
    align = {"sim": sim, "tokens": ["[BOS]", "red", "circle", "[EOS]"], "grid": g,
             "candidates": torch.tensor([False, True, True, False])}
    image = np.full((64, 64, 3), 128, np.uint8)
    fig = plot_heatmaps(image, align)
    overlays = [ax.get_images()[-1] for ax in fig.axes[1:3]]
    assert len(fig.axes) == 4  # image, two words, the colour bar
    bar = fig.axes[-1]
    assert "cosine" in bar.get_ylabel()
    assert "colour" in fig._suptitle.get_text() and "cosine" in fig._suptitle.get_text()
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(float)
    height = rgb.shape[0]

    def brightness(ax, row, col):  # mean of the middle of patch (row, col) of a panel, in figure pixels
        box = ax.get_window_extent()
        x = box.x0 + (col + 0.5) * box.width / g
        y = height - (box.y1 - (row + 0.5) * box.height / g)
        return rgb[int(y) - 2:int(y) + 3, int(x) - 2:int(x) + 3].mean()

    word_ax = fig.axes[1]
    assert brightness(word_ax, 1, 1) > brightness(word_ax, 3, 3) + 60  # patch 5 glows, background stays dark
    assert overlays[0].get_array().shape[-1] == 4 and plt.get_cmap("magma")  # RGBA overlay from the colour map
    plt.close(fig)


def test_main_errors_are_one_line(tmp_path, checkpoint, capsys):
    """In-process: decompression bomb, an output path through a file, an output folder, bad checkpoint weights."""
    bomb = tmp_path / "bomb.png"
    Image.new("1", (14_000, 14_000)).save(bomb)  # 196 M pixels in a few KB
    good = tmp_path / "ok.png"
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(good)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    raw = torch.load(checkpoint, weights_only=True)
    raw["model"]["visual.pos"] = raw["model"]["visual.pos"][:3]
    torch.save(raw, tmp_path / "misfit.pt")
    cases = [(["--checkpoint", checkpoint, "--image", str(bomb), "--text", "a", "--out", str(tmp_path / "b.png")],
              "too_large"),
             (["--checkpoint", checkpoint, "--image", str(good), "--text", "a", "--out", str(a_file / "f.png")],
              "is a file, not a folder"),
             (["--checkpoint", checkpoint, "--image", str(good), "--text", "a", "--out", str(tmp_path)],
              "is a folder"),
             (["--checkpoint", str(tmp_path / "misfit.pt"), "--builtin-index", "0", "--out", str(tmp_path / "m.png")],
              "do not fit")]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert sorted(os.listdir(tmp_path)) == ["bomb.png", "misfit.pt", "notes.txt", "ok.png"]
