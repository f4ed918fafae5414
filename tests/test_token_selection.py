"""FILIP token selection: the kept tokens are the brute-force top ones, padding never kept, gradients flow."""
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from minifilip.cmli import keep_count, late_interaction, select_tokens, token_max_similarity


def make_batch(B, N, M, D, seed, image_padding=True):
    """Random tokens with random padding; padding rows are huge vectors aligned with everything, so any padding
    that leaked into the ranking would win it."""
    g = torch.Generator().manual_seed(seed)
    v = F.normalize(torch.randn(B, N, D, generator=g), dim=-1)
    w = F.normalize(torch.randn(B, M, D, generator=g), dim=-1)
    tm = torch.rand(B, M, generator=g) < 0.6
    tm[:, 0] = True
    im = torch.rand(B, N, generator=g) < 0.7 if image_padding else torch.ones(B, N, dtype=torch.bool)
    im[:, -1] = True
    bait = torch.full((D,), 10.0)
    v = torch.where(im[..., None], v, bait).requires_grad_()
    w = torch.where(tm[..., None], w, bait).requires_grad_()
    return v, im, w, tm


def brute_force_keep(tokens, mask, other, other_mask, ratio):
    """Per row, the original positions of the top ceil(ratio * n_valid) valid tokens by max similarity over all
    valid tokens of the other modality, from the full flat score matrix."""
    s = torch.einsum("bnd,cmd->bncm", tokens, other).detach()
    s = s.masked_fill(~other_mask[None, None], -math.inf).amax(dim=(2, 3))  # (B, N)
    keep = []
    for b in range(tokens.shape[0]):
        valid = mask[b].nonzero().flatten()
        k = max(1, math.ceil(Fraction(str(ratio)) * len(valid)))  # exact: 0.3 of 10 is 3
        order = sorted(valid.tolist(), key=lambda n: -s[b, n].item())
        keep.append(sorted(order[:k]))
    return keep


def symmetric_loss(v, im, w, tm, impl="chunked"):
    s_i2t, s_t2i = late_interaction(v, im, w, tm, impl=impl)
    target = torch.arange(v.shape[0])
    return 0.5 * (F.cross_entropy(10 * s_i2t, target) + F.cross_entropy(10 * s_t2i.T, target))


def test_ratio_one_is_no_selection():
    v, im, w, tm = make_batch(6, 9, 7, 8, seed=0)
    out = select_tokens(v, im, w, tm, ratio=1.0)
    assert out[0] is v and out[1] is im and out[2] is w and out[3] is tm
    assert torch.equal(symmetric_loss(*out), symmetric_loss(v, im, w, tm))
    assert select_tokens(v, None, w, tm, ratio=1.0)[1] is None


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.9])
@pytest.mark.parametrize("image_padding", [True, False])
def test_kept_tokens_are_the_top_ones(ratio, image_padding):
    B, N, M, D = 7, 11, 6, 8
    v, im, w, tm = make_batch(B, N, M, D, seed=int(ratio * 100), image_padding=image_padding)
    img, img_mask, txt, txt_mask = select_tokens(v, im if image_padding else None, w, tm, ratio)
    for tokens, mask, kept, kept_mask, other, other_mask in [(v, im, img, img_mask, w, tm),
                                                              (w, tm, txt, txt_mask, v, im)]:
        expected = brute_force_keep(tokens, mask, other, other_mask, ratio)
        assert kept.shape == (B, max(map(len, expected)), D) and kept_mask.dtype == torch.bool
        for b, positions in enumerate(expected):
            k = len(positions)
            assert kept_mask[b].tolist() == [True] * k + [False] * (kept.shape[1] - k)
            assert torch.equal(kept[b, :k], tokens[b, positions])  # the top tokens, original order
            assert torch.all(kept[b, k:] == 0)  # padding slots hold zeros, never a padding token
            assert not torch.any(kept[b, :k] == 10.0)  # no bait (padding) token kept


def test_small_budget_ranking_matches_full():
    v, im, w, tm = make_batch(5, 13, 7, 8, seed=4)
    full = token_max_similarity(v, im, w, tm)
    tiny = token_max_similarity(v, im, w, tm, max_chunk_bytes=64)  # 1 row per chunk
    # same maxima (up to BLAS rounding: a different row count may pick a different matmul kernel)
    assert all(torch.allclose(a, b, rtol=1e-6, atol=1e-6) for a, b in zip(full, tiny))
    assert torch.isinf(full[0][~im]).all() and torch.isfinite(full[0][im]).all()


def test_at_least_one_token_kept():
    v, im, w, tm = make_batch(4, 9, 5, 8, seed=2)
    tm[:] = False
    tm[:, 2] = True  # every text has one valid token
    img, img_mask, txt, txt_mask = select_tokens(v, im, w, tm, ratio=0.01)
    assert txt_mask.sum(1).tolist() == [1] * 4 and img_mask.sum(1).tolist() == [1] * 4
    assert torch.equal(txt[:, 0], w[:, 2])


def test_gradients_flow_to_kept_tokens_only():
    v, im, w, tm = make_batch(6, 10, 8, 8, seed=3)
    sel = select_tokens(v, im, w, tm, ratio=0.3)
    dv, dw = torch.autograd.grad(symmetric_loss(*sel), [v, w])
    for grad, tokens, kept, kept_mask in [(dv, v, sel[0], sel[1]), (dw, w, sel[2], sel[3])]:
        touched = grad.abs().sum(-1) > 0  # (B, L)
        assert touched.any()
        assert not touched[~(im if tokens is v else tm)].any()  # padding gets no gradient
        assert (touched.sum(1) <= kept_mask.sum(1)).all()  # only kept tokens can receive it


def test_invalid_ratio_raises():
    v, im, w, tm = make_batch(2, 4, 3, 8, seed=0)
    for ratio in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="ratio"):
            select_tokens(v, im, w, tm, ratio)
    with pytest.raises(ValueError, match="no valid token"):
        select_tokens(v, im, w, torch.zeros_like(tm), 0.5)


def test_keep_count_is_exact_for_every_length():
    """ceil(ratio * n) with ratio read as the decimal it was written as: float products would keep one too many
    (0.3 * 100 = 30.000000000000004 -> 31; in float32 26 counts for n <= 256 were wrong)."""
    n = torch.arange(1, 257)
    for tenths in range(1, 10):
        ratio = tenths / 10
        expected = [max(1, math.ceil(Fraction(tenths, 10) * k)) for k in range(1, 257)]
        assert keep_count(n, ratio).tolist() == expected, ratio
    assert keep_count(torch.tensor([100]), 0.3).item() == 30
    assert keep_count(torch.tensor([25]), 0.6).item() == 15
    assert keep_count(torch.tensor([7]), 0.25).item() == 2
