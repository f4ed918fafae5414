"""Evaluate checkpoints side by side: retrieval, zero-shot with prompt ensembles, and the pointing game.

    python -m minifilip.evaluate --checkpoint runs/filip/checkpoint.pt --checkpoint runs/clip/checkpoint.pt \\
        [--data builtin|LIST.tsv] [--n 1000] [--json out.json] [--figures DIR]

Everything is scored with each model's own similarity: FILIP late interaction (image->text ranking uses s_i2t,
text->image ranking uses s_t2i, as in training) or, for a CLIP-trained model, the CLS/EOS cosine. The pointing
game always reads both towers at granularity "tokens": it asks whether word and patch tokens align, which only
FILIP trains for.

    retrieval   R@1/5/10 both ways over n pairs (built-in val split, or any minifilip.data source). Identical captions count as the same answer, ties pessimistic.
    zero-shot   built-in single-object val scenes, classes = the 6 shapes and the 6 colours; prompt ensemble over
                templates, averaging similarities (FILIP, "sim") or averaging embeddings (CLIP-style, "emb").
    pointing    built-in val scenes (or shards with groundings, see make_subset --src builtin): does each
                colour/shape word's top patch overlap its object? (+ chance level and a centre baseline that always
                points at the image centre)
    segmentation  built-in val scenes: each patch takes the colour (shape) word most similar to it; mean IoU
    binding     built-in two-object val scenes: true caption vs the same caption with the colours swapped

Every metric is printed next to its chance level and next to the *untrained* network of the same architecture and
seed (the weights the run started from), unless --no-untrained. See minifilip/grounding_metrics.py.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch

from . import grounding_metrics, pointing, zeroshot
from .checkpoint import load_model
from .cli import DefaultsHelpFormatter, Parser, one_line, parse_device
from .data.builtin import builtin_val_pairs, find_val_scenes
from .data.grounded import CAPTION_STYLES
from .data.grounded_shards import has_groundings, scene_pairs
from .runs import check_output_file, check_output_folder
from .metrics import retrieval_metrics

RETRIEVAL_RULE = "identical captions count as the same answer; ties ranked pessimistically"
FIGURE_SCENES = 3  # figures for the first 3 val scenes with two or more objects


@torch.no_grad()
def retrieval(model, tokenizer, images: torch.Tensor, captions: list[str], batch_size: int = 256,
              ks=(1, 5, 10), autocast=contextlib.nullcontext) -> dict:
    """R@k image->text and text->image for n matched pairs, scored with the model's own similarity.

    Encoding runs in batches and scoring in blocks of 64 images (the chunked CMLI bounds each block's memory), so
    5k x 5k fits: the encoded tokens are 5000 x 64 x 256 floats per side, the score matrices 5000 x 5000.
    autocast: context factory the encoders run under (training passes its bf16 / fp16 autocast). The model is
    evaluated in eval mode and left in the mode it came in, so the training loop can call this between steps.
    """
    was_training = model.training
    model.eval()
    with autocast():
        img = zeroshot.encode_images(model, images, batch_size)
        txt = zeroshot.encode_texts(model, tokenizer, captions, batch_size)
    s_i2t, s_t2i = model.pairwise_scores(*img, *txt)  # (n, n) each
    model.train(was_training)
    return retrieval_metrics(s_i2t, s_t2i, captions, ks=ks)


def source_pairs(spec: str, n: int, image_size: int):
    """First n good (image, caption) pairs of any minifilip.data source (TSV/CSV list, shards, img2dataset files).
    Bad samples are skipped; how many, by reason, is printed (stderr) and returned: (images, captions, bad)."""
    from .data.decode import split_counts
    from .data.sources import load_pairs
    images, captions, _keys, counts = load_pairs(spec, n, image_size)
    bad = split_counts(counts)[0]
    if bad:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(bad.items()))
        print(f"{spec}: skipped {sum(bad.values())} bad samples ({reasons})", file=sys.stderr)
    return images, captions, bad


def write_figures(model, tokenizer, name: str, folder: str) -> list[str]:
    """Fig. 4 view + heatmaps for the fixed val scenes; grounded words (colour, shape) highlighted."""
    from . import visualize
    paths = []
    for i, sc in find_val_scenes(lambda sc: len(sc.objects) >= 2, FIGURE_SCENES, model.config.image_size):
        highlight = sorted(g.token_index for g in sc.groundings[0])
        title = f"{name} ({model.config.loss}), val scene {i}"
        for view in ("fig4", "heatmaps"):
            paths += visualize.render(model, tokenizer, sc.image, sc.captions[0],
                                      os.path.join(folder, f"{name}_scene{i}_{view}.png"), view, highlight, title)
    return paths


def evaluate_checkpoint(path: str, name: str, args) -> dict:
    """Every metric of one checkpoint, as a flat dict (the JSON entry); `name` labels its column and figures.
    With args.untrained, the same metrics of the untrained network follow under the prefix "untrained_"."""
    model, tokenizer, ckpt = load_model(path)
    model.to(parse_device(args.device))
    cfg = model.config
    row = {"checkpoint": path, "name": name, "loss": cfg.loss, "token_keep_ratio": cfg.token_keep_ratio,
           "step": ckpt.get("step"), "data": args.data, "retrieval_rule": RETRIEVAL_RULE}
    if args.data == "builtin":  # held-out captions in the style the model was trained on, unless asked otherwise
        style = getattr(args, "caption_style", None) or (ckpt.get("args") or {}).get("caption_style", "color-first")
        images, captions, scenes = builtin_val_pairs(args.n, cfg.image_size, caption_style=style)
        row["caption_style"] = style
    elif has_groundings(args.data):  # shards written by make_subset --src builtin: the ground truth travels along
        images, captions, scenes = scene_pairs(args.data, args.n, cfg.image_size)
        row["data_bad_samples"] = {}
    else:
        images, captions, bad = source_pairs(args.data, args.n, cfg.image_size)
        scenes, row["data_bad_samples"] = None, bad
    row.update(model_metrics(model, tokenizer, images, captions, scenes, args))
    if getattr(args, "untrained", False):
        seed = int((ckpt.get("args") or {}).get("seed", 0))
        untrained = grounding_metrics.untrained_model(cfg, seed).to(parse_device(args.device))
        metrics = model_metrics(untrained, tokenizer, images, captions, scenes, args, warn=False)
        row.update({f"untrained_{k}": v for k, v in metrics.items() if not k.endswith(("_chance", "_n"))})
        row["untrained_seed"] = seed
    if scenes is not None:
        row.update(grounding_metrics.centre_baseline(scenes, cfg.patch_size, cfg.context_length))
        row["pointing_rule"] = pointing.INSIDE_RULE
    if args.figures:
        row["figures"] = write_figures(model, tokenizer, name, args.figures)
    return row


def model_metrics(model, tokenizer, images, captions, scenes, args, warn: bool = True) -> dict:
    """Retrieval, zero-shot and (on built-in scenes) pointing, segmentation and binding of one model."""
    row = {}
    r = retrieval(model, tokenizer, images, captions, args.batch_size)
    row.update({f"retrieval_{k}": v for k, v in r.items()})
    ensembles = ["similarity", "embedding"] if args.ensemble == "both" else [args.ensemble]
    templates = zeroshot.TEMPLATE_SETS[args.templates]
    tasks = {}
    if args.zeroshot_dir:
        tasks["folder"] = zeroshot.image_folder(args.zeroshot_dir, model.config.image_size)
    else:
        tasks.update({t: zeroshot.builtin_zeroshot_data(t, args.n_zeroshot, model.config.image_size)
                      for t in zeroshot.BUILTIN_TASKS})
    for task, (zs_images, labels, names) in tasks.items():
        for ens in ensembles:
            z = zeroshot.zero_shot(model, tokenizer, zs_images, labels, names, templates, ens, args.direction,
                                   args.batch_size, warn=warn and ens == ensembles[0])
            row[f"zeroshot_{task}_{ens}"] = z["acc"]
            row[f"zeroshot_{task}_chance"] = z["chance"]
            row[f"zeroshot_{task}_n"] = z["n"]
    if scenes is not None:
        row.update(pointing.pointing_game(model, tokenizer, scenes, batch_size=args.batch_size))
        for attribute in grounding_metrics.SEGMENTATION_CLASSES:
            row.update(grounding_metrics.segmentation(model, tokenizer, scenes, attribute, args.batch_size))
        row.update(grounding_metrics.binding(model, tokenizer, scenes, args.direction))
    return row


# (label, value key, chance key or None, centre-baseline key or None): the lines of the report, in order
TABLE_LINES = [
    ("retrieval (n={n}) image->text R@1", "retrieval_i2t_R@1", "retrieval_chance_R@1", None),
    ("retrieval image->text R@5", "retrieval_i2t_R@5", None, None),
    ("retrieval image->text R@10", "retrieval_i2t_R@10", None, None),
    ("retrieval text->image R@1", "retrieval_t2i_R@1", "retrieval_chance_R@1", None),
    ("retrieval text->image R@5", "retrieval_t2i_R@5", None, None),
    ("retrieval text->image R@10", "retrieval_t2i_R@10", None, None),
    *[(f"zero-shot {task}, {label}", f"zeroshot_{task}_{ens}", f"zeroshot_{task}_chance", None)
      for task in ("shape", "color", "folder")
      for ens, label in (("similarity", "mean of similarities"), ("embedding", "mean of embeddings"))],
    ("pointing game, all words", "pointing_acc", "pointing_chance", "pointing_centre"),
    ("pointing game, colour words", "pointing_acc_color", "pointing_chance_color", "pointing_centre_color"),
    ("pointing game, shape words", "pointing_acc_shape", "pointing_chance_shape", "pointing_centre_shape"),
    ("pointing game, scenes with 2-3 objects", "pointing_acc_multi", "pointing_chance_multi",
     "pointing_centre_multi"),
    ("pointing game: top patch on any object", "pointing_on_any_object", None, None),
    ("segmentation mIoU, colours", "segmentation_miou_color", "segmentation_chance_color", None),
    ("segmentation mIoU, shapes", "segmentation_miou_shape", "segmentation_chance_shape", None),
    ("binding: true caption over colour-swapped", "binding_acc", "binding_chance", None),
]


def markdown_table(rows: list[dict]) -> str:
    """One line per metric (only metrics some checkpoint has): its chance level, the centre baseline where there
    is one, then per checkpoint its value and, when measured, the untrained network's."""
    with_untrained = any(k.startswith("untrained_") for r in rows for k in r)
    header = ["metric", "chance", "centre"]
    for r in rows:
        header += [f"{r['name']} ({r['loss']})"] + (["untrained"] if with_untrained else [])
    out = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    first = lambda key: next((r[key] for r in rows if key and key in r), None)  # noqa: E731
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for label, key, chance, centre in TABLE_LINES:
        if not any(key in r for r in rows):
            continue
        cells = [label.format(n=first("retrieval_n")), fmt(first(chance)), fmt(first(centre))]
        for r in rows:
            cells += [fmt(r.get(key))] + ([fmt(r.get("untrained_" + key))] if with_untrained else [])
        out.append("| " + " | ".join(cells) + " |")
    out.append(f"\nretrieval: {RETRIEVAL_RULE}.")
    if any("pointing_acc" in r for r in rows):
        out.append(f"pointing game: {pointing.INSIDE_RULE}; centre = always the patch at the image centre.")
    if any("segmentation_miou_color" in r for r in rows):
        out.append("segmentation: patches at least half covered by an object, each labelled with its most similar "
                   "class word (CLIP: class prompt's [EOS]); chance = expected mIoU of uniform random labels.")
    if with_untrained:
        out.append("untrained: the same architecture and seed before training (the weights each run started from).")
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m minifilip.evaluate", description=__doc__.split("\n\n")[0],
               formatter_class=DefaultsHelpFormatter)
    p.add_argument("--checkpoint", action="append", required=True,
                   help="checkpoint.pt to evaluate; repeat to compare several side by side")
    p.add_argument("--data", default="builtin", help="'builtin' (grounded shapes val split) or any minifilip.data "
                   "source: a TSV list (columns filepath, title), tar shards, an img2dataset folder (retrieval only, "
                   "unless the shards carry groundings: make_subset --src builtin writes such shards, and then "
                   "pointing, segmentation and binding are scored on them too)")
    p.add_argument("--n", type=int, default=1000, help="retrieval pairs / pointing-game scenes")
    p.add_argument("--caption-style", default=None, choices=list(CAPTION_STYLES),
                   help="built-in data: the held-out captions' style (default: the one the checkpoint was trained "
                        "on); e.g. shape-first puts every shape word before its colour word, so a causal text "
                        "tower cannot lend the colour to the shape word")
    p.add_argument("--n-zeroshot", type=int, default=300, help="single-object val scenes per zero-shot task")
    p.add_argument("--zeroshot-dir", default=None, help="ImageFolder-style directory (one sub-folder per class) "
                   "for zero-shot instead of the built-in shape/colour tasks")
    p.add_argument("--templates", default="builtin", choices=sorted(zeroshot.TEMPLATE_SETS),
                   help="prompt template set for zero-shot")
    p.add_argument("--ensemble", default="both", choices=["similarity", "embedding", "both"],
                   help="prompt ensemble: average similarities (FILIP), average embeddings (CLIP), or report both")
    p.add_argument("--direction", default="i2t", choices=["i2t", "t2i", "mean"],
                   help="late-interaction direction used to score classes for zero-shot")
    p.add_argument("--batch-size", type=int, default=256, help="encoding batch size")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--untrained", action=argparse.BooleanOptionalAction, default=True,
                   help="also evaluate the untrained network of each checkpoint's architecture and seed (the "
                        "baseline that says what the architecture gives for free); doubles the time")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write the metrics as a JSON list (one entry per checkpoint)")
    p.add_argument("--figures", default=None, metavar="DIR", help="write fig4 + heatmap PNGs per checkpoint")
    return p


def _names(paths: list[str]) -> list[str]:
    """Short unique column names: the run folder's name (checkpoint.pt's parent), else the file stem."""
    names = []
    for k, p in enumerate(paths):
        base = os.path.basename(os.path.dirname(os.path.abspath(p))) if os.path.basename(p) == "checkpoint.pt" \
            else os.path.splitext(os.path.basename(p))[0]
        names.append(base if base not in names else f"{base}-{k}")
    return names


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.n < 2 or args.n_zeroshot < 1 or args.batch_size < 1:
            raise ValueError("--n must be >= 2, --n-zeroshot and --batch-size >= 1")
        if args.caption_style and args.data != "builtin":
            raise ValueError("--caption-style applies to the built-in data only (--data builtin)")
        parse_device(args.device)
        if args.json:  # checked before the work: a bad path must not cost the whole evaluation
            check_output_file(args.json, "--json")
        if args.figures:
            check_output_folder(args.figures, "--figures")
        for p in args.checkpoint:
            if not os.path.isfile(p):
                raise FileNotFoundError(f"no checkpoint at {p}")
        rows = [evaluate_checkpoint(p, name, args) for p, name in zip(args.checkpoint, _names(args.checkpoint))]
    except (ValueError, FileNotFoundError) as e:
        print(f"minifilip.evaluate: error: {one_line(e)}", file=sys.stderr)
        return 2
    print(markdown_table(rows))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump([{k: round(v, 5) if isinstance(v, float) else v for k, v in r.items()} for r in rows], f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
