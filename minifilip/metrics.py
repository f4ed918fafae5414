"""Retrieval metrics where identical captions count as the same answer.

Web and synthetic captions repeat ("a red circle."), so for image i every text whose caption equals caption
i is a correct answer, and for text j every image whose caption equals caption j is. Ties are scored
pessimistically: a wrong candidate with the same score as the best right one ranks ahead of it, so a model
that scores everything equally gets R@k = 0, not a lucky hit.
"""
from __future__ import annotations

import torch


def caption_groups(captions: list[str]) -> torch.Tensor:
    """(n,) long: equal ids for captions that are identical up to case and surrounding space."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(" ".join(c.lower().split()), len(ids)) for c in captions])


def ranks_of_best_match(scores: torch.Tensor, correct: torch.Tensor) -> torch.Tensor:
    """scores (Q, C), correct (Q, C) bool with at least one True per row -> (Q,) number of wrong
    candidates scoring >= the best correct one (0 = retrieved first)."""
    if not bool(correct.any(dim=1).all()):
        raise ValueError("every query needs at least one correct candidate")
    scores = scores.float()
    best = scores.masked_fill(~correct, float("-inf")).amax(dim=1, keepdim=True)  # (Q, 1)
    return ((scores >= best) & ~correct).sum(dim=1)


def retrieval_metrics(s_i2t: torch.Tensor, s_t2i: torch.Tensor, captions: list[str],
                      ks: tuple[int, ...] = (1, 5)) -> dict:
    """R@k in both directions for n matched pairs (pair i = image i, caption i).

    s_i2t ranks texts for each image (rows), s_t2i ranks images for each text (columns); both (n, n).
    chance_R@1 is the R@1 a random ranking would get in expectation: the mean share of correct candidates.
    """
    n = len(captions)
    if s_i2t.shape != (n, n) or s_t2i.shape != (n, n):
        raise ValueError(f"score matrices must be ({n}, {n}), got {tuple(s_i2t.shape)} and {tuple(s_t2i.shape)}")
    groups = caption_groups(captions)
    same = groups[:, None] == groups[None, :]  # (n, n) image i's caption equals caption j
    rank_i2t = ranks_of_best_match(s_i2t.cpu(), same)
    rank_t2i = ranks_of_best_match(s_t2i.cpu().t(), same)
    out = {}
    for k in ks:
        out[f"i2t_R@{k}"] = float((rank_i2t < k).float().mean())
        out[f"t2i_R@{k}"] = float((rank_t2i < k).float().mean())
    out["chance_R@1"] = float(same.float().sum(dim=1).mean() / n)
    out["n"] = n
    return out
