"""CLIP vs FILIP vs CLIP+FILIP at equal compute: one command for the table and the figure.

    python -m minifilip.compare --steps 500 --out runs/compare-500

trains the three objectives on the same built-in data, seed and step budget (train_small.py's defaults otherwise;
extra training flags via --train-args), evaluates all three with minifilip.evaluate (retrieval, zero-shot, pointing
game, zero-shot segmentation, binding; each next to chance, the untrained network and the centre baseline), and
writes into --out:

    clip/ filip/ clip-filip/   one train_small.py run each (checkpoint.pt, final.json, loss.png, ...)
    compare.json               what was compared (steps, seed, flags): a later call with other settings refuses
    results.json               every metric of every model (minifilip.evaluate's JSON rows)
    table.md                   the markdown table
    heatmaps.png               the three models' word heatmaps for the same val scenes

Checkpoints are reused: a finished run is evaluated as it is, an interrupted one is resumed (bit-exact), and a run
trained with different settings is an error, never silently overwritten.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import textwrap

import numpy as np
import torch

from . import evaluate, train
from .checkpoint import load_checkpoint

LOSSES = {"clip": "clip", "filip": "filip", "clip+filip": "clip-filip"}  # loss -> run folder
NAMES = {"clip": "CLIP", "filip": "FILIP", "clip+filip": "CLIP+FILIP"}
FIGURE_SCENES = 2  # two-object val scenes in the figure; two words (the two colour words) per scene


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m minifilip.compare", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=500, help="optimizer steps per model (train_small.py's default)")
    p.add_argument("--seed", type=int, default=0, help="one seed for all three: weights, data order, val scenes")
    p.add_argument("--out", default=None, help="output folder (default: runs/compare-<steps>)")
    p.add_argument("--train-args", default="", metavar="FLAGS",
                   help="extra train_small.py flags for all three models, e.g. \"--lr 5e-4 --batch-size 128\"")
    p.add_argument("--n", type=int, default=1000, help="val pairs for retrieval / scenes for the grounding metrics")
    p.add_argument("--n-zeroshot", type=int, default=300, help="single-object val scenes per zero-shot task")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, ...")
    return p


def spec_of(args) -> dict:
    """What makes two comparisons the same: everything that changes a number in the table."""
    return {"steps": args.steps, "seed": args.seed, "train_args": shlex.split(args.train_args), "n": args.n,
            "n_zeroshot": args.n_zeroshot, "losses": list(LOSSES)}


def check_spec(out: str, spec: dict) -> None:
    """Refuse to mix into a different earlier comparison in the same folder."""
    path = os.path.join(out, "compare.json")
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old != spec:
            diff = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
            raise ValueError(f"{out} holds a different comparison ({', '.join(diff)} differ); choose another --out")


def train_argv(loss: str, run_dir: str, args) -> list[str]:
    return ["--loss", loss, "--steps", str(args.steps), "--seed", str(args.seed), "--device", args.device,
            *shlex.split(args.train_args), "--out", run_dir]


def ensure_trained(loss: str, run_dir: str, args) -> str:
    """Train (or resume, or reuse) one model; returns what was done. A checkpoint of other settings is an error."""
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    argv = train_argv(loss, run_dir, args)
    wanted = vars(train.build_parser().parse_args(argv))
    if os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path)
        saved = ckpt.get("args") or {}
        ignore = set(train.RESUME_OVERRIDABLE) | {"out", "resume", "stop_at", "steps"}
        differ = sorted(k for k in wanted if k not in ignore and k in saved and saved[k] != wanted[k])
        if saved.get("steps") != args.steps or differ:
            raise ValueError(f"{run_dir} holds a run with other settings ({', '.join(differ) or 'steps'}); "
                             "choose another --out")
        if int(ckpt["step"]) >= args.steps and os.path.exists(os.path.join(run_dir, "final.json")):
            return "reused"
        argv = ["--resume", run_dir, "--device", args.device]
        action = f"resumed at step {int(ckpt['step'])}"
    else:
        action = "trained"
    print(f"== {NAMES[loss]}: train_small.py {' '.join(argv)}", flush=True)
    if train.main(argv) != 0:
        raise ValueError(f"training {NAMES[loss]} failed (see the message above)")
    return action


def comparison_table(rows: dict[str, dict], finals: dict[str, dict]) -> str:
    """Rows = models (then the untrained network, chance, centre baseline), columns = metrics."""
    cols = [("i→t R@1", "retrieval_i2t_R@1"), ("i→t R@5", "retrieval_i2t_R@5"), ("t→i R@1", "retrieval_t2i_R@1"),
            ("t→i R@5", "retrieval_t2i_R@5"), ("zero-shot colour", "zeroshot_color_"),
            ("zero-shot shape", "zeroshot_shape_"), ("pointing, all words", "pointing_acc"),
            ("pointing, colour words", "pointing_acc_color"), ("pointing, 2-3 objects", "pointing_acc_multi"),
            ("seg. mIoU colour", "segmentation_miou_color"), ("seg. mIoU shape", "segmentation_miou_shape"),
            ("binding", "binding_acc")]

    def value(row, key, prefix=""):
        if key.startswith("zeroshot_"):  # each model's own prompt ensemble: CLIP averages embeddings
            key += "embedding" if row["loss"] == "clip" else "similarity"
        v = row.get(prefix + key)
        return "-" if v is None else f"{v:.3f}"

    lines = ["| model | " + " | ".join(c for c, _ in cols) + " | s / step |", "|---" * (len(cols) + 2) + "|"]
    for loss, row in rows.items():
        f = finals[loss]
        per_step = f"{f['train_seconds'] / f['steps']:.2f}"
        lines.append(f"| {NAMES[loss]} | " + " | ".join(value(row, k) for _, k in cols) + f" | {per_step} |")
    for loss, label in (("clip", "untrained, CLIP scoring"), ("filip", "untrained, token-wise scoring")):
        if loss in rows:
            lines.append(f"| {label} | " + " | ".join(value(rows[loss], k, "untrained_") for _, k in cols) + " | |")
    any_row = next(iter(rows.values()))
    chance = {"retrieval_i2t_R@1": "retrieval_chance_R@1", "retrieval_t2i_R@1": "retrieval_chance_R@1",
              "zeroshot_color_": "zeroshot_color_chance", "zeroshot_shape_": "zeroshot_shape_chance",
              "pointing_acc": "pointing_chance", "pointing_acc_color": "pointing_chance_color",
              "pointing_acc_multi": "pointing_chance_multi", "segmentation_miou_color": "segmentation_chance_color",
              "segmentation_miou_shape": "segmentation_chance_shape", "binding_acc": "binding_chance"}
    centre = {"pointing_acc": "pointing_centre", "pointing_acc_color": "pointing_centre_color",
              "pointing_acc_multi": "pointing_centre_multi"}
    for label, table in (("chance", chance), ("centre baseline", centre)):
        cells = [f"{any_row[table[k]]:.3f}" if k in table and table[k] in any_row else "" for _, k in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " | |")
    return "\n".join(lines)


def heatmap_figure(paths: dict[str, str], out_png: str) -> str:
    """Rows: (scene, colour word); columns: the image, then each model's patch similarity to that word."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from . import visualize
    from .checkpoint import load_model
    from .data.builtin import find_val_scenes
    models = {loss: load_model(p)[:2] for loss, p in paths.items()}
    size = next(iter(models.values()))[0].config.image_size
    scenes = [sc for _, sc in find_val_scenes(lambda sc: len(sc.objects) == 2, FIGURE_SCENES, size)]
    trials = [(sc, g) for sc in scenes for g in sc.groundings[0] if g.kind == "color"]
    fig, axes = plt.subplots(len(trials), 1 + len(models), figsize=(1.9 * (1 + len(models)), 2.0 * len(trials)),
                             dpi=80, squeeze=False)
    for r, (sc, g) in enumerate(trials):
        axes[r, 0].imshow(sc.image)
        axes[r, 0].set_title(textwrap.fill(f"'{g.word}' in: {sc.captions[0]}", 32), fontsize=6)
        for c, (loss, (model, tokenizer)) in enumerate(models.items(), start=1):
            a = visualize.alignment(model, tokenizer, sc.image, sc.captions[0])
            grid = a["grid"]
            heat = a["sim"][:, g.token_index].view(grid, grid).numpy()  # (g, g) patch cosine with the word
            ax = axes[r, c]
            ax.imshow(sc.image, extent=(0, size, size, 0))
            ax.imshow(heat, extent=(0, size, size, 0), cmap="jet", alpha=0.55, interpolation="nearest")
            centres = np.arange(size) + 0.5  # pixel centres, in the image's y-down coordinates
            ax.contour(centres, centres, sc.masks[g.object_index].astype(float), levels=[0.5], colors="white",
                       linewidths=0.8)
            row, col = divmod(int(heat.argmax()), grid)
            p = size / grid
            ax.add_patch(Rectangle((col * p, row * p), p, p, fill=False, ec="black", lw=1.5))
            ax.set_title(f"{NAMES[loss]}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle("patch similarity to the colour word (each panel its own scale); white: the object, "
                 "black box: top patch", fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return out_png


def compare(args) -> str:
    """Train/reuse, evaluate, write the outputs; returns the table."""
    if args.steps <= 0 or args.n < 2 or args.n_zeroshot < 1:
        raise ValueError("--steps must be positive, --n >= 2, --n-zeroshot >= 1")
    out = args.out or os.path.join("runs", f"compare-{args.steps}")
    spec = spec_of(args)
    check_spec(out, spec)
    os.makedirs(out, exist_ok=True)
    paths, finals, actions = {}, {}, []
    for loss, folder in LOSSES.items():
        run_dir = os.path.join(out, folder)
        actions.append(ensure_trained(loss, run_dir, args))
        print(f"{NAMES[loss]}: {actions[-1]} ({run_dir})", flush=True)
        paths[loss] = os.path.join(run_dir, "checkpoint.pt")
        with open(os.path.join(run_dir, "final.json")) as f:
            finals[loss] = json.load(f)
    with open(os.path.join(out, "compare.json"), "w") as f:
        json.dump(spec, f, indent=2)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    eval_args = evaluate.build_parser().parse_args(
        [a for p in paths.values() for a in ("--checkpoint", p)] +
        ["--n", str(args.n), "--n-zeroshot", str(args.n_zeroshot), "--device", "cpu" if device == "auto" else device])
    results = os.path.join(out, "results.json")
    if all(a == "reused" for a in actions) and os.path.exists(results):  # nothing retrained: its evaluation holds
        print(f"reusing the evaluation in {results}", flush=True)
        with open(results) as f:
            rows = dict(zip(paths, json.load(f)))
    else:
        rows = {}
        for loss, p in paths.items():
            print(f"evaluating {NAMES[loss]} (and its untrained network) ...", flush=True)
            rows[loss] = evaluate.evaluate_checkpoint(p, NAMES[loss], eval_args)
        with open(results, "w") as f:
            json.dump(list(rows.values()), f, indent=2)
    table = comparison_table(rows, finals)
    note = (f"\n\n{args.steps} steps each, seed {args.seed}, train_small.py defaults"
            + (f" + `{args.train_args}`" if args.train_args else "") +
            f"; n = {args.n} val scenes (zero-shot: {args.n_zeroshot} per task). Zero-shot uses each model's own "
            "prompt ensemble (CLIP: mean of embeddings; FILIP and CLIP+FILIP: mean of similarities). "
            "s / step: wall time of training divided by steps, on whatever else the machine was doing.\n")
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table + note)
    heatmap_figure(paths, os.path.join(out, "heatmaps.png"))
    return table + note


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        table = compare(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"minifilip.compare: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
