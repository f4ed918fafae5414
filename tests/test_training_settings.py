"""Training settings against hand-written values: the learning-rate schedule and which parameters decay.

lr_at and make_optimizer are called through `call_lr_at` / `call_make_optimizer` only, so a change of their
signatures touches just those two lines.
"""
import math

import pytest
import torch

from minifilip import FILIP, FILIPConfig
from minifilip.train import lr_at, make_optimizer


def call_lr_at(step: int, lr: float, warmup: int, steps: int) -> float:
    return lr_at(step, lr=lr, warmup_steps=warmup, total_steps=steps)


def call_make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return make_optimizer(model, lr=lr, weight_decay=weight_decay)


# ----------------------------------------------------------------------------------------------- schedule
def test_warmup_then_cosine_by_hand():
    """lr 1e-3, 4 warm-up steps, 12 in all: linear up over steps 0..3, then half a cosine over steps 4..12."""
    want = {0: 0.25e-3, 1: 0.5e-3, 2: 0.75e-3, 3: 1e-3,  # (step + 1) / warmup of the peak
            4: 1e-3,  # cosine starts at its top
            6: (2 + math.sqrt(2)) / 4 * 1e-3,  # a quarter of the way: (1 + cos(pi / 4)) / 2
            8: 0.5e-3,  # halfway: (1 + cos(pi / 2)) / 2
            10: (2 - math.sqrt(2)) / 4 * 1e-3,
            12: 0.0, 15: 0.0}  # the end, and past it (a resume with fewer --steps) stays at 0
    for step, lr in want.items():
        assert call_lr_at(step, 1e-3, 4, 12) == pytest.approx(lr, abs=1e-12), step


def test_no_warmup_starts_at_the_peak():
    assert call_lr_at(0, 2e-3, 0, 10) == pytest.approx(2e-3)
    assert call_lr_at(5, 2e-3, 0, 10) == pytest.approx(1e-3)


# ----------------------------------------------------------------------------------------- weight decay
DECAYED_SUFFIXES = (".qkv.weight", ".out.weight", ".mlp.0.weight", ".mlp.2.weight",  # attention and MLP matrices
                    "visual.proj.weight", "text.proj.weight")  # output projections


def test_only_transformer_and_output_matrices_decay():
    model = FILIP(FILIPConfig.preset("tiny", vision_layers=2, text_layers=1, vision_width=32, text_width=32,
                                     embed_dim=16, vocab_size=40))
    optimizer = call_make_optimizer(model, 1e-3, 0.1)
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    names = dict(model.named_parameters())
    assert len(decay_of) == sum(len(g["params"]) for g in optimizer.param_groups) == len(names)  # each once
    decayed = {n for n, p in names.items() if decay_of[id(p)] > 0}
    assert decayed == {n for n in names if n.endswith(DECAYED_SUFFIXES)}
    assert all(decay_of[id(p)] == 0.1 for n, p in names.items() if n in decayed)
    for n in ("logit_scale", "text.token_embed.weight", "text.pos", "visual.pos", "visual.cls",
              "visual.ln_pre.weight", "visual.transformer.blocks.0.ln_1.weight", "text.transformer.ln_final.bias",
              "visual.patch_embed.bias", "visual.patch_embed.weight", "text.transformer.blocks.0.mlp.0.bias"):
        assert decay_of[id(names[n])] == 0.0, n  # temperature, embeddings (token and patch), positions, norms, biases
    assert len(decayed) == 2 * 4 + 1 * 4 + 2  # 4 matrices per block, 2 output projections
