"""Pointing game on synthetic 'oracle' embeddings: no trained model needed."""
import numpy as np
import torch
import torch.nn.functional as F

from minifilip.pointing import patch_coverage, pointing_hits

S, P = 16, 4  # 16x16 image, 4x4 patches -> a 4x4 grid of 16 patches


def _setup():
    mask = np.zeros((S, S), bool)
    mask[4:8, 8:12] = True  # exactly patch (row 1, col 2) = index 6
    patches = F.normalize(torch.randn(16, 8), dim=-1)
    return mask, patches


def test_patch_coverage_counts_pixels_per_patch():
    mask, _ = _setup()
    mask[0, 0] = True  # one pixel of patch 0
    cov = patch_coverage(mask[None], P)[0]
    assert cov.shape == (16,)
    assert cov[6] == 1.0 and abs(float(cov[0]) - 1 / 16) < 1e-6 and cov.sum() == 1.0 + 1 / 16


def test_oracle_pointing_inside_scores_one_and_outside_zero():
    mask, patches = _setup()
    G = 5
    masks = np.repeat(mask[None], G, axis=0)
    img = patches[None].expand(G, -1, -1)  # (G, N, D)
    inside = patches[6][None].expand(G, -1)  # word embedding equal to the object's patch
    hit, chance = pointing_hits(img, inside, masks, P)
    assert hit.all() and torch.allclose(chance, torch.full((G,), 1 / 16))
    outside = patches[torch.tensor([0, 3, 9, 12, 15])]  # each word equals a background patch
    hit, _ = pointing_hits(img, outside, masks, P)
    assert not hit.any()


def test_any_overlap_counts_as_inside_and_min_overlap_tightens_it():
    mask, patches = _setup()
    mask[4:8, 7] = True  # a 1-pixel-wide sliver into patch 5 (4 of its 16 pixels)
    word = patches[5][None]
    assert pointing_hits(patches[None], word, mask[None], P)[0].item()
    assert not pointing_hits(patches[None], word, mask[None], P, min_overlap=0.5)[0].item()
    # the chance level follows the same rule: 2 of 16 patches overlap at all, 1 by more than half
    assert abs(float(pointing_hits(patches[None], word, mask[None], P)[1]) - 2 / 16) < 1e-6
    assert abs(float(pointing_hits(patches[None], word, mask[None], P, min_overlap=0.5)[1]) - 1 / 16) < 1e-6
