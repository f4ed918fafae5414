"""The fused selection-ranking kernel (minifilip/kernels/ranking_triton.py) against the chunked PyTorch ranking and a
plain full-matrix reference, in Triton's CPU interpreter (fp32, small sizes; a subprocess, as in test_cmli_impls)."""
import textwrap

import pytest
import torch

from minifilip.cmli import select_tokens, token_max_similarity
from tests.test_cmli_impls import run_in_interpreter
from tests.test_token_selection import make_batch

RANKING_SCRIPT = textwrap.dedent("""
    import inspect, math, sys
    import torch
    from minifilip.cmli import select_tokens, token_max_similarity
    from minifilip.kernels import ranking_triton
    from tests.test_token_selection import make_batch
    assert ranking_triton.INTERPRET

    # batch and lengths are runtime arguments: one compiled kernel for every batch shape
    params = inspect.signature(ranking_triton._ranking_kernel.fn).parameters
    assert all("constexpr" not in str(params[n].annotation) for n in ("R", "C")), params

    def plain(v, im, w, tm):
        # the whole flat score matrix at once
        s = v.flatten(0, 1).double() @ w.flatten(0, 1).double().T  # (I*N, T*M)
        s = s.masked_fill(~tm.flatten()[None, :], -math.inf).masked_fill(~im.flatten()[:, None], -math.inf)
        return s.amax(dim=1).view(im.shape), s.amax(dim=0).view(tm.shape)

    def close(a, b):
        same_inf = torch.equal(torch.isinf(a), torch.isinf(b)) and bool((a[torch.isinf(a)] < 0).all())
        ok = torch.isfinite(b)
        err = ((a[ok].double() - b[ok].double()).norm() / b[ok].double().norm().clamp_min(1e-30)).item()
        return same_inf, err

    worst = 0.0
    # (BLOCK_R, BLOCK_C, BLOCK_D): several row and column blocks with tails; BLOCK_D >= D: rows loaded once
    for tiles in [(16, 16, 16), (32, 16, 64)]:
        ranking_triton.CONFIG.update(BLOCK_R=tiles[0], BLOCK_C=tiles[1], BLOCK_D=tiles[2])
        for (B, N, M, D, seed, negative) in [(5, 13, 7, 24, 0, False), (3, 40, 9, 16, 1, True),
                                             (4, 5, 3, 40, 2, False)]:
            v, im, w, tm = make_batch(B, N, M, D, seed=seed)  # padding holds bait vectors (10.0 everywhere)
            v, w = v.detach(), w.detach()
            if negative:  # every valid score < 0: a padding slot that scored 0 instead of -inf would win
                v, w = v.abs(), -w.abs()
            im[1] = False  # a fully padded image and text: -inf everywhere, no effect on the others
            tm[B - 1] = False
            v[~im] = float("nan")  # NaN in padding must not reach a score either
            ref = plain(torch.where(im[..., None], v, 0.0), im, torch.where(tm[..., None], w, 0.0), tm)
            fused = token_max_similarity(v, im, w, tm, impl="triton")
            chunked = token_max_similarity(v, im, w, tm, impl="chunked", max_chunk_bytes=4 * 3 * B * M)
            for name, out in (("triton", fused), ("chunked", chunked)):
                for o, r in zip(out, ref):
                    assert o.dtype == torch.float32 and o.shape == r.shape
                    same_inf, err = close(o, r)
                    assert same_inf, (name, tiles, B, N, M, D)
                    worst = max(worst, err)
            print(tiles, (B, N, M, D), "ok")

        # select_tokens: the same kept tokens whichever ranking runs (no fully padded rows: selection rejects them)
        for ratio, text_ratio in [(0.25, None), (0.5, 1.0)]:
            v, im, w, tm = make_batch(6, 17, 9, 16, seed=7)
            a = select_tokens(v, im, w, tm, ratio, text_ratio, impl="triton")
            b = select_tokens(v, im, w, tm, ratio, text_ratio, impl="chunked")
            assert all(torch.equal(x, y) for x, y in zip(a, b)), (ratio, text_ratio)
    print("worst", worst)
    sys.exit(0 if worst <= 1e-6 else 1)
""")


def test_ranking_kernel_in_interpreter():
    run_in_interpreter(RANKING_SCRIPT, kernel="the fused Triton ranking kernel")


def test_ranking_impl_dispatch():
    """CPU tensors: auto is the chunked ranking; unknown impls are refused; triton without CUDA or the
    interpreter is refused with a pointer to impl='chunked'."""
    v, im, w, tm = make_batch(3, 5, 4, 8, seed=0)
    v, w = v.detach(), w.detach()
    auto = token_max_similarity(v, im, w, tm)
    chunked = token_max_similarity(v, im, w, tm, impl="chunked")
    assert all(torch.equal(a, b) for a, b in zip(auto, chunked))
    assert all(torch.equal(a, b) for a, b in zip(select_tokens(v, im, w, tm, 0.5),
                                                 select_tokens(v, im, w, tm, 0.5, impl="chunked")))
    with pytest.raises(ValueError, match="unknown ranking impl"):
        token_max_similarity(v, im, w, tm, impl="fastest")
    from minifilip.kernels import load_ranking_triton
    ranking = load_ranking_triton()
    if ranking is not None and not ranking.INTERPRET:
        with pytest.raises(ValueError, match="chunked"):
            token_max_similarity(v, im, w, tm, impl="triton")


def test_order_preserving_encoding():
    """The int32 keys of the column atomics sort exactly as the floats do, and decode back bit for bit."""
    pytest.importorskip("triton")
    from minifilip.kernels.ranking_triton import decode_torch, encode_torch
    x = torch.cat([torch.randn(2000) * 10 ** torch.randint(-30, 30, (2000,)).float(),
                   torch.tensor([0.0, float("inf"), -float("inf"), 1e-45, -1e-45, 3.4e38, -3.4e38])])
    key = encode_torch(x)
    assert torch.equal(decode_torch(key).view(torch.int32), x.view(torch.int32))
    k = key[torch.argsort(x)]
    assert bool((k[1:] >= k[:-1]).all())
    assert encode_torch(torch.tensor([-float("inf")])) < encode_torch(torch.tensor([-3.4e38]))
    zeros = encode_torch(torch.tensor([-0.0, 0.0]))  # -0.0 below +0.0: the max of the two is the value 0 either way
    assert zeros[0] < zeros[1] and torch.equal(decode_torch(zeros).view(torch.int32),
                                               torch.tensor([-0.0, 0.0]).view(torch.int32))
