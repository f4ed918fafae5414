"""Word-patch alignment pictures: per-word heatmaps and the FILIP paper's Fig. 4 view.

    python -m minifilip.visualize --checkpoint RUN/checkpoint.pt --image cat.jpg --text "a photo of a cat." \\
        --out fig.png [--view heatmaps|fig4|both] [--highlight 5]
    python -m minifilip.visualize --checkpoint RUN/checkpoint.pt --builtin-index 3 --out fig.png

From Python (notebooks): `alignment(model, tokenizer, image, text)` gives the patch x token cosine matrix, and
`plot_heatmaps(...)` / `plot_fig4(...)` return matplotlib Figures.

Fig. 4 of the paper: every image patch is labelled with the index of its most similar text token, in the
caption's own numbering ("[BOS] a photo of a balloon . [EOS]": balloon = 5). Only tokens in the model's text
mask are candidates - the words and punctuation, plus [BOS]/[EOS] only when the model trained with them - so a
patch is never "explained" by a token the loss never saw. Both towers are read at granularity "tokens", also for a
CLIP-trained model, whose patch and word tokens were never asked to align.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from .cli import Parser, one_line  # noqa: E402
from .data.transforms import images_to_tensor, load_image  # noqa: E402,F401  (load_image: decoded like training data; re-exported)
from .tokenizer import split_words  # noqa: E402

DPI = 100
FIG4_SIZE = (8.0, 4.6)        # inches: original image | patch index map, caption with indices on top
HEATMAP_PANEL = (2.2, 2.6)    # inches per panel: the image, then one panel per word
HEATMAP_COLUMNS = 5
HEATMAP_CMAP = "magma"         # perceptual: brightness grows with the value, readable in grey
STOPWORDS = {"a", "an", "the", "of", "photo", "image", "picture", "there", "is", "in", "and", "on", "with", "to"}
HIGHLIGHT_COLORS = ["#e41a1c", "#377eb8", "#4daf4a", "#ff7f00", "#984ea3", "#a65628", "#f781bf", "#17becf"]


@torch.no_grad()
def alignment(model, tokenizer, image: np.ndarray, text: str) -> dict:
    """Patch x token cosine similarities for one image (S, S, 3) uint8 and one caption.

    Returns sim (N, L) float, tokens (L strings, [BOS] ... [EOS], the caption's numbering), candidates (L,) bool
    (the model's text mask: which tokens may be picked), grid (patches per side).
    """
    if not split_words(text):
        raise ValueError("empty caption: give at least one word")
    cfg = model.config
    device = next(model.parameters()).device
    patches, _ = model.encode_image(images_to_tensor([image]).to(device), "tokens")  # (1, N, D)
    ids = tokenizer.encode(text, cfg.context_length).to(device)  # (1, L_ctx)
    words, mask = model.encode_text(ids, "tokens")  # (1, L_ctx, D), (1, L_ctx)
    tokens = tokenizer.tokens(text, cfg.context_length)  # no padding: [BOS] ... [EOS]
    n = len(tokens)
    sim = (patches[0].float() @ words[0, :n].float().t()).cpu()  # (N, L) cosine of every patch with every token
    return {"sim": sim, "tokens": tokens, "candidates": mask[0, :n].cpu(), "grid": cfg.image_size // cfg.patch_size}


def default_highlight(tokens: list[str], candidates: torch.Tensor) -> list[int]:
    """Content words: candidate tokens that are not punctuation or stop words."""
    return [i for i, t in enumerate(tokens) if bool(candidates[i]) and t[0].isalnum() and t not in STOPWORDS]


def token_line(tokens: list[str], highlight=()) -> str:
    """The caption with each token's index, highlighted tokens in capitals:
    '[BOS]:0  a:1  RED:2  circle:3  .:4  [EOS]:5'."""
    return "  ".join(f"{t.upper() if i in highlight else t}:{i}" for i, t in enumerate(tokens))


def plot_fig4(image: np.ndarray, align: dict, highlight: list[int] | None = None, title: str = "") -> plt.Figure:
    """The paper's Fig. 4: each patch labelled by the index of its most similar candidate token; patches won by a
    highlighted token are tinted in that token's colour. Returns a FIG4_SIZE * DPI pixel Figure."""
    sim, tokens, cand, g = align["sim"], align["tokens"], align["candidates"], align["grid"]
    highlight = default_highlight(tokens, cand) if highlight is None else list(highlight)
    best = sim.masked_fill(~cand[None, :], float("-inf")).argmax(dim=1).view(g, g)  # (g, g) token index per patch
    s = image.shape[0]
    p = s / g
    fig, axes = plt.subplots(1, 2, figsize=FIG4_SIZE, dpi=DPI)
    for ax in axes:
        ax.imshow(image, extent=(0, s, s, 0))
        ax.set_xticks([]), ax.set_yticks([])
    axes[0].set_title("image", fontsize=9)
    axes[1].set_title("most similar token per patch", fontsize=9)
    colors = {t: HIGHLIGHT_COLORS[k % len(HIGHLIGHT_COLORS)] for k, t in enumerate(highlight)}
    font = max(4, min(9, int(150 / g)))
    for r in range(g):
        for c in range(g):
            t = int(best[r, c])
            if t in colors:
                axes[1].add_patch(Rectangle((c * p, r * p), p, p, color=colors[t], alpha=0.45, lw=0))
            axes[1].text((c + 0.5) * p, (r + 0.5) * p, str(t), ha="center", va="center", fontsize=font,
                         color="white" if t in colors else "black", fontweight="bold" if t in colors else "normal")
    for x in np.arange(0, s + 1e-6, p):  # patch grid
        axes[1].axhline(x, color="white", lw=0.3), axes[1].axvline(x, color="white", lw=0.3)
    caption = token_line(tokens, highlight)
    fig.suptitle((title + "\n" if title else "") + caption, fontsize=8, wrap=True)
    legend = [Rectangle((0, 0), 1, 1, color=colors[t], alpha=0.6) for t in highlight]
    if legend:
        axes[1].legend(legend, [f"{tokens[t]} = {t}" for t in highlight], loc="upper center", fontsize=7,
                       bbox_to_anchor=(0.5, -0.01), ncol=min(4, len(legend)), frameon=False)
    fig.subplots_adjust(left=0.02, right=0.98, top=0.86, bottom=0.08, wspace=0.05)
    return fig


def plot_heatmaps(image: np.ndarray, align: dict, words: list[int] | None = None, title: str = "") -> plt.Figure:
    """One panel per word (default: the content words, see default_highlight): the patch cosine similarity to that
    word, blended on the image. One colour scale for the whole figure (the colour bar), so words compare; the
    colour's opacity grows with the similarity, so dissimilar background patches stay dark and the image shows
    through. The first panel is the image. Figure size: ceil((1 + n) / 5) rows x min(1 + n, 5) columns of
    HEATMAP_PANEL inches at DPI."""
    sim, tokens, cand, g = align["sim"], align["tokens"], align["candidates"], align["grid"]
    if words is None:
        words = default_highlight(tokens, cand)
    n = 1 + len(words)
    cols, rows = min(n, HEATMAP_COLUMNS), math.ceil(n / HEATMAP_COLUMNS)
    fig, axes = plt.subplots(rows, cols, figsize=(HEATMAP_PANEL[0] * cols, HEATMAP_PANEL[1] * rows), dpi=DPI,
                             squeeze=False)
    s = image.shape[0]
    maps = sim[:, words].t().reshape(len(words), g, g).numpy() if words else np.zeros((0, g, g))
    vmin, vmax = (float(maps.min()), float(maps.max())) if words else (0.0, 1.0)
    norm = Normalize(vmin, vmax if vmax > vmin else vmin + 1e-6)  # one scale for every panel
    cmap = plt.get_cmap(HEATMAP_CMAP)
    dimmed = (image.astype(np.float32) * 0.35).astype(np.uint8)  # the image darkened, so colour stands out
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(image)
    axes.flat[0].set_title("image", fontsize=9)
    for k, (t, m) in enumerate(zip(words, maps)):
        ax = axes.flat[k + 1]
        ax.imshow(dimmed, extent=(0, s, s, 0))
        overlay = cmap(norm(m))  # (g, g, 4) RGBA
        overlay[..., 3] = 0.25 + 0.7 * norm(m).clip(0, 1)  # low similarity: mostly the dark image
        ax.imshow(overlay, extent=(0, s, s, 0), interpolation="nearest")
        r, c = divmod(int(m.argmax()), g)
        ax.add_patch(Rectangle((c * s / g, r * s / g), s / g, s / g, fill=False, ec="cyan", lw=1.5))
        ax.set_title(f"{t}: '{tokens[t]}' (max {m.max():.2f})", fontsize=8)
    fig.suptitle((title + "\n" if title else "") + "colour = cosine similarity of each patch to the word "
                 f"(one scale, {vmin:.2f} .. {vmax:.2f}); box = most similar patch", fontsize=8)
    top, width = (0.8 if rows == 1 else 0.88), fig.get_figwidth()
    right = 1 - 0.8 / width  # keep 0.8 inch for the colour bar and its labels, whatever the number of panels
    fig.subplots_adjust(left=0.01, right=right, top=top, bottom=0.01, wspace=0.05, hspace=0.25)
    bar = fig.colorbar(ScalarMappable(norm, cmap), cax=fig.add_axes((right + 0.08 / width, 0.05, 0.1 / width,
                                                                     top - 0.1)))
    bar.set_label("patch-word cosine", fontsize=7)
    bar.ax.tick_params(labelsize=6)
    return fig


def save(fig: plt.Figure, path: str) -> str:
    """Write a PNG at the figure's own pixel size (no tight bbox, so sizes are predictable) and close it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    plt.close(fig)
    return path


def save_stacked(figs: list[plt.Figure], path: str) -> str:
    """Several figures in one PNG, one above the other (centred on white), and close them."""
    from PIL import Image
    parts = []
    for fig in figs:
        fig.canvas.draw()
        parts.append(Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3]))
        plt.close(fig)
    canvas = Image.new("RGB", (max(p.width for p in parts), sum(p.height for p in parts)), "white")
    top = 0
    for part in parts:
        canvas.paste(part, ((canvas.width - part.width) // 2, top))
        top += part.height
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path, format="png")
    return path


def render(model, tokenizer, image: np.ndarray, text: str, out: str, view: str = "both",
           highlight: list[int] | None = None, title: str = "") -> list[str]:
    """Alignment figure to the PNG `out` (returned in a list): the fig4 view, the heatmaps, or "both" in one
    file, the fig4 view above the heatmaps."""
    if view not in ("fig4", "heatmaps", "both"):
        raise ValueError(f"view must be fig4, heatmaps or both, got {view!r}")
    align = alignment(model, tokenizer, image, text)
    if highlight is not None:
        bad = [i for i in highlight if not 0 <= i < len(align["tokens"]) or not bool(align["candidates"][i])]
        if bad:
            raise ValueError(f"--highlight {bad}: not a word index of {token_line(align['tokens'])}")
    figs = []
    if view in ("fig4", "both"):
        figs.append(plot_fig4(image, align, highlight, title))
    if view in ("heatmaps", "both"):
        figs.append(plot_heatmaps(image, align, title=title))
    return [save(figs[0], out) if len(figs) == 1 else save_stacked(figs, out)]


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m minifilip.visualize",
               description="Word-patch alignment of a FILIP/CLIP checkpoint: per-word heatmaps and the paper's "
                           "Fig. 4 view (each patch labelled by its most similar token).")
    p.add_argument("--checkpoint", required=True, help="checkpoint.pt written by train_small.py")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="any image file; resized and center-cropped to the model's image_size")
    src.add_argument("--builtin-index", type=int, metavar="I", help="use built-in val scene I (and its caption)")
    p.add_argument("--text", help="caption (default with --builtin-index: the scene's first caption)")
    p.add_argument("--out", required=True, help="output PNG file (with --view both: the Fig. 4 view above the "
                   "heatmaps, in this one file)")
    p.add_argument("--view", default="both", choices=["heatmaps", "fig4", "both"])
    p.add_argument("--highlight", default=None, help="comma-separated token indices to colour in the fig4 view "
                   "(default: content words)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from .runs import check_output_file
        check_output_file(args.out, "--out", example="fig.png")
        from .checkpoint import load_model
        model, tokenizer, _ = load_model(args.checkpoint)
        size = model.config.image_size
        if args.image is not None:
            if args.text is None:
                raise ValueError("--text is required with --image")
            image, text = load_image(args.image, size), args.text
        else:
            from .data.grounded import render_scene
            scene = render_scene(0, "val", args.builtin_index, size)
            image, text = scene.image, args.text if args.text is not None else scene.captions[0]
        highlight = [int(x) for x in args.highlight.split(",") if x.strip()] if args.highlight else None
        for path in render(model, tokenizer, image, text, args.out, args.view, highlight):
            print(path)
    except (ValueError, FileNotFoundError) as e:
        print(f"minifilip.visualize: error: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
