"""Symmetric InfoNCE over in-batch negatives.

For a batch of b matched pairs with score matrices indexed [image, text], the positives lie on the diagonal:

    L = 1/2 * [ CE(s_i2t / tau, rows -> diagonal) + CE(s_t2i^T / tau, rows -> diagonal) ]

With CLIP both matrices are the same cosine matrix; with FILIP they are the two late-interaction scores.
Cross-entropy works through log-softmax (logsumexp), so large logits never overflow.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(s_i2t: torch.Tensor, s_t2i: torch.Tensor, inverse_temperature: torch.Tensor) -> torch.Tensor:
    """s_i2t, s_t2i: (B, B) scores [image, text]; inverse_temperature = 1 / tau (a scalar tensor, the model's
    exp(logit_scale)): the scores are multiplied by it, so a small tau sharpens the softmax."""
    if s_i2t.dim() != 2 or s_i2t.shape[0] != s_i2t.shape[1] or s_i2t.shape != s_t2i.shape:
        raise ValueError(f"info_nce needs two square (B, B) score matrices, got {tuple(s_i2t.shape)} "
                         f"and {tuple(s_t2i.shape)}")
    labels = torch.arange(s_i2t.shape[0], device=s_i2t.device)
    loss_i2t = F.cross_entropy(inverse_temperature * s_i2t.float(), labels)  # each image picks its text
    loss_t2i = F.cross_entropy(inverse_temperature * s_t2i.float().t(), labels)  # each text picks its image
    return 0.5 * (loss_i2t + loss_t2i)
