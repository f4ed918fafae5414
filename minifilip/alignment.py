"""Word-patch alignment over training: a small fixed held-out set, scored every `--eval-every` steps.

FILIP's promise is that words learn *where* they are. Retrieval alone cannot show whether that holds as training
goes on, so with `train_small.py --eval-every K` the run scores, every K steps (and at step 0: the untrained
network of the same architecture and seed, the baseline that says what the architecture gives for free):

    val_pointing_acc (_color, _shape, _multi)   pointing game on held-out built-in scenes (pointing.py)
    val_i2t_R@1, val_t2i_R@1                    retrieval on the same held-out pairs (evaluate.retrieval)
    temperature                                 the learned tau

Each evaluation is one line in metrics.jsonl; `plot_alignment` draws them as alignment.png, and the checkpoint
with the best mean R@1 is kept as best.pt (long runs on small data over-fit). On real data only retrieval is
scored: the pointing game needs the built-in ground truth.
"""
from __future__ import annotations

import contextlib
import json
import os

import torch

from .evaluate import retrieval
from .pointing import pointing_game

POINTING_KEYS = ("pointing_acc", "pointing_acc_color", "pointing_acc_shape", "pointing_acc_multi")
RETRIEVAL_KEYS = ("val_i2t_R@1", "val_t2i_R@1")


class AlignmentTracker:
    """Scores a model on fixed held-out data: images (n, 3, S, S), their captions, and the built-in scenes they
    were rendered from (None for real data: retrieval only)."""

    def __init__(self, tokenizer, images: torch.Tensor, captions: list[str], scenes=None, batch_size: int = 256,
                 autocast=contextlib.nullcontext):
        self.tokenizer, self.images, self.captions, self.scenes = tokenizer, images, captions, scenes
        self.batch_size, self.autocast = batch_size, autocast

    @torch.no_grad()
    def measure(self, model) -> dict:
        """One row of metrics; the model is scored in eval mode and handed back in the mode it came in."""
        was_training = model.training
        r = retrieval(model, self.tokenizer, self.images, self.captions, self.batch_size, ks=(1,),
                      autocast=self.autocast)
        row = {"val_i2t_R@1": r["i2t_R@1"], "val_t2i_R@1": r["t2i_R@1"]}
        if self.scenes is not None:
            with self.autocast():
                p = pointing_game(model, self.tokenizer, self.scenes, batch_size=self.batch_size)
            row.update({f"val_{k}": p[k] for k in POINTING_KEYS if k in p})
            row.update({f"val_{k.replace('acc', 'chance')}": p[k.replace("acc", "chance")] for k in POINTING_KEYS
                        if k.replace("acc", "chance") in p})
        row["temperature"] = 1.0 / float(model.inverse_temperature)
        model.train(was_training)
        return row


def retrieval_score(row: dict) -> float:
    """What best.pt maximises: the mean held-out R@1 of both directions."""
    return 0.5 * (row["val_i2t_R@1"] + row["val_t2i_R@1"])


def eval_rows(metrics_path: str) -> list[dict]:
    """The evaluation lines of a metrics.jsonl, in step order."""
    if not os.path.exists(metrics_path):
        return []
    rows = [json.loads(line) for line in open(metrics_path) if line.strip()]
    return [r for r in rows if "val_i2t_R@1" in r]


def summary(rows: list[dict]) -> dict:
    """For final.json: the untrained network (step 0), the best row by retrieval, and the last row."""
    if not rows:
        return {}
    out = {"best": max(rows, key=retrieval_score), "last": rows[-1]}
    if rows[0]["step"] == 0:
        out["untrained"] = rows[0]
    return out


def plot_alignment(metrics_path: str, png_path: str) -> None:
    """alignment.png: pointing game and retrieval R@1 over training (left), the temperature (right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = eval_rows(metrics_path)
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, (ax, ax_t) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [2.2, 1]})
    curves = [("val_pointing_acc", "pointing, all words", "-"),
              ("val_pointing_acc_color", "pointing, colour words", "--"),
              ("val_pointing_acc_shape", "pointing, shape words", ":"),
              ("val_pointing_acc_multi", "pointing, 2-3 objects", "-."),
              ("val_i2t_R@1", "R@1 image->text", "-"), ("val_t2i_R@1", "R@1 text->image", "--")]
    for key, label, style in curves:
        if key in rows[-1]:
            ax.plot(steps, [r[key] for r in rows], style, marker=".", label=label)
    if "val_pointing_chance" in rows[-1]:
        ax.axhline(rows[-1]["val_pointing_chance"], color="grey", lw=0.8, label="pointing chance")
    ax.set_xlabel("step"), ax.set_ylim(0, 1), ax.grid(alpha=0.3)
    ax.set_title("held-out alignment (step 0 = the untrained network)")
    ax.legend(fontsize=7, ncol=2)
    ax_t.plot(steps, [r["temperature"] for r in rows], marker=".")
    ax_t.set_xlabel("step"), ax_t.set_title("temperature"), ax_t.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
