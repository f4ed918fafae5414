"""Can the tiny ViT see shapes at all? A supervised probe on the built-in scenes (issue 12).

FILIP learns the colours of the built-in scenes within a few hundred steps but not their shapes. Before blaming
the loss, ask the image tower directly: train it *with labels* to classify the one object of single-object scenes
(cross-entropy on the object's own patches, the tokens FILIP's late interaction uses), and see how fast colour and
shape are learned. If even labels cannot teach shapes in the steps a FILIP run has, the contrastive loss (where
colour already separates most in-batch pairs) will not either.

    python benchmarks/probe_shapes.py --task shape --steps 600 --lr 3e-4
    python benchmarks/probe_shapes.py --task color --steps 200
    python benchmarks/probe_shapes.py --task shape --object-scale 1.6 --patch-size 4 --json probe.json

Model: `FILIPConfig.preset("tiny")` (optionally another --patch-size); its image tower's patch tokens (unit
vectors, as FILIP uses them), averaged over the patches the object covers by at least a quarter, then a linear
head. AdamW, constant learning rate after a linear warm-up. Data: single-object train scenes, in index order; the
val set is the first --n-val single-object val scenes (disjoint from training). --object-scale multiplies the
object radii (0.10 / 0.18 of the image side) for the probe's own scenes only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minifilip.config import FILIPConfig  # noqa: E402
from minifilip.data import grounded  # noqa: E402
from minifilip.data.transforms import images_to_tensor  # noqa: E402
from minifilip.model import FILIP  # noqa: E402
from minifilip.pointing import patch_coverage  # noqa: E402

CLASSES = {"shape": grounded.SHAPES, "color": list(grounded.COLORS)}


def single_object_scenes(split: str, start: int, count: int, image_size: int):
    """The next `count` single-object scenes of `split` from index `start` on; returns (scenes, next index)."""
    scenes, i = [], start
    while len(scenes) < count:
        scene = grounded.render_scene(0, split, i, image_size)
        i += 1
        if len(scene.objects) == 1:
            scenes.append(scene)
    return scenes, i


def batch_tensors(scenes, task: str, patch_size: int):
    """images (B, 3, S, S), labels (B,), object-patch weights (B, N): 1 where the object covers >= 1/4 of a patch."""
    images = images_to_tensor([sc.image for sc in scenes])
    labels = torch.tensor([CLASSES[task].index(sc.objects[0][task]) for sc in scenes])
    cover = torch.stack([patch_coverage(sc.masks, patch_size)[0] for sc in scenes])  # (B, N)
    return images, labels, (cover >= 0.25).float()


class Probe(torch.nn.Module):
    """The FILIP image tower + a linear head over the mean of the object's patch tokens."""

    def __init__(self, config: FILIPConfig, classes: int):
        super().__init__()
        self.filip = FILIP(config)
        self.head = torch.nn.Linear(config.embed_dim, classes)

    def forward(self, images, weights):
        tokens, _ = self.filip.encode_image(images, "tokens")  # (B, N, D) unit vectors
        w = weights + 1e-6  # an object smaller than a quarter patch still gets a (uniform) average
        pooled = (tokens * w[..., None]).sum(1) / w.sum(1, keepdim=True)  # (B, D)
        return self.head(pooled)


def run(args) -> dict:
    torch.manual_seed(args.seed)
    base = dict(grounded.SIZES)
    grounded.SIZES.update({k: v * args.object_scale for k, v in base.items()})
    try:
        config = FILIPConfig.preset("tiny", patch_size=args.patch_size)
        model = Probe(config, len(CLASSES[args.task]))
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
        val = batch_tensors(single_object_scenes("val", 0, args.n_val, config.image_size)[0], args.task,
                            args.patch_size)
        rows, cursor, t0 = [], 0, time.time()
        for step in tqdm(range(1, args.steps + 1), desc=f"probe {args.task}", disable=args.quiet):
            scenes, cursor = single_object_scenes("train", cursor, args.batch_size, config.image_size)
            images, labels, weights = batch_tensors(scenes, args.task, args.patch_size)
            for group in opt.param_groups:
                group["lr"] = args.lr * min(1.0, step / max(1, args.warmup))
            loss = F.cross_entropy(model(images, weights), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % args.eval_every == 0 or step == args.steps:
                model.eval()
                with torch.no_grad():
                    acc = float((model(val[0], val[2]).argmax(1) == val[1]).float().mean())
                model.train()
                rows.append({"step": step, "train_loss": loss.item(), "val_acc": acc,
                             "seconds": round(time.time() - t0, 1)})
                if not args.quiet:
                    tqdm.write(f"step {step}: loss {loss.item():.3f}, val accuracy {acc:.3f}")
    finally:
        grounded.SIZES.update(base)
    return {"task": args.task, "chance": 1.0 / len(CLASSES[args.task]), "lr": args.lr, "warmup": args.warmup,
            "object_scale": args.object_scale, "patch_size": args.patch_size, "batch_size": args.batch_size,
            "n_val": args.n_val, "seed": args.seed, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", choices=list(CLASSES), default="shape", help="what the probe classifies")
    p.add_argument("--steps", type=int, default=600, help="training steps")
    p.add_argument("--lr", type=float, default=3e-4, help="peak AdamW learning rate (no weight decay)")
    p.add_argument("--warmup", type=int, default=40, help="linear warm-up steps")
    p.add_argument("--batch-size", type=int, default=64, help="scenes per step")
    p.add_argument("--object-scale", type=float, default=1.0, help="multiply the object radii by this")
    p.add_argument("--patch-size", type=int, default=8, help="ViT patch side (the tiny preset's image is 64 px)")
    p.add_argument("--n-val", type=int, default=300, help="held-out single-object val scenes")
    p.add_argument("--eval-every", type=int, default=100, help="score the val set every K steps")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed")
    p.add_argument("--json", default=None, help="also write the result here (refused if the file exists)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-evaluation lines")
    args = p.parse_args(argv)
    if min(args.steps, args.batch_size, args.n_val, args.eval_every, args.patch_size) < 1 or args.warmup < 0:
        p.error("--steps, --batch-size, --n-val, --eval-every and --patch-size must be >= 1, --warmup >= 0")
    if not (args.lr > 0 and 0.2 <= args.object_scale <= 2.5):
        p.error("--lr must be > 0 and --object-scale within [0.2, 2.5] (larger objects do not fit three a scene)")
    if 64 % args.patch_size:
        p.error("--patch-size must divide the 64-px image")
    if args.json and os.path.exists(args.json):
        p.error(f"{args.json} exists: choose another --json path")
    result = run(args)
    last = result["rows"][-1]
    print(f"{args.task}: val accuracy {last['val_acc']:.3f} after {last['step']} steps (chance {result['chance']:.3f})")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
