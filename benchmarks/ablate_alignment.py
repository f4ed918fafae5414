"""Why does FILIP's word-patch alignment fade with training? An ablation grid on the built-in data (issue 12).

Each variant is the default `train_small.py` run with one change. It is trained through the CLI, in pieces:
`--steps S --stop-at K1`, then `--resume --stop-at K2`, ... (resume is bit-exact), and the checkpoint at every K is
kept as stepK.pt and scored with the package's own evaluation:

    pointing game (minifilip.pointing)   all words / colour words / shape words / scenes with 2-3 objects, on the
                                         variant's own caption style; plus shape words of *shape-first* captions
                                         ("a circle in red"), where a causal text tower cannot borrow the colour
    retrieval R@1 (minifilip.evaluate)   both directions on the same held-out scenes
    zero-shot (minifilip.zeroshot)       colour and shape of single-object scenes, similarity ensemble, i2t
    temperature                          1 / the model's logit scale
    background diagnosis                 how often a colour word's top patch is background; which word the
                                         background patches match in the image->text direction

Step 0 is the untrained network of the same architecture and seed (what training starts from). Results are
written after every checkpoint (JSON + a markdown table), so a killed grid keeps what it measured, and a rerun
skips what is done.

    python benchmarks/ablate_alignment.py --variants base,wd0,lr3e-4 --steps 3000 --checkpoints 500,1000
    python benchmarks/ablate_alignment.py --list
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from minifilip import pointing, zeroshot  # noqa: E402
from minifilip.checkpoint import load_model  # noqa: E402
from minifilip.data.builtin import builtin_val_pairs, images_to_tensor  # noqa: E402
from minifilip.data.grounded import render_scene  # noqa: E402
from minifilip.evaluate import retrieval  # noqa: E402
from minifilip.model import FILIP  # noqa: E402
from minifilip.tokenizer import BOS_ID, EOS_ID  # noqa: E402

# name -> (what changes from the default run, extra train_small.py flags); in priority order
VARIANTS = {
    "base": ("default settings", []),
    "wd0": ("no weight decay", ["--weight-decay", "0"]),
    "lr3e-4": ("peak learning rate 3e-4 (default 1e-3)", ["--lr", "3e-4"]),
    "special": ("[BOS]/[EOS] take part in late interaction", ["--set", "text_special_tokens=true"]),
    "bidir": ("bidirectional text tower (diagnosis only)", ["--set", "text_causal=false"]),
    "shape-first": ("captions name the shape first ('a circle in red')", ["--caption-style", "shape-first"]),
    "mixed": ("captions colour-first or shape-first, drawn per mention", ["--caption-style", "mixed"]),
    "keep25": ("token selection, keep 25% (the paper's)", ["--token-keep-ratio", "0.25"]),
    "keep25img": ("token selection on the patches only, keep 25% (text tokens all kept)",
                  ["--token-keep-ratio", "0.25", "--set", "token_keep_text=false"]),
    "depth2": ("image tower 2 layers (default 4)", ["--set", "vision_layers=2"]),
    "shape-only": ("captions without colour words ('a circle')", ["--caption-style", "shape-only"]),
    "bgwords": ("captions also name the background ('... on a checkered background.')",
                ["--caption-style", "color-first+background"]),
    "patch4": ("finer patch grid: 4 px patches, 256 per image (default 8 px, 64)", ["--set", "patch_size=4"]),
}


def train_to(run_dir: str, flags: list[str], steps: int, stop: int, log) -> float:
    """Bring run_dir to step `stop` of a `steps`-step schedule through the CLI; returns the wall seconds spent."""
    ckpt = os.path.join(run_dir, "checkpoint.pt")
    if os.path.exists(ckpt):
        at = torch.load(ckpt, map_location="cpu", weights_only=True)["step"]
        if at > stop:
            raise RuntimeError(f"{ckpt} is at step {at}, past {stop}: start this variant in a fresh --out")
        cmd = ["--resume", run_dir, "--stop-at", str(stop)]
    else:
        cmd = [*flags, "--steps", str(steps), "--stop-at", str(stop), "--save-every", "500", "--device", "cpu",
               "--out", run_dir]
    t0 = time.time()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_small.py"), *cmd], cwd=ROOT, stdout=log,
                          stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"train_small.py {' '.join(cmd)} failed (exit {proc.returncode}); see the log")
    return time.time() - t0


@torch.no_grad()
def background_diagnosis(model, tokenizer, scenes) -> dict:
    """Where colour words point when they miss, and which words background patches match (image->text).

    colour_top_on_background: fraction of colour words whose most similar patch touches no object.
    pointing_among_objects: the pointing game (colour and shape words) with the background patches left out, i.e.
    does the word prefer its own object over the other objects (binding), whatever the background does.
    bg_match_<kind>: over every (background patch, caption) pair, how often the patch's best caption token is a
    colour word / shape word / [BOS] or [EOS] (when they take part) / another word; bg_best_sim / object_best_sim: the mean best-token cosine of background
    patches and of object patches (what each adds to the image->text score, the mean over patches).
    """
    model.eval()
    cfg = model.config
    images = images_to_tensor([sc.image for sc in scenes])
    patches, _ = model.encode_image(images, "tokens")  # (B, N, D)
    captions = [sc.captions[0] for sc in scenes]
    ids = tokenizer.encode(captions, cfg.context_length)
    words, mask = model.encode_text(ids, "tokens")  # (B, L, D), (B, L)
    counts = {"color": 0, "shape": 0, "special": 0, "other": 0}
    colour_total = colour_bg = among_total = among_hits = 0
    bg_sims, obj_sims = [], []
    for b, sc in enumerate(scenes):
        on_object = pointing.patch_coverage(sc.masks.any(axis=0)[None], cfg.patch_size)[0] > 0  # (N,)
        sim = patches[b] @ words[b].t()  # (N, L) patch-token cosines of the matching pair
        sim[:, ~mask[b]] = -2.0  # only tokens that take part in late interaction
        best_val, best_tok = sim.max(dim=1)  # (N,) each patch's best token
        kind_at = {g.token_index: g.kind for g in sc.groundings[0]}
        for k in torch.nonzero(~on_object)[:, 0].tolist():
            t = int(best_tok[k])
            counts["special" if int(ids[b, t]) in (BOS_ID, EOS_ID) else kind_at.get(t, "other")] += 1
        bg_sims.append(best_val[~on_object])
        obj_sims.append(best_val[on_object])
        coverage = pointing.patch_coverage(sc.masks, cfg.patch_size) > 0  # (objects, N)
        for g in sc.groundings[0]:
            if g.token_index >= cfg.context_length - 1:
                continue
            if g.kind == "color":
                colour_total += 1
                colour_bg += int(not on_object[int(sim[:, g.token_index].argmax())])
            on_objects_only = sim[:, g.token_index].masked_fill(~on_object, -3.0)  # background can't win
            among_total += 1
            among_hits += int(coverage[g.object_index, int(on_objects_only.argmax())])
    n_bg = max(1, sum(counts.values()))
    return {"colour_top_on_background": colour_bg / max(1, colour_total),
            "pointing_among_objects": among_hits / max(1, among_total),
            **{f"bg_match_{k}": v / n_bg for k, v in counts.items()}, "bg_best_sim": float(torch.cat(bg_sims).mean()),
            "object_best_sim": float(torch.cat(obj_sims).mean())}


@torch.no_grad()
def score(model, tokenizer, n: int, caption_style: str) -> dict:
    """Every number of one row: pointing, retrieval R@1, zero-shot, temperature, background diagnosis."""
    model.eval()
    size = model.config.image_size
    images, captions, scenes = builtin_val_pairs(n, size, caption_style=caption_style)
    row = {k: v for k, v in pointing.pointing_game(model, tokenizer, scenes).items()}
    shape_first = [render_scene(0, "val", i, size, "shape-first") for i in range(n)]
    row["pointing_acc_shape_shapefirst"] = pointing.pointing_game(model, tokenizer, shape_first)["pointing_acc_shape"]
    r = retrieval(model, tokenizer, images, captions, ks=(1, 5))
    row.update({f"retrieval_{k}": r[k] for k in ("i2t_R@1", "t2i_R@1", "i2t_R@5", "t2i_R@5")})
    for task in ("color", "shape"):
        zs_images, labels, names = zeroshot.builtin_zeroshot_data(task, n, size)
        row[f"zeroshot_{task}"] = zeroshot.zero_shot(model, tokenizer, zs_images, labels, names,
                                                     zeroshot.BUILTIN_TEMPLATES, warn=False)["acc"]
    row["temperature"] = 1.0 / float(model.inverse_temperature)
    row.update(background_diagnosis(model, tokenizer, scenes))
    return row


COLUMNS = [("step", "step", "{}"), ("pointing_acc", "pointing all", "{:.3f}"),
           ("pointing_acc_color", "colour", "{:.3f}"), ("pointing_acc_shape", "shape", "{:.3f}"),
           ("pointing_acc_multi", "2-3 objects", "{:.3f}"),
           ("pointing_acc_shape_shapefirst", "shape, shape-first captions", "{:.3f}"),
           ("retrieval_i2t_R@1", "R@1 i2t", "{:.3f}"), ("retrieval_t2i_R@1", "R@1 t2i", "{:.3f}"),
           ("zeroshot_color", "zs colour", "{:.3f}"), ("zeroshot_shape", "zs shape", "{:.3f}"),
           ("temperature", "temp.", "{:.3f}"), ("colour_top_on_background", "colour top patch on bg", "{:.3f}"),
           ("pointing_among_objects", "pointing, bg left out", "{:.3f}"),
           ("bg_match_color", "bg patches -> colour word", "{:.3f}"),
           ("bg_match_special", "bg patches -> [BOS]/[EOS]", "{:.3f}"), ("bg_best_sim", "bg best cos", "{:.2f}"), ("object_best_sim", "object best cos", "{:.2f}")]


def markdown(results: dict) -> str:
    head = "| variant | " + " | ".join(label for _, label, _ in COLUMNS) + " |"
    lines = [head, "|---|" + "---|" * len(COLUMNS)]
    for name, entry in results.items():
        for row in sorted(entry["rows"], key=lambda r: r["step"]):
            cells = [fmt.format(row[key]) if key in row else "-" for key, _, fmt in COLUMNS]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    notes = [f"- **{name}**: {e['what']}; `{e['command']}`" for name, e in results.items()]
    return "\n".join(lines + [""] + notes) + "\n"


def _write(path: str, text: str) -> None:
    """Atomic: a temp file renamed over the old one (two drivers may share a folder)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save(name: str, entry: dict, out: str) -> None:
    """This variant's entry as <out>/<name>.json, then results.json / results.md over every variant in <out>."""
    _write(os.path.join(out, f"{name}.json"), json.dumps(entry, indent=1))
    results = load_all(out)
    _write(os.path.join(out, "results.json"), json.dumps(results, indent=1))
    _write(os.path.join(out, "results.md"), markdown(results))


def load_all(out: str) -> dict:
    """Every variant entry saved in `out`, in VARIANTS order."""
    return {name: json.load(open(os.path.join(out, f"{name}.json"))) for name in VARIANTS
            if os.path.exists(os.path.join(out, f"{name}.json"))}


def caption_style_of(flags: list[str]) -> str:
    return flags[flags.index("--caption-style") + 1] if "--caption-style" in flags else "color-first"


def run_variant(name: str, args) -> None:
    what, flags = VARIANTS[name]
    run_dir = os.path.join(args.out, name)
    entry = load_all(args.out).get(name, {"what": what, "rows": [], "train_wall_s": {}})
    if args.rescore:  # score the kept checkpoints again (after a metric was added); trains nothing new
        entry["rows"] = []
    entry["command"] = ("python train_small.py " + " ".join(flags) + f" --steps {args.steps}").replace("  ", " ")
    done = {r["step"] for r in entry["rows"]}
    style = caption_style_of(flags)
    with open(os.path.join(args.out, f"{name}.log"), "a") as log:
        for k in args.checkpoints:
            if k in done:
                continue
            kept = os.path.join(run_dir, f"step{k}.pt")
            if not os.path.exists(kept):
                print(f"[{name}] training to step {k} of {args.steps} ...", flush=True)
                entry["train_wall_s"][str(k)] = round(train_to(run_dir, flags, args.steps, k, log), 1)
                shutil.copyfile(os.path.join(run_dir, "checkpoint.pt"), kept)
            model, tokenizer, ckpt = load_model(kept)
            entry["rows"].append({"step": int(ckpt["step"]), **score(model, tokenizer, args.n, style)})
            if 0 not in done:  # the untrained network: same config, same seed as train.py's initialisation
                torch.manual_seed(ckpt["args"]["seed"])
                entry["rows"].append({"step": 0, **score(FILIP(model.config), tokenizer, args.n, style)})
                done.add(0)
            save(name, entry, args.out)
            print(markdown({name: entry}), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                epilog="variants:\n" + "\n".join(f"  {k:12s} {w}" for k, (w, _) in VARIANTS.items()))
    p.add_argument("--variants", default="base,wd0,lr3e-4,special",
                   help="comma-separated variant names (see below), run one after the other")
    p.add_argument("--steps", type=int, default=3000, help="length of the schedule (warm-up + cosine to 0)")
    p.add_argument("--checkpoints", default="500,1000", help="comma-separated steps to stop, keep and score at")
    p.add_argument("--n", type=int, default=300, help="held-out scenes for pointing, retrieval and zero-shot")
    p.add_argument("--out", default="runs/ablate", help="folder: one run per variant, results.json, results.md")
    p.add_argument("--rescore", action="store_true", help="forget the saved scores of these variants and score "
                   "their kept stepK.pt again (missing checkpoints are still trained)")
    p.add_argument("--list", action="store_true", help="print the variants and exit")
    args = p.parse_args(argv)
    if args.list:
        print("\n".join(f"{k:12s} {w}: {' '.join(f)}" for k, (w, f) in VARIANTS.items()))
        return 0
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    try:
        args.checkpoints = sorted(int(k) for k in args.checkpoints.split(","))
    except ValueError:
        p.exit(2, f"ablate_alignment.py: error: --checkpoints takes comma-separated steps, got {args.checkpoints!r}\n")
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        p.exit(2, f"ablate_alignment.py: error: unknown variant(s) {unknown}; see --list\n")
    if not 0 < args.checkpoints[0] or args.checkpoints[-1] > args.steps or args.n < 2:
        p.exit(2, "ablate_alignment.py: error: checkpoints must lie in 1..--steps and --n must be >= 2\n")
    os.makedirs(args.out, exist_ok=True)
    for name in names:
        run_variant(name, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
