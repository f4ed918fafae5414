"""Cross-modal late interaction (CMLI), the heart of FILIP.

For image i (patches v_ik, k over its N valid patches) and text j (tokens w_jl, l over its M_j valid tokens),
all L2-normalised:

    image -> text:  s_i2t[i, j] = 1/N   * sum_k max_l <v_ik, w_jl>
    text -> image:  s_t2i[i, j] = 1/M_j * sum_l max_k <v_ik, w_jl>

Both matrices are indexed [image, text]. They are *not* transposes of each other. Padding never takes part:
it is set to -inf before a max and left out of a mean. The image CLS token is never passed in here.

Every function here takes `(image_tokens, image_mask, text_tokens, text_mask)` in that order; image_mask may be
None (all patches valid). Axis letters in the einops patterns: i images, t texts, n patches, m tokens, d dim.

`late_interaction_reference` is the readable version that materialises the whole (I, T, N, M) score tensor;
it is the ground truth every faster implementation is tested against. `late_interaction(..., impl=...)` picks one:
"chunked" (PyTorch, one bounded chunk of scores at a time, arg-max backward: minifilip/kernels/cmli_chunked.py),
"triton" (fused kernel, scores never leave the chip: minifilip/kernels/cmli_triton.py) or "auto".
`select_tokens` is FILIP's token selection, run before CMLI to keep each image's and text's most informative tokens.
"""
from __future__ import annotations

from fractions import Fraction

import torch
from einops import einsum, rearrange

from .kernels import load_ranking_triton, load_triton
from .kernels.cmli_chunked import DEFAULT_MAX_CHUNK_BYTES, acc_dtype, late_interaction_chunked

HALF_OR_FLOAT = (torch.float32, torch.float16, torch.bfloat16)  # what the Triton kernel takes


def check_inputs(image_tokens: torch.Tensor, image_mask: torch.Tensor | None, text_tokens: torch.Tensor,
                 text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate shapes and masks; returns boolean (image_mask, text_mask) (all-True image mask when None)."""
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
    image_mask, text_mask = image_mask.bool(), text_mask.bool()
    if not bool(text_mask.any(dim=1).all()):
        bad = (~text_mask.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"text(s) {bad[:10]} have no valid token (all padding); late interaction is undefined")
    if not bool(image_mask.any(dim=1).all()):
        bad = (~image_mask.any(dim=1)).nonzero().flatten().tolist()
        raise ValueError(f"image(s) {bad[:10]} have no valid patch; late interaction is undefined")
    return image_mask, text_mask


def zero_padding(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """tokens (B, L, D) with padding rows set to 0 by selection: whatever padding holds (even NaN or inf) then
    reaches neither the scores nor, through the backward of the select, any gradient."""
    return tokens.masked_fill(~mask[..., None], 0)


def late_interaction_reference(image_tokens: torch.Tensor, image_mask: torch.Tensor | None,
                               text_tokens: torch.Tensor, text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Readable CMLI over every (image, text) pair. Memory O(I*T*N*M): for teaching and testing.

    image_tokens (I, N, D), image_mask (I, N) bool or None, text_tokens (T, M, D), text_mask (T, M) bool.
    Returns (s_i2t, s_t2i), both (I, T), float32 (float64 for float64 inputs).
    """
    image_mask, text_mask = check_inputs(image_tokens, image_mask, text_tokens, text_mask)
    acc = acc_dtype(image_tokens.dtype)  # products summed in fp32 even for bf16/fp16 inputs
    v = zero_padding(image_tokens, image_mask).to(acc)
    w = zero_padding(text_tokens, text_mask).to(acc)
    scores = einsum(v, w, "i n d, t m d -> i t n m")  # (I, T, N, M)

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


def _triton_usable(device: torch.device) -> bool:
    cmli_triton = load_triton()
    return cmli_triton is not None and (device.type == "cuda" or cmli_triton.INTERPRET)


def _check_triton_inputs(usable: bool, image_tokens: torch.Tensor, text_tokens: torch.Tensor) -> None:
    """The one-line errors of every impl='triton' entry point: no usable Triton here, or unsupported dtypes."""
    if not usable:
        raise ValueError("impl='triton' needs Triton and CUDA tensors (or TRITON_INTERPRET=1 before importing "
                         "triton); use impl='chunked'")
    if image_tokens.dtype != text_tokens.dtype or image_tokens.dtype not in HALF_OR_FLOAT:
        raise ValueError(f"impl='triton' takes float32/float16/bfloat16 inputs of one dtype, got "
                         f"{image_tokens.dtype} and {text_tokens.dtype}")


def late_interaction_triton(image_tokens, image_mask, text_tokens, text_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused Triton CMLI (minifilip/kernels/cmli_triton.py): scores never in GPU memory, arg-max backward.

    Needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported, to run on the CPU for tests).
    """
    _check_triton_inputs(_triton_usable(image_tokens.device), image_tokens, text_tokens)
    return load_triton().TritonLateInteraction.apply(image_tokens, image_mask, text_tokens, text_mask)


IMPLEMENTATIONS = {
    "reference": late_interaction_reference,
    "chunked": late_interaction_chunked,
    "triton": late_interaction_triton,
}


def late_interaction(image_tokens: torch.Tensor, image_mask: torch.Tensor | None, text_tokens: torch.Tensor,
                     text_mask: torch.Tensor, impl: str = "auto", **options) -> tuple[torch.Tensor, torch.Tensor]:
    """CMLI scores (s_i2t, s_t2i), each (n_images, n_texts) float32. See the module docstring.

    impl: "reference" (readable, O(I*T*N*M) memory), "chunked" (PyTorch, bounded memory; options
    max_chunk_bytes, backward), "triton" (fused CUDA kernel) or "auto" (triton on CUDA when available, else chunked).
    """
    if impl == "auto":
        fused_ok = (image_tokens.device.type == "cuda" and image_tokens.dtype == text_tokens.dtype
                    and image_tokens.dtype in HALF_OR_FLOAT)
        impl = "triton" if fused_ok and _triton_usable(image_tokens.device) else "chunked"
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown late-interaction impl {impl!r}; choose from {['auto', *IMPLEMENTATIONS]}")
    image_mask, text_mask = check_inputs(image_tokens, image_mask, text_tokens, text_mask)
    image_tokens, text_tokens = zero_padding(image_tokens, image_mask), zero_padding(text_tokens, text_mask)
    return IMPLEMENTATIONS[impl](image_tokens, image_mask, text_tokens, text_mask, **options)


# ------------------------------------------------------------------------------------------- token selection
@torch.no_grad()
def token_max_similarity(image_tokens: torch.Tensor, image_mask: torch.Tensor, text_tokens: torch.Tensor,
                         text_mask: torch.Tensor, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
                         impl: str = "auto"):
    """Each valid patch's max similarity over all valid tokens of all texts, and each valid token's max over all
    valid patches of all images: row and column maxima of the flat (B*N, B*M) score matrix.

    impl: "chunked" (PyTorch, row chunks of at most max_chunk_bytes), "triton" (one fused kernel that never writes
    the scores: minifilip/kernels/ranking_triton.py) or "auto" (triton on CUDA when available, like
    `late_interaction`). Returns (patch_score (I, N), token_score (T, M)) float32, -inf at padding.
    """
    if impl == "auto":
        fused_ok = (image_tokens.device.type == "cuda" and image_tokens.dtype == text_tokens.dtype
                    and image_tokens.dtype in HALF_OR_FLOAT)
        impl = "triton" if fused_ok and _ranking_usable(image_tokens.device) else "chunked"
    if impl == "triton":
        return _token_max_similarity_triton(image_tokens, image_mask, text_tokens, text_mask)
    if impl != "chunked":
        raise ValueError(f"unknown ranking impl {impl!r}; choose from ['auto', 'chunked', 'triton']")
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


def _ranking_usable(device: torch.device) -> bool:
    ranking = load_ranking_triton()
    return ranking is not None and (device.type == "cuda" or ranking.INTERPRET)


def _token_max_similarity_triton(image_tokens, image_mask, text_tokens, text_mask):
    """token_max_similarity through the fused kernel (minifilip/kernels/ranking_triton.py)."""
    _check_triton_inputs(_ranking_usable(image_tokens.device), image_tokens, text_tokens)
    return load_ranking_triton().token_max_similarity(image_tokens, image_mask, text_tokens, text_mask)


def keep_count(n_valid: torch.Tensor, ratio: float) -> torch.Tensor:
    """ceil(ratio * n_valid), at least 1, in exact integer arithmetic: ratio is read as the fraction it was
    written as (0.3 -> 3/10), so 0.3 of 100 keeps 30 (a float product, 30.000000000000004, would keep 31)."""
    frac = Fraction(ratio).limit_denominator(1_000_000)
    return torch.clamp((n_valid.long() * frac.numerator + frac.denominator - 1) // frac.denominator, min=1)


def _keep_top(tokens: torch.Tensor, score: torch.Tensor, mask: torch.Tensor, ratio: float):
    """Gather each row's top ceil(ratio * n_valid) (>= 1) tokens by score, in their original order.

    tokens (B, L, D), score (B, L) with -inf at padding, mask (B, L) -> (B, K, D) tokens and (B, K) mask.
    """
    n_keep = keep_count(mask.sum(dim=1), ratio)  # (B,), never more than n_valid
    k_max = int(n_keep.max())
    top = score.topk(k_max, dim=1).indices  # (B, K) best first
    new_mask = torch.arange(k_max, device=tokens.device)[None, :] < n_keep[:, None]  # (B, K)
    # original order: push the unkept slots past the end before sorting, then point them at a real row
    order = torch.where(new_mask, top, tokens.shape[1]).sort(dim=1).values
    order = order.clamp(max=tokens.shape[1] - 1)
    kept = torch.gather(tokens, 1, order[..., None].expand(-1, -1, tokens.shape[2]))  # (B, K, D), differentiable
    return kept.masked_fill(~new_mask[..., None], 0), new_mask  # zero the padding slots (by selection)


def select_tokens(image_tokens: torch.Tensor, image_mask: torch.Tensor | None, text_tokens: torch.Tensor,
                  text_mask: torch.Tensor, ratio: float = 0.25, text_ratio: float | None = None,
                  impl: str = "auto"):
    """FILIP token selection: keep each image's and each text's most informative tokens before CMLI.

    A patch's rank is its max similarity over all valid tokens of all texts in the batch; a token's rank is its max
    over all valid patches of all images. Each image keeps ceil(ratio * its valid patches) patches (>= 1), each text
    ceil(ratio * its valid tokens) tokens (>= 1). The ranking runs under no_grad; gradients flow through the
    gathered embeddings. Returns (image_tokens, image_mask, text_tokens, text_mask), padded to the largest kept
    count with False in the masks; ratio == 1.0 returns the inputs unchanged. `text_ratio` (default: `ratio`) is
    the texts' own fraction; 1.0 keeps every text token (selection on the patches only). `impl` picks the
    ranking's implementation (`token_max_similarity`: "auto" = the fused Triton kernel on CUDA, else chunked).
    """
    text_ratio = ratio if text_ratio is None else text_ratio
    for name, r in (("ratio", ratio), ("text_ratio", text_ratio)):
        if not 0.0 < r <= 1.0:
            raise ValueError(f"{name} must be in (0, 1], got {r}")
    if ratio == 1.0 and text_ratio == 1.0:
        return image_tokens, image_mask, text_tokens, text_mask
    image_mask, text_mask = check_inputs(image_tokens, image_mask, text_tokens, text_mask)
    patch_score, token_score = token_max_similarity(image_tokens, image_mask, text_tokens, text_mask, impl=impl)
    img, img_mask = (image_tokens, image_mask) if ratio == 1.0 else _keep_top(image_tokens, patch_score,
                                                                              image_mask, ratio)
    txt, txt_mask = (text_tokens, text_mask) if text_ratio == 1.0 else _keep_top(text_tokens, token_score,
                                                                                 text_mask, text_ratio)
    return img, img_mask, txt, txt_mask
