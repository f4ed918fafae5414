"""Cross-modal late interaction (CMLI), the heart of FILIP.

For image i (patches v_ik, k over its N valid patches) and text j (tokens w_jl, l over its M_j valid tokens),
all L2-normalised:

    image -> text:  s_i2t[i, j] = 1/N   * sum_k max_l <v_ik, w_jl>
    text -> image:  s_t2i[i, j] = 1/M_j * sum_l max_k <v_ik, w_jl>

Both matrices are indexed [image, text]. They are *not* transposes of each other. Padding never takes part:
it is set to -inf before a max and left out of a mean. The image CLS token is never passed in here.

`late_interaction_reference` is the readable version that materialises the whole (I, T, N, M) score tensor;
it is the ground truth every faster implementation is tested against.
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


IMPLEMENTATIONS = {"reference": late_interaction_reference}


def late_interaction(image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor,
                     image_mask: torch.Tensor | None = None, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """CMLI scores (s_i2t, s_t2i), each (n_images, n_texts) float32. See the module docstring.

    impl: "reference" (readable, O(I*T*N*M) memory) or "auto" (the best available implementation).
    """
    if impl == "auto":
        impl = "reference"
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown late-interaction impl {impl!r}; choose from {['auto', *IMPLEMENTATIONS]}")
    return IMPLEMENTATIONS[impl](image_tokens, text_tokens, text_mask, image_mask)
