"""Cross-modal late interaction (CMLI), the heart of FILIP.

For image i (patches v_ik, k over its N valid patches) and text j (tokens w_jl, l over its M_j valid tokens),
all L2-normalised:

    image -> text:  s_i2t[i, j] = 1/N   * sum_k max_l <v_ik, w_jl>
    text -> image:  s_t2i[i, j] = 1/M_j * sum_l max_k <v_ik, w_jl>

Both matrices are indexed [image, text]. They are *not* transposes of each other. Padding never takes part:
it is set to -inf before a max and left out of a mean. The image CLS token is never passed in here.

`late_interaction_reference` is the readable version that materialises the whole (I, T, N, M) score tensor;
it is the ground truth every faster implementation is tested against. `late_interaction(..., impl=...)` picks one:
"chunked" (PyTorch, one bounded chunk of scores at a time, arg-max backward), "triton" (fused kernel in
minifilip/kernels/cmli_triton.py: scores never leave the chip) or "auto". `select_tokens` is FILIP's token
selection, run before CMLI to keep each image's and text's most informative tokens.
"""
from __future__ import annotations

import torch
from einops import einsum, rearrange


def check_inputs(image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor,
                 image_mask: torch.Tensor | None) -> torch.Tensor:
    """Validate shapes and masks; returns a boolean image mask (all True when none was given)."""
    if image_tokens.dim() != 3 or text_tokens.dim() != 3:
        raise ValueError(f"image_tokens and text_tokens must be 3-D (batch, tokens, dim); got shapes "
                         f"{tuple(image_tokens.shape)} and {tuple(text_tokens.shape)}")
    if image_tokens.shape[-1] != text_tokens.shape[-1]:
        raise ValueError(f"embedding dims differ: image {image_tokens.shape[-1]} vs text {text_tokens.shape[-1]}")
    if tuple(text_mask.shape) != tuple(text_tokens.shape[:2]):
        raise ValueError(f"text_mask must have shape {tuple(text_tokens.shape[:2])}, got {tuple(text_mask.shape)}")
    if image_mask is None:
        image_mask = torch.ones(image_tokens.shape[:2], dtype=torch.bool, device=image_tokens.device)
    elif tuple(image_mask.shape) != tuple(image_tokens.shape[:2]):
        raise ValueError(f"image_mask must have shape {tuple(image_tokens.shape[:2])}, got {tuple(image_mask.shape)}")
    text_mask, image_mask = text_mask.bool(), image_mask.bool()
    if not bool(text_mask.any(dim=1).all()):
        bad = (~text_mask.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"text(s) {bad[:10]} have no valid token (all padding); late interaction is undefined")
    if not bool(image_mask.any(dim=1).all()):
        bad = (~image_mask.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"image(s) {bad[:10]} have no valid patch; late interaction is undefined")
    return image_mask


def late_interaction_reference(image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor,
                               image_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Readable CMLI over every (image, text) pair. Memory O(I*T*N*M): for teaching and testing.

    image_tokens (I, N, D), text_tokens (T, M, D), text_mask (T, M) bool, image_mask (I, N) bool or None.
    Returns (s_i2t, s_t2i), both (I, T) float32.
    """
    image_mask = check_inputs(image_tokens, text_tokens, text_mask, image_mask)
    text_mask = text_mask.bool()
    scores = einsum(image_tokens, text_tokens, "i n d, t m d -> i t n m").float()  # (I, T, N, M)

    # image -> text: each patch takes its best valid token, then the mean over valid patches
    neg_inf = torch.finfo(scores.dtype).min
    best_token = scores.masked_fill(~rearrange(text_mask, "t m -> 1 t 1 m"), neg_inf).amax(dim=3)  # (I, T, N)
    best_token = best_token.masked_fill(~rearrange(image_mask, "i n -> i 1 n"), 0.0)
    s_i2t = best_token.sum(dim=2) / rearrange(image_mask.sum(dim=1), "i -> i 1")  # (I, T)

    # text -> image: each token takes its best valid patch, then the mean over valid tokens
    best_patch = scores.masked_fill(~rearrange(image_mask, "i n -> i 1 n 1"), neg_inf).amax(dim=2)  # (I, T, M)
    best_patch = best_patch.masked_fill(~rearrange(text_mask, "t m -> 1 t m"), 0.0)
    s_t2i = best_patch.sum(dim=2) / rearrange(text_mask.sum(dim=1), "t -> 1 t")  # (I, T)
    return s_i2t, s_t2i


# ------------------------------------------------------------------------------------------------- chunked
DEFAULT_MAX_CHUNK_BYTES = 128 * 2**20  # one fp32 score chunk; peak extra memory is a few chunks + the indices


def _index_dtype(n: int) -> torch.dtype:
    """Smallest integer dtype holding 0..n-1: the stored arg-max indices cost I*T*(N+M) of these."""
    return torch.uint8 if n <= 256 else (torch.int16 if n <= 32767 else torch.int32)


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


def _chunk_scores(v, w, tm, im):
    """Both maxima of one chunk. v (ci, N, D), w (ct, M, D), tm (ct, M), im (ci, N) -> best values and arg-maxes."""
    # (ci, ct, N, M), the only chunk-sized score tensor; fp32 like the reference (fp64 stays fp64, for gradcheck)
    s = einsum(v, w, "i n d, t m d -> i t n m").to(_acc_dtype(v.dtype))
    neg_inf = torch.finfo(s.dtype).min
    # in place, in this order: padding tokens never win a patch's max, padding patches never win a token's max
    # (the text fill also hits padding tokens' columns, which no mean and no gradient reads)
    best_tok, arg_tok = s.masked_fill_(~rearrange(tm, "t m -> 1 t 1 m"), neg_inf).max(dim=3)  # (ci, ct, N)
    best_patch, arg_patch = s.masked_fill_(~rearrange(im, "i n -> i 1 n 1"), neg_inf).max(dim=2)  # (ci, ct, M)
    return best_tok, arg_tok, best_patch, arg_patch


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _chunk_score_grad(arg_tok, arg_patch, ga, gb, im, tm, N, M, dtype):
    """Dense gradient of one chunk's scores: the max passes it only to its arg-max. -> (ci, ct, N, M)."""
    ci, ct = ga.shape
    p = torch.zeros(ci, ct, N, M, device=ga.device, dtype=ga.dtype)
    a = ga[:, :, None] * rearrange(im, "i n -> i 1 n")  # (ci, ct, N): each valid patch's weight
    b = gb[:, :, None] * rearrange(tm, "t m -> 1 t m")  # (ci, ct, M): each valid token's weight
    p.scatter_(3, arg_tok.long()[..., None], a[..., None])  # one token per patch row
    p.scatter_add_(2, arg_patch.long()[:, :, None, :], b[:, :, None, :])  # one patch per token column (may collide)
    return p.to(dtype)


# Devices whose chunked backward uses gathers (_chunk_grad_gather) instead of the dense score gradient + 2 matmuls.
# CPU: the gathers touch I*T*(N+M) rows instead of doing 2*I*T*N*M*D FLOPs, 4.6x faster backward at the CPU
# training size (benchmarks/RESULTS.md). CUDA keeps the dense path: there the matmuls run on tensor cores.
GATHER_BACKWARD_DEVICES = ("cpu",)


def _grouped_bags(keys, n_groups, n_bags_per_group):
    """Sort each row of keys (G, L) (values < n_bags_per_group) -> (order (G, L), offsets (G*n_bags,)): the flat
    start of each bag (group g, key k) in the row-major order, as embedding_bag wants them."""
    sorted_keys, order = torch.sort(keys, dim=1)
    bounds = torch.arange(n_bags_per_group, device=keys.device, dtype=sorted_keys.dtype)
    starts = torch.searchsorted(sorted_keys, bounds.expand(n_groups, -1).contiguous())  # (G, n_bags)
    starts = starts + keys.shape[1] * torch.arange(n_groups, device=keys.device)[:, None]
    return order, starts.reshape(-1)


def _chunk_grad_gather(vc, wc, arg_tok, arg_patch, ga, gb, im, tm):
    """(dV chunk (ci, N, D), dW chunk (ct, M, D)) of one chunk without the dense score gradient.

    The score gradient has one entry per (patch, text) row (a at the patch's best token) and one per (token, image)
    column (b at the token's best patch). Each of dV, dW gets one gather term (a fixed-size bag per output row:
    embedding_bag) and one scatter term (rows grouped by target with a sort, then embedding_bag with offsets).
    """
    ci, ct, N = arg_tok.shape
    M, D = arg_patch.shape[2], vc.shape[2]
    acc = ga.dtype
    v_flat, w_flat = vc.reshape(ci * N, D).to(acc), wc.reshape(ct * M, D).to(acc)
    a = ga[:, :, None] * im[:, None, :].to(acc)  # (ci, ct, N): weight of each patch's best token
    b = gb[:, :, None] * tm[None, :, :].to(acc)  # (ci, ct, M): weight of each token's best patch
    arg_tok, arg_patch = arg_tok.long(), arg_patch.long()
    dev = vc.device
    # dV, gather: patch (i, n) takes a[i, t, n] * w[t, arg_tok[i, t, n]] from every text t
    tok_row = arg_tok + M * torch.arange(ct, device=dev)[None, :, None]  # (ci, ct, N): row of w_flat
    dv = torch.nn.functional.embedding_bag(rearrange(tok_row, "i t n -> (i n) t"), w_flat, mode="sum",
                                           per_sample_weights=rearrange(a, "i t n -> (i n) t").contiguous())
    # dW, gather: token (t, m) takes b[i, t, m] * v[i, arg_patch[i, t, m]] from every image i
    patch_row = arg_patch + N * torch.arange(ci, device=dev)[:, None, None]  # (ci, ct, M): row of v_flat
    dw = torch.nn.functional.embedding_bag(rearrange(patch_row, "i t m -> (t m) i"), v_flat, mode="sum",
                                           per_sample_weights=rearrange(b, "i t m -> (t m) i").contiguous())
    # dV, scatter: patch (i, n) also takes b[i, t, m] * w[t, m] for every token whose best patch it is
    order, offsets = _grouped_bags(rearrange(arg_patch, "i t m -> i (t m)"), ci, N)  # order: flat (t m) index
    weights = torch.gather(rearrange(b, "i t m -> i (t m)"), 1, order)
    dv += torch.nn.functional.embedding_bag(order.reshape(-1), w_flat, offsets, mode="sum",
                                            per_sample_weights=weights.reshape(-1))
    # dW, scatter: token (t, m) also takes a[i, t, n] * v[i, n] for every patch whose best token it is
    order, offsets = _grouped_bags(rearrange(arg_tok, "i t n -> t (i n)"), ct, M)  # order: flat (i n) index
    weights = torch.gather(rearrange(a, "i t n -> t (i n)"), 1, order)
    dw += torch.nn.functional.embedding_bag(order.reshape(-1), v_flat, offsets, mode="sum",
                                            per_sample_weights=weights.reshape(-1))
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
    def forward(ctx, v, w, text_mask, image_mask, max_chunk_bytes, backward_mode):
        I, N, D = v.shape
        T, M, _ = w.shape
        ci, ct = chunk_plan(I, T, N, M, max_chunk_bytes)
        acc = _acc_dtype(v.dtype)
        n_valid_i = image_mask.sum(dim=1).to(acc)  # (I,)
        n_valid_t = text_mask.sum(dim=1).to(acc)  # (T,)
        s_i2t = torch.empty(I, T, device=v.device, dtype=acc)
        s_t2i = torch.empty(I, T, device=v.device, dtype=acc)
        keep = backward_mode == "indices"
        if keep:
            idx_i2t = torch.empty(I, T, N, device=v.device, dtype=_index_dtype(M))
            idx_t2i = torch.empty(I, T, M, device=v.device, dtype=_index_dtype(N))
        for i0 in range(0, I, ci):
            im = image_mask[i0:i0 + ci]
            for t0 in range(0, T, ct):
                tm = text_mask[t0:t0 + ct]
                best_tok, arg_tok, best_patch, arg_patch = _chunk_scores(v[i0:i0 + ci], w[t0:t0 + ct], tm, im)
                s_i2t[i0:i0 + ci, t0:t0 + ct] = (best_tok * rearrange(im, "i n -> i 1 n")).sum(2) / n_valid_i[
                    i0:i0 + ci, None]
                s_t2i[i0:i0 + ci, t0:t0 + ct] = (best_patch * rearrange(tm, "t m -> 1 t m")).sum(2) / n_valid_t[
                    None, t0:t0 + ct]
                if keep:
                    idx_i2t[i0:i0 + ci, t0:t0 + ct] = arg_tok
                    idx_t2i[i0:i0 + ci, t0:t0 + ct] = arg_patch
        saved = (idx_i2t, idx_t2i) if keep else ()
        ctx.save_for_backward(v, w, text_mask, image_mask, n_valid_i, n_valid_t, *saved)
        ctx.plan, ctx.keep = (ci, ct), keep
        return s_i2t, s_t2i

    @staticmethod
    def backward(ctx, g_i2t, g_t2i):
        v, w, text_mask, image_mask, n_valid_i, n_valid_t, *saved = ctx.saved_tensors
        (I, N, D), (T, M, _), (ci, ct) = v.shape, w.shape, ctx.plan
        acc = n_valid_i.dtype
        g_i2t = torch.zeros(I, T, device=v.device, dtype=acc) if g_i2t is None else g_i2t.to(acc)
        g_t2i = torch.zeros(I, T, device=v.device, dtype=acc) if g_t2i is None else g_t2i.to(acc)
        ga = g_i2t / n_valid_i[:, None]  # (I, T): d s_i2t / d (best token score of a valid patch)
        gb = g_t2i / n_valid_t[None, :]  # (I, T): d s_t2i / d (best patch score of a valid token)
        # fp32 (or fp64) accumulators: many chunks add into the same rows
        dv = torch.zeros(I, N, D, device=v.device, dtype=acc)
        dw = torch.zeros(T, M, D, device=v.device, dtype=acc)
        gather = v.device.type in GATHER_BACKWARD_DEVICES
        for i0 in range(0, I, ci):
            im, vc = image_mask[i0:i0 + ci], v[i0:i0 + ci]
            for t0 in range(0, T, ct):
                tm, wc = text_mask[t0:t0 + ct], w[t0:t0 + ct]
                if ctx.keep:
                    arg_tok, arg_patch = saved[0][i0:i0 + ci, t0:t0 + ct], saved[1][i0:i0 + ci, t0:t0 + ct]
                else:
                    _, arg_tok, _, arg_patch = _chunk_scores(vc, wc, tm, im)
                gac, gbc = ga[i0:i0 + ci, t0:t0 + ct], gb[i0:i0 + ci, t0:t0 + ct]
                if gather:
                    dvc, dwc = _chunk_grad_gather(vc, wc, arg_tok, arg_patch, gac, gbc, im, tm)
                    dv[i0:i0 + ci] += dvc
                    dw[t0:t0 + ct] += dwc
                    continue
                p = _chunk_score_grad(arg_tok, arg_patch, gac, gbc, im, tm, N, M, v.dtype)  # (ci, ct, N, M)
                dv[i0:i0 + ci] += einsum(p, wc, "i t n m, t m d -> i n d")
                dw[t0:t0 + ct] += einsum(p, vc, "i t n m, i n d -> t m d")
        return dv.to(v.dtype), dw.to(w.dtype), None, None, None, None


def late_interaction_chunked(image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor,
                             image_mask: torch.Tensor | None = None, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
                             backward: str = "indices") -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch CMLI with bounded memory: no intermediate larger than max_chunk_bytes (>= one pair).

    Memory: inputs + I*T*(N+M) bytes of arg-max indices (backward="indices") + a few chunks.
    Scores are float32 (float64 for float64 inputs, so that gradcheck can probe it).
    """
    image_mask = check_inputs(image_tokens, text_tokens, text_mask, image_mask)
    if backward not in ("indices", "recompute"):
        raise ValueError(f"backward must be 'indices' or 'recompute', got {backward!r}")
    if image_tokens.dtype != text_tokens.dtype:
        raise ValueError(f"dtypes differ: {image_tokens.dtype} vs {text_tokens.dtype}")
    return ChunkedLateInteraction.apply(image_tokens, text_tokens, text_mask.bool(), image_mask,
                                        int(max_chunk_bytes), backward)


# -------------------------------------------------------------------------------------------------- triton
def _triton_usable(device: torch.device) -> bool:
    from .kernels import TRITON_AVAILABLE, cmli_triton
    return TRITON_AVAILABLE and (device.type == "cuda" or cmli_triton.INTERPRET)


def late_interaction_triton(image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor,
                            image_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused Triton CMLI (minifilip/kernels/cmli_triton.py): scores never in GPU memory, arg-max backward.

    Needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported, to run on the CPU for tests).
    """
    image_mask = check_inputs(image_tokens, text_tokens, text_mask, image_mask)
    if not _triton_usable(image_tokens.device):
        raise ValueError("impl='triton' needs Triton and CUDA tensors (or TRITON_INTERPRET=1 before importing "
                         "triton); use impl='chunked'")
    if image_tokens.dtype != text_tokens.dtype or image_tokens.dtype not in (torch.float32, torch.float16,
                                                                               torch.bfloat16):
        raise ValueError(f"impl='triton' takes float32/float16/bfloat16 inputs of one dtype, got "
                         f"{image_tokens.dtype} and {text_tokens.dtype}")
    from .kernels.cmli_triton import TritonLateInteraction
    return TritonLateInteraction.apply(image_tokens, text_tokens, text_mask.bool(), image_mask)


IMPLEMENTATIONS = {
    "reference": late_interaction_reference,
    "chunked": late_interaction_chunked,
    "triton": late_interaction_triton,
}


def late_interaction(image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor,
                     image_mask: torch.Tensor | None = None, impl: str = "auto",
                     **options) -> tuple[torch.Tensor, torch.Tensor]:
    """CMLI scores (s_i2t, s_t2i), each (n_images, n_texts) float32. See the module docstring.

    impl: "reference" (readable, O(I*T*N*M) memory), "chunked" (PyTorch, bounded memory; options
    max_chunk_bytes, backward), "triton" (fused CUDA kernel) or "auto" (triton on CUDA when available, else chunked).
    """
    if impl == "auto":
        fused_ok = (image_tokens.device.type == "cuda" and image_tokens.dtype == text_tokens.dtype
                    and image_tokens.dtype in (torch.float32, torch.float16, torch.bfloat16))
        impl = "triton" if fused_ok and _triton_usable(image_tokens.device) else "chunked"
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown late-interaction impl {impl!r}; choose from {['auto', *IMPLEMENTATIONS]}")
    return IMPLEMENTATIONS[impl](image_tokens, text_tokens, text_mask, image_mask, **options)


# ------------------------------------------------------------------------------------------- token selection
@torch.no_grad()
def token_max_similarity(image_tokens: torch.Tensor, image_mask: torch.Tensor, text_tokens: torch.Tensor,
                         text_mask: torch.Tensor, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES):
    """Each valid patch's max similarity over all valid tokens of all texts, and each valid token's max over all
    valid patches of all images: row and column maxima of the flat (B*N, B*M) score matrix, in row chunks.

    Returns (patch_score (I, N), token_score (T, M)) float32, -inf at padding.
    """
    I, N, D = image_tokens.shape
    T, M, _ = text_tokens.shape
    v = rearrange(image_tokens, "i n d -> (i n) d")
    w = rearrange(text_tokens, "t m d -> (t m) d")
    w_ok = rearrange(text_mask, "t m -> (t m)")
    v_ok = rearrange(image_mask, "i n -> (i n)")
    neg_inf = float("-inf")
    patch_score = torch.full((I * N,), neg_inf, device=v.device)
    token_score = torch.full((T * M,), neg_inf, device=v.device)
    rows = max(1, max_chunk_bytes // (4 * T * M))
    for r0 in range(0, I * N, rows):
        # (rows, T*M): one chunk of the flat score matrix, kept in the matmul's dtype: a max is exact in any
        # dtype, and skipping an fp32 copy halves the bytes these two reductions read
        s = v[r0:r0 + rows] @ w.T
        s.masked_fill_(~w_ok[None, :], neg_inf)
        patch_score[r0:r0 + rows] = s.amax(dim=1).float()
        s.masked_fill_(~v_ok[r0:r0 + rows, None], neg_inf)
        token_score = torch.maximum(token_score, s.amax(dim=0).float())
    patch_score.masked_fill_(~v_ok, neg_inf)
    token_score.masked_fill_(~w_ok, neg_inf)
    return patch_score.view(I, N), token_score.view(T, M)


def _keep_top(tokens: torch.Tensor, score: torch.Tensor, mask: torch.Tensor, ratio: float):
    """Gather each row's top ceil(ratio * n_valid) (>= 1) tokens by score, in their original order.

    tokens (B, L, D), score (B, L) with -inf at padding, mask (B, L) -> (B, K, D) tokens and (B, K) mask.
    """
    n_keep = torch.clamp(torch.ceil(ratio * mask.sum(dim=1)), min=1).long()  # (B,), never more than n_valid
    k_max = int(n_keep.max())
    top = score.topk(k_max, dim=1).indices  # (B, K) best first
    new_mask = torch.arange(k_max, device=tokens.device)[None, :] < n_keep[:, None]  # (B, K)
    # original order: push the unkept slots past the end before sorting, then point them at a real row
    order = torch.where(new_mask, top, tokens.shape[1]).sort(dim=1).values
    order = order.clamp(max=tokens.shape[1] - 1)
    kept = torch.gather(tokens, 1, order[..., None].expand(-1, -1, tokens.shape[2]))  # (B, K, D), differentiable
    return kept * new_mask[..., None].to(kept.dtype), new_mask  # zero the padding slots


def select_tokens(image_tokens: torch.Tensor, image_mask: torch.Tensor | None, text_tokens: torch.Tensor,
                  text_mask: torch.Tensor, ratio: float = 0.25):
    """FILIP token selection: keep each image's and each text's most informative tokens before CMLI.

    A patch's rank is its max similarity over all valid tokens of all texts in the batch; a token's rank is its max
    over all valid patches of all images. Each image keeps ceil(ratio * its valid patches) patches (>= 1), each text
    ceil(ratio * its valid tokens) tokens (>= 1). The ranking runs under no_grad; gradients flow through the
    gathered embeddings. Returns (image_tokens, image_mask, text_tokens, text_mask), padded to the largest kept
    count with False in the masks; ratio == 1.0 returns the inputs unchanged.
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    if ratio == 1.0:
        return image_tokens, image_mask, text_tokens, text_mask
    image_mask = check_inputs(image_tokens, text_tokens, text_mask, image_mask)
    text_mask = text_mask.bool()
    patch_score, token_score = token_max_similarity(image_tokens, image_mask, text_tokens, text_mask)
    img, img_mask = _keep_top(image_tokens, patch_score, image_mask, ratio)
    txt, txt_mask = _keep_top(text_tokens, token_score, text_mask, ratio)
    return img, img_mask, txt, txt_mask
