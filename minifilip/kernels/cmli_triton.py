"""Fused cross-modal late interaction in Triton: both directions from one pass, scores never leave the chip.

Forward. One program owns one image i and a block of BT texts (BT * MP columns, MP = M padded to a power of two).
It walks the image's patches in row chunks of BLOCK_N (plus one smaller tail chunk, so N = 196 is padded to
208 rather than 256), and for each chunk computes the score tile S = V[i, chunk] @ W[texts]^T in fp32 on chip:

    S (rows, BT * MP) --row max per text--> best token of each patch  -> sum into s_i2t[i, j]
                      --column max-------> running best patch of each token -> s_t2i[i, j] at the end

It writes only the (I, T) scores and the arg-max indices: idx_i2t (I, T, N) and idx_t2i (I, T, M), stored in the
smallest integer type that holds them (uint8 for M, N <= 256), i.e. I*T*(N+M) bytes instead of 4*I*T*N*M.

Backward. The max routes the gradient through its arg-max only, so with a = g_i2t / n_valid_patches and
b = g_t2i / n_valid_tokens the gradient of the scores of pair (i, j) is the sparse matrix

    P[i, j, n, l] = a[i, j] * [l == idx_i2t[i, j, n]] + b[i, j] * [n == idx_t2i[i, j, l]]

and dV[i] = sum_j P[i, j] @ W[j],  dW[j] = sum_i P[i, j]^T @ V[i].  Two kernels rebuild tiles of P on chip from
the indices and feed them to tensor-core dots; P is never stored either.

Interpreter: with TRITON_INTERPRET=1 set before `import triton`, the same kernels run on CPU tensors (tests).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .cmli_chunked import index_dtype

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tile sizes; tuned on an H100 for N=196, M=32, D=256 bf16 (see benchmarks/RESULTS.md). Any values work:
# BLOCK_N and BT * MP must be >= 16 (tensor-core minimum) and powers of two. Optional knobs, off by default
# until timed on a GPU (benchmarks/bench_cmli.py --tune lists them, --fwd/--bwd-w set them): fwd ARGMAX=1 (each
# arg-max as two plain reductions, max then first index holding it, instead of tl.max(return_indices=True));
# fwd ARGMAX=2 (each arg-max as ONE integer max over a packed int64 key: order-preserving int32 encoding of the
# fp32 score in the high half, (last index - index) in the low half, so the largest key is the best score at its
# lowest index; exact, no truncated score bits); bwd_w SPLIT_I=k (the images split over k programs per text block,
# which add into an fp32 dW with atomics: k times more programs, but fp32 atomic adds land in no fixed order, so
# dW is then not bit-reproducible run to run). Ties: every variant picks the lowest index (tl.max's
# return_indices breaks ties to the left; across row chunks a later chunk must be strictly better),
# tested in tests/test_cmli_impls.py::test_triton_ties_break_to_lowest_index.
CONFIG = {
    "fwd": dict(BLOCK_N=64, BT=8, BLOCK_D=64, num_warps=8, num_stages=3),
    "bwd_v": dict(BLOCK_N=64, BT=2, BLOCK_DV=256, num_warps=4, num_stages=3),
    "bwd_w": dict(BLOCK_N=64, BT=4, BLOCK_DW=128, num_warps=8, num_stages=3),
}


def _launch(cfg: dict, dtype: torch.dtype) -> dict:
    """num_warps / num_stages for a launch: fp32 tiles take twice the shared memory of bf16 ones, so fewer stages."""
    stages = min(cfg["num_stages"], 2) if dtype == torch.float32 else cfg["num_stages"]
    return dict(num_warps=cfg["num_warps"], num_stages=stages)


def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(x))


def _chunks(n: int, block: int) -> tuple[int, int]:
    """Split n rows into `full` chunks of `block` plus a power-of-two tail chunk (0 if none)."""
    full, rest = divmod(n, block)
    return full, (_pow2(rest) if rest else 0)


# ----------------------------------------------------------------------------------------------- forward
@triton.jit
def _packed_argmax(s, idx, LAST: tl.constexpr, axis: tl.constexpr):
    """(max, lowest index holding it) of fp32 s along axis as one int64 max: key = enc(s) << 32 | (LAST - idx).
    enc flips the magnitude bits of negative floats, so signed-int order = float order (-inf lowest)."""
    bits = s.to(tl.int32, bitcast=True)
    enc = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = tl.max((enc.to(tl.int64) << 32) | (LAST - idx).to(tl.int64), axis=axis)
    hi = key >> 32  # arithmetic shift: the encoded score, sign kept
    lo = key - (hi << 32)
    hi32 = hi.to(tl.int32)
    best = (hi32 ^ ((hi32 >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)  # the encoding is an involution
    return best, LAST - lo.to(tl.int32)


@triton.jit
def _fwd_chunk(V, IMASK, IDX_I2T, i, n0, N, T, jrow, wrow, cols_ok, tvalid,
               W, best_col, arg_col, sum_i2t,
               R: tl.constexpr, BT: tl.constexpr, MP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
               PREC: tl.constexpr, ARGMAX: tl.constexpr):
    """Scores of R patch rows (from n0) of image i against the program's BT texts; folds them into both maxima."""
    rows = n0 + tl.arange(0, R)
    rows_ok = rows < N
    ivalid = tl.load(IMASK + i * N + rows, mask=rows_ok, other=0) != 0  # (R,) valid patch
    acc = tl.zeros((R, BT * MP), dtype=tl.float32)  # the score tile, on chip only
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        a = tl.load(V + (i * N + rows[:, None]) * D + dd[None, :], mask=rows_ok[:, None] & (dd < D)[None, :],
                    other=0.0)  # (R, BLOCK_D)
        b = tl.load(W + wrow[:, None] * D + dd[None, :], mask=cols_ok[:, None] & (dd < D)[None, :],
                    other=0.0)  # (BT*MP, BLOCK_D)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC)  # (R, BT*MP)

    # image -> text: best valid token of each patch, per text (padding tokens can never win)
    s = tl.where(tvalid[None, :], acc, float("-inf"))
    s3 = tl.reshape(s, (R, BT, MP))
    if ARGMAX == 0:
        best_tok, arg_tok = tl.max(s3, axis=2, return_indices=True)  # (R, BT)
    elif ARGMAX == 1:  # two plain reductions: the max, then the first index that holds it
        best_tok = tl.max(s3, axis=2)
        tok = tl.arange(0, MP)[None, None, :]
        arg_tok = tl.min(tl.where(s3 == best_tok[:, :, None], tok, MP), axis=2)
    else:  # one integer max over packed (score, index) keys
        best_tok, arg_tok = _packed_argmax(s3, tl.arange(0, MP)[None, None, :], MP - 1, 2)
    idx_ptr = IDX_I2T + (i * T + jrow[None, :]).to(tl.int64) * N + rows[:, None]
    tl.store(idx_ptr, arg_tok.to(IDX_I2T.dtype.element_ty), mask=rows_ok[:, None] & (jrow < T)[None, :])
    sum_i2t += tl.sum(tl.where(ivalid[:, None], best_tok, 0.0), axis=0)  # (BT,) padding patches add nothing

    # text -> image: best valid patch of each token, running over the chunks (strict '>' keeps the first tie)
    s = tl.where(ivalid[:, None], acc, float("-inf"))
    if ARGMAX == 0:
        best, arg = tl.max(s, axis=0, return_indices=True)  # (BT*MP,)
    elif ARGMAX == 1:
        best = tl.max(s, axis=0)
        arg = tl.min(tl.where(s == best[None, :], tl.arange(0, R)[:, None], R), axis=0)
    else:
        best, arg = _packed_argmax(s, tl.arange(0, R)[:, None], R - 1, 0)
    better = best > best_col
    best_col = tl.where(better, best, best_col)
    arg_col = tl.where(better, arg + n0, arg_col)
    return best_col, arg_col, sum_i2t


@triton.jit
def _cmli_fwd_kernel(V, W, IMASK, TMASK, INV_NI, INV_MJ, S_I2T, S_T2I, IDX_I2T, IDX_T2I, N, T, M,
                     D: tl.constexpr, BLOCK_N: tl.constexpr, N_FULL: tl.constexpr, TAIL_N: tl.constexpr,
                     BT: tl.constexpr, MP: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
                     ARGMAX: tl.constexpr):
    """Grid (I * ceil(T / BT),): program -> (image i, texts j0 .. j0+BT). Consecutive programs share image i."""
    pid = tl.program_id(0)
    n_tb = tl.cdiv(T, BT)
    i = (pid // n_tb).to(tl.int64)
    j0 = (pid % n_tb) * BT
    cols = tl.arange(0, BT * MP)  # column c of the tile = (text j0 + c // MP, token c % MP)
    j = j0 + cols // MP
    l = cols % MP
    cols_ok = (j < T) & (l < M)
    wrow = j * M + l  # row of the token in the flat (T*M, D) text tensor
    tvalid = tl.load(TMASK + wrow, mask=cols_ok, other=0) != 0  # (BT*MP,) valid token
    jrow = j0 + tl.arange(0, BT)

    best_col = tl.full((BT * MP,), float("-inf"), tl.float32)  # running max over patches, per token
    arg_col = tl.zeros((BT * MP,), tl.int32)
    sum_i2t = tl.zeros((BT,), tl.float32)  # sum over valid patches of the best token score, per text
    for c in tl.static_range(N_FULL):
        best_col, arg_col, sum_i2t = _fwd_chunk(V, IMASK, IDX_I2T, i, c * BLOCK_N, N, T, jrow, wrow, cols_ok, tvalid,
                                                W, best_col, arg_col, sum_i2t, BLOCK_N, BT, MP, D, BLOCK_D, PREC,
                                                ARGMAX)
    if TAIL_N > 0:
        best_col, arg_col, sum_i2t = _fwd_chunk(V, IMASK, IDX_I2T, i, N_FULL * BLOCK_N, N, T, jrow, wrow, cols_ok,
                                                tvalid, W, best_col, arg_col, sum_i2t, TAIL_N, BT, MP, D, BLOCK_D,
                                                PREC, ARGMAX)

    jrow_ok = jrow < T
    tl.store(S_I2T + i * T + jrow, sum_i2t * tl.load(INV_NI + i), mask=jrow_ok)
    per_text = tl.sum(tl.reshape(tl.where(tvalid, best_col, 0.0), (BT, MP)), axis=1)  # (BT,)
    tl.store(S_T2I + i * T + jrow, per_text * tl.load(INV_MJ + jrow, mask=jrow_ok, other=0.0), mask=jrow_ok)
    tl.store(IDX_T2I + (i * T + j) * M + l, arg_col.to(IDX_T2I.dtype.element_ty), mask=cols_ok)


# ---------------------------------------------------------------------------------------------- backward
@triton.jit
def _p_tile(IDX_I2T, GA, i, rows, rows_ok, ivalid, jrow, N, T,
            cols_ok, tvalid, gb, ic, R: tl.constexpr, BT: tl.constexpr, MP: tl.constexpr):
    """Rebuild the (R, BT*MP) gradient tile of the scores of image i's rows vs BT texts from the arg-max indices."""
    jrow_ok = jrow < T
    ga = tl.load(GA + i * T + jrow, mask=jrow_ok, other=0.0)  # (BT,) g_i2t / n_valid_patches
    it = tl.load(IDX_I2T + (i * T + jrow[None, :]) * N + rows[:, None], mask=rows_ok[:, None] & jrow_ok[None, :],
                 other=0).to(tl.int32)  # (R, BT) best token of each patch
    tok = tl.arange(0, MP)
    p1 = tl.where(tok[None, None, :] == it[:, :, None], ga[None, :, None], 0.0)  # (R, BT, MP) one-hot * a
    p1 = tl.where(ivalid[:, None], tl.reshape(p1, (R, BT * MP)), 0.0)
    p2 = tl.where(rows[:, None] == ic[None, :], gb[None, :], 0.0)  # (R, BT*MP) one-hot * b
    return p1 + p2


@triton.jit
def _bwd_v_rows(W, IMASK, TMASK, IDX_I2T, IDX_T2I, GA, GB, DV, i, n0, pid_d, N, T, M,
                R: tl.constexpr, BT: tl.constexpr, MP: tl.constexpr, D: tl.constexpr, BLOCK_DV: tl.constexpr,
                PREC: tl.constexpr):
    """dV[i, n0:n0+R, d-block] = sum over text blocks of P_tile @ W_block."""
    rows = n0 + tl.arange(0, R)
    rows_ok = rows < N
    ivalid = tl.load(IMASK + i * N + rows, mask=rows_ok, other=0) != 0
    dd = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    d_ok = dd < D
    cols = tl.arange(0, BT * MP)
    acc = tl.zeros((R, BLOCK_DV), tl.float32)
    for j0 in range(0, T, BT):
        j = j0 + cols // MP
        l = cols % MP
        cols_ok = (j < T) & (l < M)
        tvalid = tl.load(TMASK + j * M + l, mask=cols_ok, other=0) != 0
        gb = tl.load(GB + i * T + j, mask=cols_ok & tvalid, other=0.0)  # (BT*MP,) g_t2i / n_valid_tokens
        ic = tl.load(IDX_T2I + (i * T + j) * M + l, mask=cols_ok, other=0).to(tl.int32)  # best patch per token
        p = _p_tile(IDX_I2T, GA, i, rows, rows_ok, ivalid, j0 + tl.arange(0, BT), N, T,
                    cols_ok, tvalid, gb, ic, R, BT, MP)
        w = tl.load(W + (j * M + l)[:, None] * D + dd[None, :], mask=cols_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(p.to(w.dtype), w, acc, input_precision=PREC)  # (R, BLOCK_DV)
    tl.store(DV + (i * N + rows[:, None]) * D + dd[None, :], acc.to(DV.dtype.element_ty),
             mask=rows_ok[:, None] & d_ok[None, :])


@triton.jit
def _cmli_bwd_v_kernel(W, IMASK, TMASK, IDX_I2T, IDX_T2I, GA, GB, DV, N, T, M,
                       D: tl.constexpr, BLOCK_N: tl.constexpr, N_FULL: tl.constexpr, TAIL_N: tl.constexpr,
                       BT: tl.constexpr, MP: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr):
    """Grid (I, n_row_chunks, ceil(D / BLOCK_DV)): one program owns one row chunk of one image's gradient."""
    i = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    pid_d = tl.program_id(2)
    if c < N_FULL:
        _bwd_v_rows(W, IMASK, TMASK, IDX_I2T, IDX_T2I, GA, GB, DV, i, c * BLOCK_N, pid_d, N, T, M,
                    BLOCK_N, BT, MP, D, BLOCK_DV, PREC)
    else:
        if TAIL_N > 0:
            _bwd_v_rows(W, IMASK, TMASK, IDX_I2T, IDX_T2I, GA, GB, DV, i, N_FULL * BLOCK_N, pid_d, N, T, M,
                        TAIL_N, BT, MP, D, BLOCK_DV, PREC)


@triton.jit
def _bwd_w_rows(V, IMASK, IDX_I2T, GA, i, n0, N, T, jrow, cols_ok, tvalid, gb, ic, dd, d_ok, acc,
                R: tl.constexpr, BT: tl.constexpr, MP: tl.constexpr, D: tl.constexpr, PREC: tl.constexpr):
    """acc (BT*MP, BLOCK_DW) += P_tile^T @ V[i, n0:n0+R, d-block]."""
    rows = n0 + tl.arange(0, R)
    rows_ok = rows < N
    ivalid = tl.load(IMASK + i * N + rows, mask=rows_ok, other=0) != 0
    p = _p_tile(IDX_I2T, GA, i, rows, rows_ok, ivalid, jrow, N, T, cols_ok, tvalid, gb, ic, R, BT, MP)
    v = tl.load(V + (i * N + rows[:, None]) * D + dd[None, :], mask=rows_ok[:, None] & d_ok[None, :], other=0.0)
    return tl.dot(tl.trans(p.to(v.dtype)), v, acc, input_precision=PREC)


@triton.jit
def _cmli_bwd_w_kernel(V, IMASK, TMASK, IDX_I2T, IDX_T2I, GA, GB, DW, I, I_PER, N, T, M,
                       D: tl.constexpr, BLOCK_N: tl.constexpr, N_FULL: tl.constexpr, TAIL_N: tl.constexpr,
                       BT: tl.constexpr, MP: tl.constexpr, BLOCK_DW: tl.constexpr, PREC: tl.constexpr,
                       ATOMIC: tl.constexpr):
    """Grid (ceil(T / BT), ceil(D / BLOCK_DW), splits): one program owns BT texts' gradient over I_PER images;
    with several splits (ATOMIC) the programs add their partial sums into a zeroed fp32 DW."""
    j0 = tl.program_id(0) * BT
    pid_d = tl.program_id(1)
    cols = tl.arange(0, BT * MP)
    j = j0 + cols // MP
    l = cols % MP
    cols_ok = (j < T) & (l < M)
    tvalid = tl.load(TMASK + j * M + l, mask=cols_ok, other=0) != 0
    jrow = j0 + tl.arange(0, BT)
    dd = pid_d * BLOCK_DW + tl.arange(0, BLOCK_DW)
    d_ok = dd < D
    acc = tl.zeros((BT * MP, BLOCK_DW), tl.float32)
    i_lo = tl.program_id(2) * I_PER
    for i32 in range(i_lo, tl.minimum(i_lo + I_PER, I)):
        i = tl.cast(i32, tl.int64)  # 64-bit offsets: I*T*N can pass 2**31
        gb = tl.load(GB + i * T + j, mask=cols_ok & tvalid, other=0.0)
        ic = tl.load(IDX_T2I + (i * T + j) * M + l, mask=cols_ok, other=0).to(tl.int32)
        for c in tl.static_range(N_FULL):
            acc = _bwd_w_rows(V, IMASK, IDX_I2T, GA, i, c * BLOCK_N, N, T, jrow, cols_ok, tvalid, gb, ic, dd, d_ok,
                              acc, BLOCK_N, BT, MP, D, PREC)
        if TAIL_N > 0:
            acc = _bwd_w_rows(V, IMASK, IDX_I2T, GA, i, N_FULL * BLOCK_N, N, T, jrow, cols_ok, tvalid, gb, ic, dd,
                              d_ok, acc, TAIL_N, BT, MP, D, PREC)
    out = DW + (j * M + l)[:, None] * D + dd[None, :]
    if ATOMIC:  # several programs (image ranges) add into one fp32 buffer
        tl.atomic_add(out, acc, mask=cols_ok[:, None] & d_ok[None, :], sem="relaxed")
    else:
        tl.store(out, acc.to(DW.dtype.element_ty), mask=cols_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------- wrappers
def _prec(dtype: torch.dtype) -> str:
    # fp32 inputs: true fp32 products ("ieee"), so results match the fp32 reference; 16-bit inputs ignore this.
    return "ieee" if dtype == torch.float32 else "tf32"


def cmli_forward(v: torch.Tensor, w: torch.Tensor, imask: torch.Tensor, tmask: torch.Tensor):
    """v (I, N, D), w (T, M, D) contiguous, same dtype; imask (I, N), tmask (T, M) int8 (1 = valid).

    Returns s_i2t, s_t2i (I, T) float32 and the arg-max indices idx_i2t (I, T, N), idx_t2i (I, T, M).
    """
    I, N, D = v.shape
    T, M, _ = w.shape
    cfg = CONFIG["fwd"]
    MP = _pow2(M, 1)
    BT = max(cfg["BT"], 16 // MP) if MP < 16 else cfg["BT"]  # the tile needs >= 16 columns
    BLOCK_N = min(cfg["BLOCK_N"], _pow2(N))
    n_full, tail = _chunks(N, BLOCK_N)
    s_i2t = torch.empty(I, T, device=v.device, dtype=torch.float32)
    s_t2i = torch.empty_like(s_i2t)
    idx_i2t = torch.empty(I, T, N, device=v.device, dtype=index_dtype(M))
    idx_t2i = torch.empty(I, T, M, device=v.device, dtype=index_dtype(N))
    inv_ni = 1.0 / imask.sum(dim=1, dtype=torch.float32)  # (I,)
    inv_mj = 1.0 / tmask.sum(dim=1, dtype=torch.float32)  # (T,)
    grid = (I * triton.cdiv(T, BT),)
    _cmli_fwd_kernel[grid](v, w, imask, tmask, inv_ni, inv_mj, s_i2t, s_t2i, idx_i2t, idx_t2i, N, T, M,
                           D=D, BLOCK_N=BLOCK_N, N_FULL=n_full, TAIL_N=tail, BT=BT, MP=MP,
                           BLOCK_D=min(cfg["BLOCK_D"], _pow2(D)), PREC=_prec(v.dtype),
                           ARGMAX=cfg.get("ARGMAX", 0), **_launch(cfg, v.dtype))
    return s_i2t, s_t2i, idx_i2t, idx_t2i, inv_ni, inv_mj


def cmli_backward_v(v, w, imask, tmask, idx_i2t, idx_t2i, ga, gb):
    """dV (I, N, D) in the input dtype, from ga = g_i2t / n_valid_patches and gb = g_t2i / n_valid_tokens."""
    I, N, D = v.shape
    T, M, _ = w.shape
    MP = _pow2(M, 1)
    dv = torch.empty_like(v)
    cfg = CONFIG["bwd_v"]
    BT = max(cfg["BT"], 16 // MP) if MP < 16 else cfg["BT"]
    BLOCK_N = min(cfg["BLOCK_N"], _pow2(N))
    n_full, tail = _chunks(N, BLOCK_N)
    BLOCK_DV = min(cfg["BLOCK_DV"], _pow2(D))
    grid = (I, n_full + (tail > 0), triton.cdiv(D, BLOCK_DV))
    _cmli_bwd_v_kernel[grid](w, imask, tmask, idx_i2t, idx_t2i, ga, gb, dv, N, T, M,
                             D=D, BLOCK_N=BLOCK_N, N_FULL=n_full, TAIL_N=tail, BT=BT, MP=MP, BLOCK_DV=BLOCK_DV,
                             PREC=_prec(v.dtype), **_launch(cfg, v.dtype))
    return dv


def cmli_backward_w(v, w, imask, tmask, idx_i2t, idx_t2i, ga, gb):
    """dW (T, M, D) in the input dtype; same arguments as cmli_backward_v."""
    I, N, D = v.shape
    T, M, _ = w.shape
    MP = _pow2(M, 1)
    cfg = CONFIG["bwd_w"]
    BT = max(cfg["BT"], 16 // MP) if MP < 16 else cfg["BT"]
    BLOCK_N = min(cfg["BLOCK_N"], _pow2(N))
    n_full, tail = _chunks(N, BLOCK_N)
    BLOCK_DW = min(cfg["BLOCK_DW"], _pow2(D))
    i_per = triton.cdiv(I, max(1, min(cfg.get("SPLIT_I", 1), I)))
    splits = triton.cdiv(I, i_per)
    atomic = splits > 1
    dw = torch.zeros(w.shape, device=w.device, dtype=torch.float32) if atomic else torch.empty_like(w)
    grid = (triton.cdiv(T, BT), triton.cdiv(D, BLOCK_DW), splits)
    _cmli_bwd_w_kernel[grid](v, imask, tmask, idx_i2t, idx_t2i, ga, gb, dw, I, i_per, N, T, M,
                             D=D, BLOCK_N=BLOCK_N, N_FULL=n_full, TAIL_N=tail, BT=BT, MP=MP, BLOCK_DW=BLOCK_DW,
                             PREC=_prec(v.dtype), ATOMIC=atomic, **_launch(cfg, v.dtype))
    return dw.to(w.dtype) if atomic else dw


def cmli_backward(v, w, imask, tmask, idx_i2t, idx_t2i, ga, gb):
    """(dV, dW): two kernels, one per input, each rebuilding its tiles of the sparse score gradient."""
    return (cmli_backward_v(v, w, imask, tmask, idx_i2t, idx_t2i, ga, gb),
            cmli_backward_w(v, w, imask, tmask, idx_i2t, idx_t2i, ga, gb))


class TritonLateInteraction(torch.autograd.Function):
    """Autograd wrapper: forward keeps only the arg-max indices; backward rebuilds the sparse score gradient."""

    @staticmethod
    def forward(ctx, image_tokens, image_mask, text_tokens, text_mask):
        v, w = image_tokens.contiguous(), text_tokens.contiguous()
        imask, tmask = image_mask.to(torch.int8).contiguous(), text_mask.to(torch.int8).contiguous()
        s_i2t, s_t2i, idx_i2t, idx_t2i, inv_ni, inv_mj = cmli_forward(v, w, imask, tmask)
        ctx.save_for_backward(v, w, imask, tmask, idx_i2t, idx_t2i, inv_ni, inv_mj)
        return s_i2t, s_t2i

    @staticmethod
    def backward(ctx, g_i2t, g_t2i):
        v, w, imask, tmask, idx_i2t, idx_t2i, inv_ni, inv_mj = ctx.saved_tensors
        I, T = idx_i2t.shape[:2]
        g_i2t = torch.zeros(I, T, device=v.device) if g_i2t is None else g_i2t.float()
        g_t2i = torch.zeros(I, T, device=v.device) if g_t2i is None else g_t2i.float()
        ga = (g_i2t * inv_ni[:, None]).contiguous()  # (I, T) weight of each valid patch's best token
        gb = (g_t2i * inv_mj[None, :]).contiguous()  # (I, T) weight of each valid token's best patch
        dv, dw = cmli_backward(v, w, imask, tmask, idx_i2t, idx_t2i, ga, gb)
        return dv, None, dw, None
