"""Chunked cross-modal late interaction in plain PyTorch: exact CMLI with bounded memory.

The readable reference (minifilip/cmli.py) materialises every score of every (image, text) pair at once, an
(I, T, N, M) tensor: 13 GB at batch 1024 in bf16. This version walks (image-chunk x text-chunk) blocks, so no more
than one chunk of scores is ever alive, and has a custom backward: the max passes its gradient only to its
arg-max, so the forward keeps the arg-max indices (I*T*(N+M) small ints) instead of the scores.

Axis letters: i images, t texts, n patches, m tokens, d embedding dim.
Inputs arrive validated and with padding zeroed by `cmli.late_interaction`: v (I, N, D), v_mask (I, N) bool,
w (T, M, D), w_mask (T, M) bool. Scores accumulate in float32 (float64 for float64 inputs, so gradcheck can probe).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import einsum, rearrange

DEFAULT_MAX_CHUNK_BYTES = 128 * 2**20  # one fp32 score chunk; peak extra memory is a few chunks + the indices

# Devices whose backward uses gathers (`_chunk_grad_gather`) instead of the dense score gradient + 2 matmuls.
# CPU: the gathers touch I*T*(N+M) rows instead of doing 2*I*T*N*M*D FLOPs, 4.6x faster backward at the CPU
# training size (benchmarks/RESULTS.md). CUDA keeps the dense path: there the matmuls run on tensor cores.
GATHER_BACKWARD_DEVICES = ("cpu",)


def index_dtype(n: int) -> torch.dtype:
    """Smallest integer dtype holding 0..n-1: the stored arg-max indices cost I*T*(N+M) of these."""
    return torch.uint8 if n <= 256 else (torch.int16 if n <= 32767 else torch.int32)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for 16-bit inputs (scores summed in fp32, like the Triton kernel), float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def chunk_plan(I: int, T: int, N: int, M: int, max_chunk_bytes: int) -> tuple[int, int]:
    """(images, texts) per chunk so that no chunk-sized intermediate exceeds max_chunk_bytes.

    Per (image, text) pair the largest intermediates are the fp32 scores (4*N*M bytes) and torch.max's int64
    indices (8*N or 8*M bytes). At least one pair per chunk, whatever the budget.
    """
    pair_bytes = max(4 * N * M, 8 * N, 8 * M)
    pairs = max(1, max_chunk_bytes // pair_bytes)
    ct = min(T, pairs)
    ci = max(1, min(I, pairs // ct))
    return ci, ct


def _chunk_maxima(v, v_mask, w, w_mask):
    """Both maxima of one chunk: v (ci, N, D), w (ct, M, D) -> best token of each patch (ci, ct, N) and best patch
    of each token (ci, ct, M), values and arg-maxes."""
    acc = acc_dtype(v.dtype)
    s = einsum(v.to(acc), w.to(acc), "i n d, t m d -> i t n m")  # (ci, ct, N, M), the only chunk-sized tensor
    neg_inf = torch.finfo(s.dtype).min
    # in place, in this order: padding tokens never win a patch's max, padding patches never win a token's max
    # (the text fill also hits padding tokens' columns, which no mean and no gradient reads)
    best_tok, arg_tok = s.masked_fill_(~rearrange(w_mask, "t m -> 1 t 1 m"), neg_inf).max(dim=3)
    best_patch, arg_patch = s.masked_fill_(~rearrange(v_mask, "i n -> i 1 n 1"), neg_inf).max(dim=2)
    return best_tok, arg_tok, best_patch, arg_patch


def _masked_mean(best: torch.Tensor, mask: torch.Tensor, n_valid: torch.Tensor) -> torch.Tensor:
    """Mean over the last axis of the valid entries only: padding is *selected* out (never multiplied by 0, which
    would turn an inf at padding into NaN)."""
    return torch.where(mask, best, 0.0).sum(dim=-1) / n_valid


def _chunk_score_grad(arg_tok, arg_patch, g_patch, g_token, v_mask, w_mask, N, M, dtype):
    """Dense gradient of one chunk's scores: the max passes it only to its arg-max. -> (ci, ct, N, M)."""
    ci, ct = g_patch.shape
    p = torch.zeros(ci, ct, N, M, device=g_patch.device, dtype=g_patch.dtype)
    a = torch.where(rearrange(v_mask, "i n -> i 1 n"), g_patch[:, :, None], 0.0)  # (ci, ct, N) valid patches
    b = torch.where(rearrange(w_mask, "t m -> 1 t m"), g_token[:, :, None], 0.0)  # (ci, ct, M) valid tokens
    p.scatter_(3, arg_tok.long()[..., None], a[..., None])  # one token per patch row
    p.scatter_add_(2, arg_patch.long()[:, :, None, :], b[:, :, None, :])  # one patch per token column (may collide)
    return p.to(dtype)


def _grouped_bags(keys, n_groups, n_bags_per_group):
    """Sort each row of keys (G, L) (values < n_bags_per_group) -> (order (G, L), offsets (G*n_bags,)): the flat
    start of each bag (group g, key k) in the row-major order, as embedding_bag wants them."""
    sorted_keys, order = torch.sort(keys, dim=1)
    bounds = torch.arange(n_bags_per_group, device=keys.device, dtype=sorted_keys.dtype)
    starts = torch.searchsorted(sorted_keys, bounds.expand(n_groups, -1).contiguous())  # (G, n_bags)
    starts = starts + keys.shape[1] * torch.arange(n_groups, device=keys.device)[:, None]
    return order, starts.reshape(-1)


def _chunk_grad_gather(v, w, arg_tok, arg_patch, g_patch, g_token, v_mask, w_mask):
    """(dV chunk (ci, N, D), dW chunk (ct, M, D)) of one chunk without the dense score gradient.

    The score gradient has one entry per (patch, text) row (a at the patch's best token) and one per (token, image)
    column (b at the token's best patch). Each of dV, dW gets one gather term (a fixed-size bag per output row:
    embedding_bag) and one scatter term (rows grouped by target with a sort, then embedding_bag with offsets).
    """
    ci, ct, N = arg_tok.shape
    M, D = arg_patch.shape[2], v.shape[2]
    acc, dev = g_patch.dtype, v.device
    v_flat, w_flat = v.reshape(ci * N, D).to(acc), w.reshape(ct * M, D).to(acc)
    a = torch.where(v_mask[:, None, :], g_patch[:, :, None], 0.0)  # (ci, ct, N): weight of each patch's best token
    b = torch.where(w_mask[None, :, :], g_token[:, :, None], 0.0)  # (ci, ct, M): weight of each token's best patch
    arg_tok, arg_patch = arg_tok.long(), arg_patch.long()
    # dV, gather: patch (i, n) takes a[i, t, n] * w[t, arg_tok[i, t, n]] from every text t
    tok_row = arg_tok + M * torch.arange(ct, device=dev)[None, :, None]  # (ci, ct, N): row of w_flat
    dv = F.embedding_bag(rearrange(tok_row, "i t n -> (i n) t"), w_flat, mode="sum",
                         per_sample_weights=rearrange(a, "i t n -> (i n) t").contiguous())
    # dW, gather: token (t, m) takes b[i, t, m] * v[i, arg_patch[i, t, m]] from every image i
    patch_row = arg_patch + N * torch.arange(ci, device=dev)[:, None, None]  # (ci, ct, M): row of v_flat
    dw = F.embedding_bag(rearrange(patch_row, "i t m -> (t m) i"), v_flat, mode="sum",
                         per_sample_weights=rearrange(b, "i t m -> (t m) i").contiguous())
    # dV, scatter: patch (i, n) also takes b[i, t, m] * w[t, m] for every token whose best patch it is
    order, offsets = _grouped_bags(rearrange(arg_patch, "i t m -> i (t m)"), ci, N)  # order: flat (t m) index
    weights = torch.gather(rearrange(b, "i t m -> i (t m)"), 1, order)
    dv += F.embedding_bag(order.reshape(-1), w_flat, offsets, mode="sum", per_sample_weights=weights.reshape(-1))
    # dW, scatter: token (t, m) also takes a[i, t, n] * v[i, n] for every patch whose best token it is
    order, offsets = _grouped_bags(rearrange(arg_tok, "i t n -> t (i n)"), ct, M)  # order: flat (i n) index
    weights = torch.gather(rearrange(a, "i t n -> t (i n)"), 1, order)
    dw += F.embedding_bag(order.reshape(-1), v_flat, offsets, mode="sum", per_sample_weights=weights.reshape(-1))
    return dv.view(ci, N, D), dw.view(ct, M, D)


class ChunkedLateInteraction(torch.autograd.Function):
    """CMLI in (image-chunk x text-chunk) blocks: never more than one chunk of the (I, T, N, M) scores alive.

    backward="indices" (default) stores the arg-maxes (I*T*(N+M) small ints) and rebuilds each chunk's sparse
    score gradient from them; backward="recompute" stores nothing and recomputes each chunk's scores. Indices is
    kept as the default: it skips a whole score matmul + two max passes per chunk, 1.6x faster fwd+bwd on an
    H100 and 1.3-1.6x on CPU (benchmarks/RESULTS.md), for I*T*(N+M) bytes (240 MB at batch 1024, where its peak
    is still 0.71 GiB). Recompute is the choice only when even those bytes matter (batch 4096: 1.8 vs 5.3 GiB).
    """

    @staticmethod
    def forward(ctx, v, v_mask, w, w_mask, max_chunk_bytes, backward_mode):
        (I, N, _), (T, M, _) = v.shape, w.shape
        ci, ct = chunk_plan(I, T, N, M, max_chunk_bytes)
        acc = acc_dtype(v.dtype)
        n_patches = v_mask.sum(dim=1).to(acc)  # (I,) valid patches per image
        n_tokens = w_mask.sum(dim=1).to(acc)  # (T,) valid tokens per text
        s_i2t = torch.empty(I, T, device=v.device, dtype=acc)
        s_t2i = torch.empty(I, T, device=v.device, dtype=acc)
        keep = backward_mode == "indices"
        if keep:
            best_tok_idx = torch.empty(I, T, N, device=v.device, dtype=index_dtype(M))
            best_patch_idx = torch.empty(I, T, M, device=v.device, dtype=index_dtype(N))
        for i0 in range(0, I, ci):
            ii = slice(i0, i0 + ci)
            for t0 in range(0, T, ct):
                tt = slice(t0, t0 + ct)
                best_tok, arg_tok, best_patch, arg_patch = _chunk_maxima(v[ii], v_mask[ii], w[tt], w_mask[tt])
                s_i2t[ii, tt] = _masked_mean(best_tok, rearrange(v_mask[ii], "i n -> i 1 n"), n_patches[ii, None])
                s_t2i[ii, tt] = _masked_mean(best_patch, rearrange(w_mask[tt], "t m -> 1 t m"), n_tokens[None, tt])
                if keep:
                    best_tok_idx[ii, tt], best_patch_idx[ii, tt] = arg_tok, arg_patch
        indices = (best_tok_idx, best_patch_idx) if keep else ()
        ctx.save_for_backward(v, v_mask, w, w_mask, n_patches, n_tokens, *indices)
        ctx.plan, ctx.keep = (ci, ct), keep
        return s_i2t, s_t2i

    @staticmethod
    def backward(ctx, g_i2t, g_t2i):
        v, v_mask, w, w_mask, n_patches, n_tokens, *indices = ctx.saved_tensors
        (I, N, D), (T, M, _), (ci, ct) = v.shape, w.shape, ctx.plan
        acc = n_patches.dtype
        g_i2t = torch.zeros(I, T, device=v.device, dtype=acc) if g_i2t is None else g_i2t.to(acc)
        g_t2i = torch.zeros(I, T, device=v.device, dtype=acc) if g_t2i is None else g_t2i.to(acc)
        g_patch = g_i2t / n_patches[:, None]  # (I, T): d s_i2t / d (best token score of a valid patch)
        g_token = g_t2i / n_tokens[None, :]  # (I, T): d s_t2i / d (best patch score of a valid token)
        # fp32 (or fp64) accumulators: many chunks add into the same rows
        dv = torch.zeros(I, N, D, device=v.device, dtype=acc)
        dw = torch.zeros(T, M, D, device=v.device, dtype=acc)
        gather = v.device.type in GATHER_BACKWARD_DEVICES
        for i0 in range(0, I, ci):
            ii = slice(i0, i0 + ci)
            for t0 in range(0, T, ct):
                tt = slice(t0, t0 + ct)
                if ctx.keep:
                    arg_tok, arg_patch = indices[0][ii, tt], indices[1][ii, tt]
                else:
                    _, arg_tok, _, arg_patch = _chunk_maxima(v[ii], v_mask[ii], w[tt], w_mask[tt])
                args = (arg_tok, arg_patch, g_patch[ii, tt], g_token[ii, tt], v_mask[ii], w_mask[tt])
                if gather:
                    dv_chunk, dw_chunk = _chunk_grad_gather(v[ii], w[tt], *args)
                else:
                    # (ci, ct, N, M) in the input dtype: on CUDA these two matmuls run on tensor cores
                    p = _chunk_score_grad(*args, N, M, v.dtype)
                    dv_chunk = einsum(p, w[tt], "i t n m, t m d -> i n d")
                    dw_chunk = einsum(p, v[ii], "i t n m, i n d -> t m d")
                dv[ii] += dv_chunk
                dw[tt] += dw_chunk
        return dv.to(v.dtype), None, dw.to(w.dtype), None, None, None


def late_interaction_chunked(image_tokens, image_mask, text_tokens, text_mask,
                             max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
                             backward: str = "indices") -> tuple[torch.Tensor, torch.Tensor]:
    """(s_i2t, s_t2i) (I, T) with no intermediate larger than max_chunk_bytes (>= one pair).

    Memory: inputs + I*T*(N+M) bytes of arg-max indices (backward="indices") + a few chunks. Expects boolean masks
    (image_mask may not be None here) and zeroed padding, as `cmli.late_interaction` hands them over.
    """
    if backward not in ("indices", "recompute"):
        raise ValueError(f"backward must be 'indices' or 'recompute', got {backward!r}")
    if image_tokens.dtype != text_tokens.dtype:
        raise ValueError(f"dtypes differ: {image_tokens.dtype} vs {text_tokens.dtype}")
    return ChunkedLateInteraction.apply(image_tokens, image_mask, text_tokens, text_mask, int(max_chunk_bytes),
                                        backward)
