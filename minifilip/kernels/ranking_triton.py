"""Fused token-selection ranking in Triton: row and column maxima of the flat score matrix, scores never stored.

FILIP's token selection (`minifilip.cmli.select_tokens`) ranks each valid patch by its best score against every
valid token of every text in the batch, and each valid token by its best score against every valid patch of every
image. Flattened, that is the row maxima and the column maxima of one (R, C) = (I*N, T*M) score matrix
S = V_flat @ W_flat^T. The chunked PyTorch version writes S to memory chunk by chunk and reads it back twice (mask,
max, mask, max); at batch 1024 (R = 200,704, C = 32,768) that was ~110 ms on an H100, more than the 16x smaller late
interaction saves. Here one program owns BLOCK_R rows and walks every column block:

    S tile (BLOCK_R, BLOCK_C) on chip --max over columns--> running row max (registers) -> ROW_MAX at the end
                                      --max over rows-----> column partial max -> atomic max into COL_KEY

Why atomics for the columns, and on an int32 encoding. A per-row-block partial buffer would hold
(R / BLOCK_R) x C floats: 3.3 GB at batch 4096 (6,272 x 131,072 x 4 B), written and re-read by a torch amax. Atomic
max needs only C int32 and, unlike an atomic add, is order-independent, so the result is deterministic (bit for
bit) whatever order the programs run in. Triton's float atomic_max works by splitting on the sign (a signed int max
for positives, an unsigned int min for negatives); the order-preserving encoding below makes it one plain int32
atomic max per column, and behaves identically in the CPU interpreter:

    key(x) = bits(x) ^ ((bits(x) >> 31) & 0x7FFFFFFF)       (an involution: decode = the same formula)

Non-negative floats keep their bits (already ordered as ints), negative floats get their magnitude bits flipped, so
signed-int order = float order for every non-NaN value (-inf the smallest). The programs start their column walk at
different blocks (rotated by program id) so that they do not all hit the same columns' atomics at once.

Runtime sizes. R and C (so the batch and the token counts) are runtime arguments: one compiled kernel serves every
batch shape (Triton specialises integer arguments only on divisibility by 16 and on == 1). D is a constexpr (fixed
by the model). Offsets are int64: the largest one is row * D into image_tokens, bounded by I*N*D, which is
4096 * 196 * 256 = 2.1e8 at the largest single-GPU batch the README promises (10x under 2**31, but a D = 768 model
at batch 16384 would pass it); everything else (R, C, row and column indices) stays far below 2**31.

Interpreter: with TRITON_INTERPRET=1 set before `import triton`, the kernel runs on CPU tensors (tests).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from einops import rearrange

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tiles: not yet timed on a GPU (no device time when written); benchmarks/bench_cmli.py --tune-ranking sweeps
# RANKING_CANDIDATES. BLOCK_R, BLOCK_C >= 16 (tensor-core minimum), powers of two. BLOCK_D >= D loads the program's
# rows of V once, before the column walk, instead of once per column block.
CONFIG = dict(BLOCK_R=128, BLOCK_C=128, BLOCK_D=64, num_warps=8, num_stages=3)


@triton.jit
def _encode(x):
    """float32 -> int32 key with the same order (see the module docstring); also decodes (involution)."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def encode_torch(x: torch.Tensor) -> torch.Tensor:
    """The same encoding on the host: float32 tensor -> int32 keys (also int32 keys -> float32 bits)."""
    bits = x.view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def decode_torch(key: torch.Tensor) -> torch.Tensor:
    return (key ^ ((key >> 31) & 0x7FFFFFFF)).view(torch.float32)


@triton.jit
def _ranking_kernel(V, W, VOK, WOK, ROW_MAX, COL_KEY, R, C,
                    D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                    PREC: tl.constexpr):
    """Grid (cdiv(R, BLOCK_R),): program -> rows [pid*BLOCK_R, +BLOCK_R) of V_flat (R, D) against all of W_flat (C, D).

    VOK (R,), WOK (C,) int8 validity. Writes ROW_MAX (R,) float32 (-inf at invalid rows); atomically maxes the
    column partial maxima into COL_KEY (C,) int32 keys, which the caller initialised to key(-inf).
    """
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # int64: rows * D is the largest offset
    rows_ok = rows < R
    rvalid = tl.load(VOK + rows, mask=rows_ok, other=0) != 0  # (BLOCK_R,) valid patch
    any_row = tl.max(rvalid.to(tl.int32), axis=0) > 0
    dd0 = tl.arange(0, BLOCK_D)
    if BLOCK_D >= D:  # the whole rows fit one D step: load them once for the column walk
        a_all = tl.load(V + rows[:, None] * D + dd0[None, :], mask=rvalid[:, None] & (dd0 < D)[None, :], other=0.0)
    row_best = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    n_cb = tl.cdiv(C, BLOCK_C)
    for k in range(0, n_cb):
        cb = (k + pid) % n_cb  # rotated start: programs spread their atomics over different columns
        cols = cb.to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
        cols_ok = cols < C
        cvalid = tl.load(WOK + cols, mask=cols_ok, other=0) != 0  # (BLOCK_C,) valid token
        acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)  # the score tile, on chip only
        if BLOCK_D >= D:
            b = tl.load(W + cols[:, None] * D + dd0[None, :], mask=cvalid[:, None] & (dd0 < D)[None, :], other=0.0)
            acc = tl.dot(a_all, tl.trans(b), acc, input_precision=PREC)
        else:
            for d0 in range(0, D, BLOCK_D):
                dd = d0 + dd0
                # masked by validity: padding rows are read as 0, so NaN/inf stored there never reach a score
                a = tl.load(V + rows[:, None] * D + dd[None, :], mask=rvalid[:, None] & (dd < D)[None, :],
                            other=0.0)  # (BLOCK_R, BLOCK_D)
                b = tl.load(W + cols[:, None] * D + dd[None, :], mask=cvalid[:, None] & (dd < D)[None, :],
                            other=0.0)  # (BLOCK_C, BLOCK_D)
                acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC)  # (BLOCK_R, BLOCK_C)
        # each patch's best valid token (padding columns can never win)
        row_best = tl.maximum(row_best, tl.max(tl.where(cvalid[None, :], acc, float("-inf")), axis=1))
        # each token's best valid patch of this row block, folded into the global column max
        col_best = tl.max(tl.where(rvalid[:, None], acc, float("-inf")), axis=0)  # (BLOCK_C,)
        tl.atomic_max(COL_KEY + cols, _encode(col_best), mask=cvalid & any_row, sem="relaxed")
    tl.store(ROW_MAX + rows, tl.where(rvalid, row_best, float("-inf")), mask=rows_ok)


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(x))


def row_col_max(v: torch.Tensor, w: torch.Tensor, v_ok: torch.Tensor, w_ok: torch.Tensor):
    """v (R, D), w (C, D) contiguous, same dtype (fp32/fp16/bf16); v_ok (R,), w_ok (C,) int8 (1 = valid).

    Returns (row_max (R,), col_max (C,)) float32: the maxima of v @ w.T over valid columns / valid rows, summed in
    fp32 on chip; -inf at invalid rows/columns and where no valid partner exists.
    """
    R, D = v.shape
    C = w.shape[0]
    cfg = CONFIG
    row_max = torch.empty(R, device=v.device, dtype=torch.float32)
    col_key = encode_torch(torch.full((C,), float("-inf"), device=v.device, dtype=torch.float32))
    if R == 0 or C == 0:
        return row_max.fill_(float("-inf")), decode_torch(col_key)
    BLOCK_D = min(cfg["BLOCK_D"], _pow2(D))
    stages = min(cfg["num_stages"], 2) if v.dtype == torch.float32 else cfg["num_stages"]  # fp32: 2x smem/tile
    grid = (triton.cdiv(R, cfg["BLOCK_R"]),)
    # fp32 inputs: true fp32 products ("ieee"), like the fp32 reference; 16-bit inputs ignore the setting
    _ranking_kernel[grid](v, w, v_ok, w_ok, row_max, col_key, R, C, D=D, BLOCK_R=cfg["BLOCK_R"],
                          BLOCK_C=cfg["BLOCK_C"], BLOCK_D=BLOCK_D,
                          PREC="ieee" if v.dtype == torch.float32 else "tf32",
                          num_warps=cfg["num_warps"], num_stages=stages)
    return row_max, decode_torch(col_key)


def token_max_similarity(image_tokens, image_mask, text_tokens, text_mask):
    """`cmli.token_max_similarity` on the fused kernel: image_tokens (I, N, D), image_mask (I, N) bool, text_tokens
    (T, M, D), text_mask (T, M) bool -> (patch_score (I, N), token_score (T, M)) float32, -inf at padding.

    The maxima are fp32 sums; for 16-bit inputs they are then rounded to the input dtype, as the chunked version's
    matmul output is. Rounding is monotone (the max of the rounded scores is the rounded max), so both versions
    rank alike, up to the summation order inside the dot products.
    """
    I, N, _ = image_tokens.shape
    T, M, _ = text_tokens.shape
    v = rearrange(image_tokens, "i n d -> (i n) d").contiguous()
    w = rearrange(text_tokens, "t m d -> (t m) d").contiguous()
    v_ok = rearrange(image_mask, "i n -> (i n)").to(torch.int8).contiguous()
    w_ok = rearrange(text_mask, "t m -> (t m)").to(torch.int8).contiguous()
    patch_score, token_score = row_col_max(v, w, v_ok, w_ok)  # (I*N,), (T*M,) float32
    if image_tokens.dtype != torch.float32:
        dtype = image_tokens.dtype
        patch_score, token_score = patch_score.to(dtype).float(), token_score.to(dtype).float()
    return patch_score.view(I, N), token_score.view(T, M)
