"""Every CMLI implementation against the reference: scores, gradients, memory bound, invalid inputs.

The Triton kernel runs in Triton's CPU interpreter in a subprocess (TRITON_INTERPRET must be set before triton is
imported, and this pytest process may already have imported it).
"""
import importlib.util
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from minifilip.cmli import late_interaction
from minifilip.kernels import cmli_chunked
from minifilip.kernels.cmli_chunked import chunk_plan

ROOT = Path(__file__).resolve().parents[1]


def make_inputs(I, T, N, M, D, seed, image_mask=True, dtype=torch.float32):
    """Normalised random tokens; random padding in both masks (>= 1 valid each); text 0 has a single token."""
    g = torch.Generator().manual_seed(seed)
    v = F.normalize(torch.randn(I, N, D, generator=g, dtype=torch.float64), dim=-1).to(dtype).requires_grad_()
    w = F.normalize(torch.randn(T, M, D, generator=g, dtype=torch.float64), dim=-1).to(dtype).requires_grad_()
    tm = torch.rand(T, M, generator=g) < 0.6
    tm[torch.arange(T), torch.randint(0, M, (T,), generator=g)] = True
    tm[0] = False
    tm[0, M // 2] = True  # a text of one token, not at position 0
    im = None
    if image_mask:
        im = torch.rand(I, N, generator=g) < 0.7
        im[torch.arange(I), torch.randint(0, N, (I,), generator=g)] = True
    return v, w, tm, im


def scores_and_grads(v, w, tm, im, impl, seed=123, **options):
    """(s_i2t, s_t2i, dV, dW) for a random upstream gradient on both score matrices."""
    s_i2t, s_t2i = late_interaction(v, im, w, tm, impl=impl, **options)
    g = torch.Generator().manual_seed(seed)
    gi, gt = torch.randn(s_i2t.shape, generator=g), torch.randn(s_t2i.shape, generator=g)
    dv, dw = torch.autograd.grad((s_i2t * gi).sum() + (s_t2i * gt).sum(), [v, w])
    return s_i2t, s_t2i, dv, dw


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


SIZES = [(7, 5, 13, 6, 8), (4, 9, 3, 11, 16), (1, 1, 5, 1, 4)]  # N != M, N < M, single pair


@pytest.mark.parametrize("I,T,N,M,D", SIZES)
@pytest.mark.parametrize("image_mask", [True, None])
@pytest.mark.parametrize("impl,options", [
    ("chunked", {"max_chunk_bytes": 4 * 13 * 6 * 3}),  # 3 pairs per chunk: divides neither I nor T
    ("chunked", {"max_chunk_bytes": 1, "backward": "recompute"}),  # one pair per chunk
    ("chunked", {}),  # default budget: one chunk
    ("auto", {}),  # CPU -> chunked
])
def test_matches_reference(I, T, N, M, D, image_mask, impl, options):
    v, w, tm, im = make_inputs(I, T, N, M, D, seed=I * 100 + N, image_mask=image_mask)
    ref = scores_and_grads(v, w, tm, im, "reference")
    out = scores_and_grads(v, w, tm, im, impl, **options)
    for name, o, r in zip(["s_i2t", "s_t2i", "dV", "dW"], out, ref):
        assert o.shape == r.shape and o.dtype == r.dtype, name
        assert rel_err(o, r) <= 1e-5, (name, rel_err(o, r))


@pytest.mark.parametrize("gather", [True, False])
@pytest.mark.parametrize("image_mask", [True, None])
def test_chunked_backward_paths(gather, image_mask, monkeypatch):
    """Both chunked backwards (gathers: CPU default; dense score gradient + matmuls: CUDA default), several chunks."""
    monkeypatch.setattr(cmli_chunked, "GATHER_BACKWARD_DEVICES", ("cpu",) if gather else ())
    v, w, tm, im = make_inputs(9, 7, 13, 6, 8, seed=5, image_mask=image_mask)
    ref = scores_and_grads(v, w, tm, im, "reference")
    out = scores_and_grads(v, w, tm, im, "chunked", max_chunk_bytes=4 * 13 * 6 * 5)
    assert all(rel_err(o, r) <= 1e-5 for o, r in zip(out, ref))


def test_chunked_one_direction_gradient():
    """Only s_i2t used: the Function then gets None for s_t2i's gradient, which must count as zero."""
    v, w, tm, im = make_inputs(5, 6, 7, 4, 8, seed=3)
    ref = torch.autograd.grad(late_interaction(v, im, w, tm, impl="reference")[0].sum(), [v, w])
    out = torch.autograd.grad(late_interaction(v, im, w, tm, impl="chunked", max_chunk_bytes=200)[0].sum(), [v, w])
    assert all(rel_err(o, r) <= 1e-5 for o, r in zip(out, ref))


@pytest.mark.parametrize("backward", ["indices", "recompute"])
def test_chunked_gradcheck_float64(backward):
    v, w, tm, im = make_inputs(3, 4, 5, 3, 4, seed=7, dtype=torch.float64)
    fn = lambda v, w: late_interaction(v, im, w, tm, impl="chunked", max_chunk_bytes=4 * 5 * 3 * 5,  # noqa: E731
                                       backward=backward)
    assert torch.autograd.gradcheck(fn, (v, w), eps=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------- memory
class LargestTensor(TorchDispatchMode):
    """Records the byte size of the largest tensor any ATen op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.max_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.max_bytes = max(self.max_bytes, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("backward", ["indices", "recompute"])
def test_chunked_never_exceeds_budget(backward):
    I, T, N, M, D = 16, 16, 12, 9, 4
    budget = 8 * 2**10  # the full fp32 score tensor is 110 KB, 13x the budget
    v, w, tm, im = make_inputs(I, T, N, M, D, seed=11)
    assert 4 * I * T * N * M > 10 * budget
    ci, ct = chunk_plan(I, T, N, M, budget)
    assert ci * ct * 4 * N * M <= budget and (ci, ct) != (I, T)

    with LargestTensor() as ref_mode:  # the recorder does see a whole score tensor when there is one
        scores_and_grads(v, w, tm, im, "reference")
    assert ref_mode.max_bytes >= 4 * I * T * N * M

    with LargestTensor() as mode:
        out = scores_and_grads(v, w, tm, im, "chunked", max_chunk_bytes=budget, backward=backward)
    assert budget / 4 < mode.max_bytes <= budget, mode.max_bytes
    ref = scores_and_grads(v, w, tm, im, "reference")
    assert all(rel_err(o, r) <= 1e-5 for o, r in zip(out, ref))


# --------------------------------------------------------------------------------------- padding and precision
def poison_padding(v, w, tm, im, value):
    """Copies of v, w whose padding rows hold `value` (NaN or inf) in every coordinate; valid rows unchanged."""
    v = torch.where(im[..., None], v.detach(), value).requires_grad_()
    w = torch.where(tm[..., None], w.detach(), value).requires_grad_()
    return v, w


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("impl,options", [
    ("reference", {}),
    ("chunked", {"max_chunk_bytes": 4 * 13 * 6 * 3}),
    ("chunked", {"max_chunk_bytes": 1, "backward": "recompute"}),
])
@pytest.mark.parametrize("gather", [True, False])
def test_non_finite_padding_changes_nothing(value, impl, options, gather, monkeypatch):
    """NaN/inf planted only in padding (image and text side): scores and the gradients of valid tokens are those
    of clean inputs, and padding rows get exactly zero gradient."""
    monkeypatch.setattr(cmli_chunked, "GATHER_BACKWARD_DEVICES", ("cpu",) if gather else ())
    v, w, tm, im = make_inputs(7, 5, 13, 6, 8, seed=11)
    clean = scores_and_grads(v, w, tm, im, "reference")
    vp, wp = poison_padding(v, w, tm, im, value)
    out = scores_and_grads(vp, wp, tm, im, impl, **options)
    assert all(torch.isfinite(o).all() for o in out)
    assert all(rel_err(o, r) <= 1e-5 for o, r in zip(out, clean))
    assert (out[2][~im] == 0).all() and (out[3][~tm] == 0).all()


def test_half_precision_scores_accumulate_in_fp32():
    """bf16 tokens: the scores are the fp32 sums of the (exact) products, not sums rounded to bf16 first."""
    v, w, tm, im = make_inputs(4, 5, 9, 7, 64, seed=2, dtype=torch.bfloat16)
    exact = late_interaction(v.detach().double(), im, w.detach().double(), tm, impl="reference")
    for impl in ("reference", "chunked"):
        out = late_interaction(v.detach(), im, w.detach(), tm, impl=impl)
        for o, e in zip(out, exact):
            assert o.dtype == torch.float32
            assert rel_err(o, e) <= 1e-6, (impl, rel_err(o, e))  # bf16-rounded scores: ~1e-3


# ------------------------------------------------------------------------------------------------- triton
TRITON_SCRIPT = textwrap.dedent("""
    import os, sys
    assert os.environ["TRITON_INTERPRET"] == "1"
    import torch
    from tests.test_cmli_impls import make_inputs, poison_padding, scores_and_grads, rel_err
    from minifilip.kernels import cmli_triton
    assert cmli_triton.INTERPRET
    for cfg in cmli_triton.CONFIG.values():  # tiny tiles: several row chunks + a tail, several text blocks
        cfg.update({k: 16 for k in ("BLOCK_N", "BLOCK_D", "BLOCK_DV", "BLOCK_DW") if k in cfg}, BT=2)
    worst = 0.0
    for (I, T, N, M, D, mask) in [(3, 5, 37, 6, 24, True), (2, 3, 11, 1, 8, None), (2, 3, 20, 17, 16, True)]:
        v, w, tm, im = make_inputs(I, T, N, M, D, seed=N, image_mask=mask)
        ref = scores_and_grads(v, w, tm, im, "reference")
        out = scores_and_grads(v, w, tm, im, "triton")
        if mask:  # NaN planted in padding: the same scores and gradients, zero gradient at padding
            vp, wp = poison_padding(v, w, tm, im, float("nan"))
            poisoned = scores_and_grads(vp, wp, tm, im, "triton")
            assert (poisoned[2][~im] == 0).all() and (poisoned[3][~tm] == 0).all()
            out = out + poisoned
            ref = ref + ref
        errs = [rel_err(o, r) for o, r in zip(out, ref)]
        print((I, T, N, M, D, mask), errs)
        worst = max(worst, *errs)
    print("worst", worst)
    sys.exit(0 if worst <= 1e-5 else 1)
""")


def skip_untested_kernel(why: str, kernel: str = "the fused Triton CMLI kernel"):
    """Skip the kernel test, loudly: a plain `pytest -q` hides skip reasons (they need -rs) but prints warnings, so
    warn first. With MINIFILIP_REQUIRE_TRITON=1 (set by CI, which installs Triton) a missing Triton fails instead."""
    message = f"{kernel} was NOT tested: {why}"
    if os.environ.get("MINIFILIP_REQUIRE_TRITON") == "1":
        pytest.fail(message + " (MINIFILIP_REQUIRE_TRITON=1)")
    warnings.warn(message, UserWarning)
    pytest.skip(message)


def run_in_interpreter(script: str, kernel: str = "the fused Triton CMLI kernel", timeout: int = 300):
    """Run `script` in a fresh Python with TRITON_INTERPRET=1 (Triton's CPU interpreter); it must exit 0."""
    if importlib.util.find_spec("triton") is None:
        skip_untested_kernel("Triton is not installed (it comes with torch's Linux wheels; see requirements.txt)",
                             kernel)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)
    if proc.returncode != 0 and "No module named 'triton'" in proc.stderr:
        skip_untested_kernel("Triton cannot be imported", kernel)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return proc


def test_triton_kernel_in_interpreter():
    run_in_interpreter(TRITON_SCRIPT)


TIES_SCRIPT = textwrap.dedent("""
    import sys
    import torch
    from minifilip.cmli import late_interaction
    from minifilip.kernels import cmli_triton
    from minifilip.kernels.cmli_chunked import _chunk_maxima
    from tests.test_cmli_impls import scores_and_grads, rel_err
    assert cmli_triton.INTERPRET
    for cfg in cmli_triton.CONFIG.values():  # several row chunks + a tail, several text blocks
        cfg.update({k: 16 for k in ("BLOCK_N", "BLOCK_D", "BLOCK_DV", "BLOCK_DW") if k in cfg}, BT=2)
    I, T, N, M, D = 3, 4, 37, 6, 8
    g = torch.Generator().manual_seed(0)
    # entries in {-1, 0, 1} / 2: every product and sum is exact in fp32 in any order, so equal scores are
    # bit-equal and ties are everywhere (within a text, and across the forward's row chunks)
    v = (torch.randint(-1, 2, (I, N, D), generator=g) / 2).float()
    w = (torch.randint(-1, 2, (T, M, D), generator=g) / 2).float()
    v[:, 20:] = v[:, :N - 20]  # duplicated patches: ties across row chunks too
    tm = torch.rand(T, M, generator=g) < 0.7
    tm[:, 1] = True
    im = torch.rand(I, N, generator=g) < 0.8
    im[:, 0] = True
    s = torch.einsum("ind,tmd->itnm", v.double(), w.double())
    s_tok = s.masked_fill(~tm[None, :, None, :], -float("inf"))
    s_pat = s.masked_fill(~im[:, None, :, None], -float("inf"))
    pos_m, pos_n = torch.arange(M), torch.arange(N)[:, None]
    # lowest index holding the max, spelled out
    low_tok = torch.where(s_tok == s_tok.amax(3, keepdim=True), pos_m, M).amin(3)  # (I, T, N)
    low_pat = torch.where(s_pat == s_pat.amax(2, keepdim=True), pos_n, N).amin(2)  # (I, T, M)
    n_ties = int(((s_tok == s_tok.amax(3, keepdim=True)).sum(3) > 1).sum())
    assert n_ties > 50, n_ties  # the inputs really are tied
    ok_n, ok_m = im[:, None, :].expand(I, T, N), tm[None].expand(I, T, M)
    _, arg_tok, _, arg_pat = _chunk_maxima(v, im, w, tm)
    assert torch.equal(arg_tok[ok_n], low_tok[ok_n]) and torch.equal(arg_pat[ok_m], low_pat[ok_m]), "chunked"
    vv, ww = v.requires_grad_(), w.requires_grad_()
    chunked = scores_and_grads(vv, ww, tm, im, "chunked")
    for argmax in (0, 1, 2):
        cmli_triton.CONFIG["fwd"]["ARGMAX"] = argmax
        i2t, t2i, idx_i2t, idx_t2i, _, _ = cmli_triton.cmli_forward(v.detach(), w.detach(), im.to(torch.int8),
                                                                    tm.to(torch.int8))
        assert torch.equal(idx_i2t.long()[ok_n], low_tok[ok_n]), ("idx_i2t", argmax)
        assert torch.equal(idx_t2i.long()[ok_m], low_pat[ok_m]), ("idx_t2i", argmax)
        # gradients routed through the same (lowest) arg-maxes as chunked's: equal up to summation order
        errs = [rel_err(o, r) for o, r in zip(scores_and_grads(vv, ww, tm, im, "triton"), chunked)]
        print("ARGMAX", argmax, errs)
        assert max(errs) <= 1e-6, (argmax, errs)
""")


def test_triton_ties_break_to_lowest_index():
    """Every max / arg-max of the fused forward (each ARGMAX variant) picks the lowest index among exact ties, as
    the chunked version's torch.max does: selection-free gradients are then the same, run after run."""
    run_in_interpreter(TIES_SCRIPT)


def test_triton_on_cpu_without_interpreter_is_refused():
    from minifilip.kernels import load_triton
    cmli_triton = load_triton()
    if cmli_triton is not None and cmli_triton.INTERPRET:
        pytest.skip("this process runs Triton's interpreter")
    v, w, tm, im = make_inputs(2, 2, 3, 3, 4, seed=0)
    with pytest.raises(ValueError, match="triton"):
        late_interaction(v, im, w, tm, impl="triton")


# ------------------------------------------------------------------------------------------- invalid inputs
@pytest.mark.parametrize("impl", ["reference", "chunked", "auto"])
def test_invalid_inputs_raise(impl):
    v, w, tm, im = make_inputs(3, 4, 5, 6, 8, seed=1)
    empty = tm.clone()
    empty[2] = False
    with pytest.raises(ValueError, match="no valid token"):
        late_interaction(v, im, w, empty, impl=impl)
    no_patch = im.clone()
    no_patch[1] = False
    with pytest.raises(ValueError, match="no valid patch"):
        late_interaction(v, no_patch, w, tm, impl=impl)
    with pytest.raises(ValueError, match="embedding dims"):
        late_interaction(v, im, w[..., :4], tm, impl=impl)
    with pytest.raises(ValueError, match="3-D"):
        late_interaction(v[0], im, w, tm, impl=impl)
    with pytest.raises(ValueError, match="text_mask"):
        late_interaction(v, im, w, tm[:, :3], impl=impl)
    with pytest.raises(ValueError, match="image_mask"):
        late_interaction(v, im[:2], w, tm, impl=impl)


def test_unknown_impl_and_option_raise():
    v, w, tm, im = make_inputs(2, 2, 3, 3, 4, seed=0)
    with pytest.raises(ValueError, match="unknown late-interaction impl"):
        late_interaction(v, im, w, tm, impl="fastest")
    with pytest.raises(ValueError, match="backward"):
        late_interaction(v, im, w, tm, impl="chunked", backward="magic")
