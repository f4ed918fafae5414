"""Benchmark the CMLI implementations: forward + backward of the symmetric InfoNCE loss over the CMLI scores.

    python benchmarks/bench_cmli.py                       # CUDA: bf16, N=196, M=32, d=256, batch 128..4096
    python benchmarks/bench_cmli.py --device cpu          # CPU: fp32, small batches
    python benchmarks/bench_cmli.py --check --tune 1024 --json out.json
    python benchmarks/bench_cmli.py --set fwd.ARGMAX=2 --set bwd_w.SPLIT_I=4 --batches 1024 --impls triton
    python benchmarks/bench_cmli.py --ranking --tune-ranking 1024 --batches 1024 --impls triton
    TRITON_INTERPRET=1 python benchmarks/bench_cmli.py --device cpu --check   # CPU: fp32 kernels, interpreter

Per batch: median ms (CUDA events) and peak extra GiB (max_memory_allocated minus the baseline with the inputs
already allocated) for each implementation, plus the time of one [B*N, d] @ [d, B*M] matmul (the floor: every
implementation must at least form all the scores once) and each implementation's ratio to it. An implementation
that runs out of memory shows "OOM" and is skipped at larger batches, as is one slower than --time-cap-ms.
--ranking adds token selection's ranking (`cmli.token_max_similarity`, chunked and fused) per batch, in the same
ratio to the matmul. --check compares scores and gradients with a float64 reference (bf16 Triton needs a GPU: the
interpreter cannot run bf16 tl.dot); --check-large B compares triton with chunked at batch B (index overflow).
Every kernel knob is settable with --set KERNEL.KEY=VALUE (KERNEL: fwd, bwd_v, bwd_w of cmli_triton.CONFIG, or
ranking for ranking_triton.CONFIG), so a GPU session can time each in one command.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minifilip.cli import Parser, one_line  # noqa: E402
from minifilip.cmli import late_interaction, token_max_similarity  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_inputs(B, N, M, D, dtype, device, seed=0):
    """Normalised random tokens; texts have random lengths (>= 4 tokens), images are all valid (ViT patches)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    v = F.normalize(torch.randn(B, N, D, generator=g), dim=-1).to(device, dtype).requires_grad_()
    w = F.normalize(torch.randn(B, M, D, generator=g), dim=-1).to(device, dtype).requires_grad_()
    lengths = torch.randint(4, M + 1, (B,), generator=g)
    text_mask = (torch.arange(M)[None, :] < lengths[:, None]).to(device)
    return v, w, text_mask


def loss_step(v, w, text_mask, impl, options, scale=10.0):
    """Symmetric InfoNCE over the CMLI scores; returns the input gradients (not accumulated into .grad)."""
    s_i2t, s_t2i = late_interaction(v, None, w, text_mask, impl=impl, **options)
    target = torch.arange(v.shape[0], device=v.device)
    loss = 0.5 * (F.cross_entropy(scale * s_i2t, target) + F.cross_entropy(scale * s_t2i.T, target))
    return torch.autograd.grad(loss, [v, w])


class Timer:
    """Median wall time of fn in ms: CUDA events on GPU, perf_counter on CPU; the rep count adapts to a budget."""

    def __init__(self, device, budget_ms=1500.0, max_reps=20):
        self.cuda = device.type == "cuda"
        self.budget_ms, self.max_reps = budget_ms, max_reps

    def once(self, fn):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)

    def median(self, fn, warmup=1):
        for _ in range(warmup):
            self.once(fn)
        first = self.once(fn)
        reps = int(min(self.max_reps, max(2, self.budget_ms // max(first, 1e-3))))
        return statistics.median([first] + [self.once(fn) for _ in range(reps)])


def peak_extra_gib(fn, device):
    """Peak memory above the current allocation while fn runs (GiB); None on CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def matmul_ms(B, N, M, D, dtype, device, timer, max_out_bytes=16 * 2**30):
    """One [B*N, d] @ [d, B*M] product. When its output would pass max_out_bytes (batch 4096: 210 GB), the same
    FLOPs run as row chunks into one reused output buffer."""
    a = torch.randn(B * N, D, device=device, dtype=dtype)
    b = torch.randn(D, B * M, device=device, dtype=dtype)
    rows = max(1, min(B * N, max_out_bytes // (B * M * a.element_size())))
    out = torch.empty(rows, B * M, device=device, dtype=dtype)

    def run():
        for r0 in range(0, B * N, rows):
            r1 = min(B * N, r0 + rows)
            torch.matmul(a[r0:r1], b, out=out[: r1 - r0])

    ms = timer.median(run)
    del a, b, out
    return ms, rows < B * N


# --------------------------------------------------------------------------------------------------- checks
# Targets of issue 17 for the fused kernel in bf16 vs float64 (relative error): scores 1e-3, gradients 1e-2.
BF16_TARGETS = {"scores": 1e-3, "grads": 1e-2}


def triton_runs_here(device) -> bool:
    """The Triton kernels run on CUDA, or on the CPU in Triton's interpreter (TRITON_INTERPRET=1 before import)."""
    from minifilip.kernels import load_triton
    kernel = load_triton()
    return kernel is not None and (device.type == "cuda" or kernel.INTERPRET)


def check(device, dtype_names=("fp32", "bf16")):
    """Compare chunked and triton with a float64 reference (scores and input gradients) at a few awkward sizes, and
    the ranking (token_max_similarity) with a float64 full-matrix one. CUDA: real sizes, fp32 and bf16; CPU: tiny
    sizes, triton only in fp32 under the interpreter (bf16 tl.dot needs a GPU). Returns a JSON-able dict."""
    cuda = device.type == "cuda"
    sizes = ([(37, 29, 196, 32, 256), (8, 5, 50, 7, 64), (3, 70, 196, 1, 256)] if cuda
             else [(5, 4, 13, 6, 16), (3, 7, 9, 1, 16)])
    triton_here = triton_runs_here(device)
    out = {"device": str(device), "cases": [], "worst": {}, "notes": []}
    if not cuda:
        out["notes"].append("bf16 triton not checked: needs a GPU (the CPU interpreter cannot run bf16 tl.dot)")
        if not triton_here:
            out["notes"].append("triton not checked: run with TRITON_INTERPRET=1 to check the kernels on the CPU")
    for note in out["notes"]:
        print("check:", note)
    for name in dtype_names:
        dtype = DTYPES[name]
        for (I, T, N, M, D) in sizes:
            g = torch.Generator().manual_seed(I * T + N)
            v = F.normalize(torch.randn(I, N, D, generator=g), dim=-1).to(device, dtype).requires_grad_()
            w = F.normalize(torch.randn(T, M, D, generator=g), dim=-1).to(device, dtype).requires_grad_()
            tm = torch.rand(T, M, generator=g) < 0.6
            tm[:, 0] = True
            im = torch.rand(I, N, generator=g) < 0.9
            im[:, 0] = True
            tm, im = tm.to(device), im.to(device)
            gi, gt = torch.randn(I, T, generator=g).to(device), torch.randn(I, T, generator=g).to(device)
            # reference in float64 from the same (rounded) inputs: the best answer these inputs allow
            v64, w64 = v.detach().double().requires_grad_(), w.detach().double().requires_grad_()
            a, b = late_interaction(v64, im, w64, tm, impl="reference")
            ref = [a, b, *torch.autograd.grad((a * gi).sum() + (b * gt).sum(), [v64, w64])]
            s = v64.detach().flatten(0, 1) @ w64.detach().flatten(0, 1).T  # (I*N, T*M) flat scores
            s = s.masked_fill(~tm.flatten()[None, :], -math.inf).masked_fill(~im.flatten()[:, None], -math.inf)
            rank_ref = [s.amax(dim=1), s.amax(dim=0)]
            for impl in ("chunked", "triton"):
                if impl == "triton" and (not triton_here or (not cuda and dtype != torch.float32)):
                    continue
                a, b = late_interaction(v, im, w, tm, impl=impl)
                out_ = [a, b, *torch.autograd.grad((a * gi).sum() + (b * gt).sum(), [v, w])]
                errs = [((o.double() - r).norm() / r.norm()).item() for o, r in zip(out_, ref)]
                rank = token_max_similarity(v.detach(), im, w.detach(), tm, impl=impl)
                for o, r in zip(rank, rank_ref):  # the same -inf pattern, then the finite values
                    ok = torch.isfinite(r)
                    same = torch.equal(torch.isinf(o.flatten()), ~ok)
                    errs.append(((o.flatten()[ok].double() - r[ok]).norm() / r[ok].norm()).item() if same
                                else math.inf)
                keys = ["s_i2t", "s_t2i", "dV", "dW", "rank_patch", "rank_token"]
                case = dict(dtype=name, impl=impl, size=[I, T, N, M, D], **dict(zip(keys, errs)))
                out["cases"].append(case)
                bad = any(math.isnan(e) or math.isinf(e) for e in errs)
                print(f"check {name} {impl:8s} I={I} T={T} N={N} M={M} D={D}: rel err "
                      + " ".join(f"{k} {e:.1e}" for k, e in zip(keys, errs)) + (" BAD!" if bad else ""))
                worst = out["worst"].setdefault(f"{name}/{impl}", {"scores": 0.0, "grads": 0.0, "ranking": 0.0})
                worst["scores"] = max(worst["scores"], *errs[:2])
                worst["grads"] = max(worst["grads"], *errs[2:4])
                worst["ranking"] = max(worst["ranking"], *errs[4:])
    if "bf16/triton" in out["worst"]:
        w = out["worst"]["bf16/triton"]
        out["bf16_targets_met"] = {k: w[k] <= t for k, t in BF16_TARGETS.items()}
        print(f"bf16 triton vs float64: scores {w['scores']:.1e} (target {BF16_TARGETS['scores']:.0e}), "
              f"gradients {w['grads']:.1e} (target {BF16_TARGETS['grads']:.0e})")
    return out


def check_large(B, N, M, D, dtype, device):
    """Triton vs chunked at one large batch (scores, gradients, ranking): at B = 4096, I*T*N = 3.3e9 > 2**31, so an
    int32 offset anywhere in the index arithmetic would show here as garbage, not as rounding."""
    v, w, tm = make_inputs(B, N, M, D, dtype, device, seed=1)
    g = torch.Generator().manual_seed(2)
    gi, gt = torch.randn(B, B, generator=g).to(device), torch.randn(B, B, generator=g).to(device)
    res = {}
    for impl in ("triton", "chunked"):
        a, b = late_interaction(v, None, w, tm, impl=impl)
        dv, dw = torch.autograd.grad((a * gi).sum() + (b * gt).sum(), [v, w])
        rank = token_max_similarity(v.detach(), torch.ones(B, N, dtype=torch.bool, device=device), w.detach(), tm,
                                    impl=impl)
        res[impl] = [a, b, dv, dw, *rank]
        if device.type == "cuda":
            torch.cuda.synchronize()
    keys = ["s_i2t", "s_t2i", "dV", "dW", "rank_patch", "rank_token"]
    errs = {}
    for k, o, r in zip(keys, res["triton"], res["chunked"]):
        ok = torch.isfinite(r)
        errs[k] = ((o[ok].double() - r[ok].double()).norm() / r[ok].double().norm()).item()
        errs[k + "_finite"] = bool(torch.isfinite(o[ok]).all()) and torch.equal(torch.isfinite(o), ok)
    print(f"check-large B={B}: triton vs chunked rel err", json.dumps(errs))
    return dict(batch=B, N=N, M=M, D=D, dtype=str(dtype), rel_err_vs_chunked=errs)


# --------------------------------------------------------------------------------------------------- tuning
def _cfgs(keys, rows):
    return [dict(zip(keys, r)) for r in rows]


# (BLOCK_N, BT, BLOCK_D*, num_warps, num_stages[, ARGMAX | SPLIT_I]); the first of each list is the committed
# default. Earlier sweeps (benchmarks/RESULTS.md) covered the tile shapes; these lists time the newer knobs: the
# forward's arg-max (0: tl.max with indices, 1: max, then min index where equal) and the dW kernel's split of the
# images over SPLIT_I programs per text block (fp32 atomics).
TUNE_CANDIDATES = {
    "fwd": _cfgs(("BLOCK_N", "BT", "BLOCK_D", "num_warps", "num_stages", "ARGMAX"),
                 [(64, 8, 64, 8, 3, 0), (64, 8, 64, 8, 3, 1), (64, 8, 64, 8, 3, 2), (64, 16, 64, 8, 3, 1),
                  (128, 8, 64, 8, 3, 1), (64, 4, 64, 8, 3, 1)]),
    "bwd_v": _cfgs(("BLOCK_N", "BT", "BLOCK_DV", "num_warps", "num_stages"),
                   [(64, 2, 256, 4, 3), (64, 4, 256, 8, 3)]),
    "bwd_w": _cfgs(("BLOCK_N", "BT", "BLOCK_DW", "num_warps", "num_stages", "SPLIT_I"),
                   [(64, 4, 128, 8, 3, 1), (64, 4, 128, 8, 3, 2), (64, 4, 128, 8, 3, 4), (64, 4, 128, 8, 3, 8),
                    (64, 8, 64, 8, 3, 4)]),
}


def tune(B, N, M, D, dtype, device, timer):
    """Time each Triton kernel alone for each candidate tile config; keep the fastest in cmli_triton.CONFIG."""
    from minifilip.kernels import cmli_triton as ct
    v, w, tm = make_inputs(B, N, M, D, dtype, device)
    v, w = v.detach(), w.detach()
    im = torch.ones(B, N, dtype=torch.int8, device=device)
    tm8 = tm.to(torch.int8)
    flops = 2 * B * B * N * M * D
    _, _, i2t, t2i, inv_ni, inv_mj = ct.cmli_forward(v, w, im, tm8)
    ga = torch.randn(B, B, device=device) * inv_ni[:, None]
    gb = torch.randn(B, B, device=device) * inv_mj[None, :]
    runs = {"fwd": lambda: ct.cmli_forward(v, w, im, tm8),
            "bwd_v": lambda: ct.cmli_backward_v(v, w, im, tm8, i2t, t2i, ga, gb),
            "bwd_w": lambda: ct.cmli_backward_w(v, w, im, tm8, i2t, t2i, ga, gb)}
    report = {}
    for kernel in ("fwd", "bwd_v", "bwd_w"):
        best = None
        for cfg in TUNE_CANDIDATES[kernel]:
            ct.CONFIG[kernel] = cfg
            try:
                ms = timer.median(runs[kernel])
            except Exception as e:  # e.g. a tile that needs more shared memory than the chip has
                print(f"tune {kernel} {cfg}: failed ({type(e).__name__}: {str(e)[:80]})")
                continue
            print(f"tune {kernel} {cfg}: {ms:.2f} ms ({flops / ms / 1e9:.0f} TFLOP/s of dense-equivalent work)")
            report.setdefault(kernel, []).append([cfg, ms])
            if best is None or ms < best[1]:
                best = (cfg, ms)
        ct.CONFIG[kernel] = best[0]
        print(f"tune {kernel}: best {best[0]} {best[1]:.2f} ms")
    print("tuned CONFIG =", json.dumps(ct.CONFIG))
    return report


# (BLOCK_R, BLOCK_C, BLOCK_D, num_warps, num_stages) of the fused ranking; the first is the committed default.
# BLOCK_D=256 (= d) loads each program's rows once for its whole column walk. All compile for sm_90a without
# spills except the 4-warp BLOCK_D=256 ones (ptxas -v, Triton 3.8; see benchmarks/RESULTS.md).
RANKING_CANDIDATES = _cfgs(("BLOCK_R", "BLOCK_C", "BLOCK_D", "num_warps", "num_stages"),
                           [(128, 128, 64, 8, 3), (128, 128, 256, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 3),
                            (128, 64, 64, 4, 3), (128, 128, 64, 8, 4)])


def tune_ranking(B, N, M, D, dtype, device, timer):
    """Time the fused ranking kernel alone per candidate tile config; keep the fastest in ranking_triton.CONFIG."""
    from minifilip.kernels import ranking_triton as rt
    v, w, tm = make_inputs(B, N, M, D, dtype, device)
    v, w = v.detach().flatten(0, 1).contiguous(), w.detach().flatten(0, 1).contiguous()
    v_ok = torch.ones(v.shape[0], dtype=torch.int8, device=device)
    w_ok = tm.flatten().to(torch.int8)
    report, best = [], None
    for cfg in RANKING_CANDIDATES:
        rt.CONFIG.update(cfg)
        try:
            ms = timer.median(lambda: rt.row_col_max(v, w, v_ok, w_ok))
        except Exception as e:  # e.g. a tile that needs more shared memory than the chip has
            print(f"tune ranking {cfg}: failed ({type(e).__name__}: {str(e)[:80]})")
            continue
        print(f"tune ranking {cfg}: {ms:.2f} ms")
        report.append([dict(cfg), ms])
        if best is None or ms < best[1]:
            best = (dict(cfg), ms)
    rt.CONFIG.update(best[0])
    print(f"tune ranking: best {best[0]} {best[1]:.2f} ms")
    return report


def apply_settings(settings: list[str]) -> dict:
    """--set KERNEL.KEY=VALUE (int values) into cmli_triton.CONFIG / ranking_triton.CONFIG; returns what was set."""
    from minifilip.kernels import load_ranking_triton, load_triton
    done = {}
    for item in settings:
        try:
            target, value = item.split("=")
            kernel, key = target.split(".")
            value = int(value)
        except ValueError:
            raise ValueError(f"--set {item!r}: expected KERNEL.KEY=INT, e.g. fwd.ARGMAX=2") from None
        module = load_ranking_triton() if kernel == "ranking" else load_triton()
        if module is None:
            raise ValueError(f"--set {item}: Triton cannot be imported here")
        config = module.CONFIG if kernel == "ranking" else module.CONFIG.get(kernel)
        if config is None:
            raise ValueError(f"--set {item}: kernel must be one of fwd, bwd_v, bwd_w, ranking")
        known = {"fwd": {"ARGMAX"}, "bwd_w": {"SPLIT_I"}}.get(kernel, set())
        if key not in config and key not in known:
            raise ValueError(f"--set {item}: {kernel} has no knob {key} (has {sorted(set(config) | known)})")
        config[key] = value
        done[target] = value
    return done


def ranking_ms(B, N, M, D, dtype, device, timer, impls):
    """Median ms of token selection's ranking at batch B, per impl (chunked, triton)."""
    v, w, tm = make_inputs(B, N, M, D, dtype, device, seed=B)
    v, w = v.detach(), w.detach()
    im = torch.ones(B, N, dtype=torch.bool, device=device)
    out = {}
    for impl in impls:
        try:
            out[impl] = timer.median(lambda: token_max_similarity(v, im, w, tm, impl=impl))
        except torch.cuda.OutOfMemoryError:
            out[impl] = None
    return out


def compiled_variants() -> dict:
    """How many binaries Triton compiled per kernel in this process (None where this Triton keeps them
    elsewhere): batch sizes and lengths are runtime arguments, so new batch sizes must not add any."""
    from minifilip.kernels import load_ranking_triton, load_triton
    out = {}
    for name, kernel in (("ranking", load_ranking_triton()._ranking_kernel),
                         ("cmli_fwd", load_triton()._cmli_fwd_kernel)):
        try:
            out[name] = sum(len(entry[0]) for entry in kernel.device_caches.values())
        except (AttributeError, TypeError, IndexError):
            out[name] = None
    return out


def write_json(path: Path, data: dict) -> None:
    """Atomic: a temp file renamed over the target, so a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------------ main
def main(argv=None):
    p = Parser(prog="benchmarks/bench_cmli.py", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--batches", type=int, nargs="+", default=None,
                   help="default 128 256 512 1024 2048 4096 on CUDA, 16 32 64 on CPU")
    p.add_argument("--N", type=int, default=None, help="patches per image (default 196 CUDA, 49 CPU)")
    p.add_argument("--M", type=int, default=32, help="tokens per text")
    p.add_argument("--D", type=int, default=None, help="embedding dim (default 256 CUDA, 64 CPU)")
    p.add_argument("--impls", nargs="+", default=None,
                   help="of reference chunked chunked-recompute triton (default: all; no triton on CPU)")
    p.add_argument("--time-cap-ms", type=float, default=2500.0, help="skip an impl at larger batches past this")
    p.add_argument("--check", action="store_true", help="first compare every impl with a float64 reference")
    p.add_argument("--check-large", type=int, default=0, metavar="BATCH",
                   help="compare triton with chunked at this batch (scores, gradients, ranking)")
    p.add_argument("--tune", type=int, default=0, metavar="BATCH", help="first tune the Triton tiles at BATCH")
    p.add_argument("--tune-ranking", type=int, default=0, metavar="BATCH",
                   help="first tune the fused ranking kernel's tiles at BATCH")
    p.add_argument("--set", action="append", default=[], metavar="KERNEL.KEY=INT",
                   help="set one kernel knob (repeatable): fwd.ARGMAX=2, bwd_w.SPLIT_I=4, ranking.BLOCK_D=256, ...")
    p.add_argument("--ranking", action="store_true", help="also time the selection ranking (chunked and triton)")
    p.add_argument("--no-table", action="store_true", help="skip the per-batch fwd+bwd table")
    p.add_argument("--budget-ms", type=float, default=1500.0,
                   help="time budget per measurement; the repeat count (2..20) adapts to it")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    args = p.parse_args(argv)
    if args.json and args.json.exists() and not args.overwrite:
        p.error(f"--json {args.json} exists; pass --overwrite to replace it")
    try:
        settings = apply_settings(args.set)
    except ValueError as e:
        p.error(one_line(e))
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    batches = args.batches or ([128, 256, 512, 1024, 2048, 4096] if cuda else [16, 32, 64])
    N, M, D = args.N or (196 if cuda else 49), args.M, args.D or (256 if cuda else 64)
    timer = Timer(device, budget_ms=args.budget_ms)
    args.impls = args.impls or ["reference", "chunked", "chunked-recompute"] + (["triton"] if cuda else [])
    if cuda:
        import triton
        env = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}"
    else:
        env = f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}"
    print(env)
    results = {"env": env, "dtype": str(dtype), "N": N, "M": M, "D": D, "settings": settings, "rows": []}
    def save():  # after every phase: a run stopped by a time limit still leaves what it measured
        if args.json:
            write_json(args.json, results)

    if args.tune:
        results["tune"] = tune(args.tune, N, M, D, dtype, device, timer)
        save()
    if args.tune_ranking:
        results["tune_ranking"] = tune_ranking(args.tune_ranking, N, M, D, dtype, device, timer)
        save()
    if args.check:  # after tuning: check the tiles the table will use
        results["check"] = check(device)
        save()
    if args.check_large:
        results["check_large"] = check_large(args.check_large, N, M, D, dtype, device)
        save()
    if triton_runs_here(device):
        from minifilip.kernels import load_ranking_triton, load_triton
        results["config"] = {"cmli": load_triton().CONFIG, "ranking": load_ranking_triton().CONFIG}
    rank_impls = ["chunked"] + (["triton"] if triton_runs_here(device) else [])
    if args.no_table:
        batches = []

    impls = {"reference": ("reference", {}), "chunked": ("chunked", {"backward": "indices"}),
             "chunked-recompute": ("chunked", {"backward": "recompute"}), "triton": ("triton", {})}
    dropped = {}
    for B in batches:
        row = {"batch": B}
        try:
            row["matmul_ms"], row["matmul_chunked"] = matmul_ms(B, N, M, D, dtype, device, timer)
        except torch.cuda.OutOfMemoryError:
            row["matmul_ms"] = None
        if cuda:
            torch.cuda.empty_cache()
        if args.ranking:
            row["ranking_ms"] = ranking_ms(B, N, M, D, dtype, device, timer, rank_impls)
            print(f"batch {B} ranking ms: {row['ranking_ms']}", flush=True)
        v, w, tm = make_inputs(B, N, M, D, dtype, device, seed=B)
        for name in args.impls:
            impl, options = impls[name]
            if name in dropped:
                row[name] = {"status": dropped[name]}
                continue
            step = lambda: loss_step(v, w, tm, impl, options)  # noqa: E731
            try:
                ms = timer.median(step)
                gib = peak_extra_gib(step, device)
                row[name] = {"ms": ms, "gib": gib}
                if ms > args.time_cap_ms:
                    dropped[name] = "skipped (slow)"
            except torch.cuda.OutOfMemoryError:
                row[name] = {"status": "OOM"}
                dropped[name] = "skipped (OOM)"
            if cuda:
                torch.cuda.empty_cache()
            print(f"batch {B} {name}: {row[name]}", flush=True)
        del v, w, tm
        results["rows"].append(row)
        save()

    # the table
    names = args.impls
    rank_cols = rank_impls if args.ranking else []
    head = (["batch", "1 matmul ms"] + [f"{n} ms (x mm) / GiB" for n in names]
            + [f"ranking {n} ms (x mm)" for n in rank_cols])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in results["rows"]:
        mm = row["matmul_ms"]
        cells = [str(row["batch"]), "OOM" if mm is None else f"{mm:.2f}" + ("*" if row.get("matmul_chunked") else "")]
        for n in names:
            r = row[n]
            if "status" in r:
                cells.append(r["status"])
            else:
                ratio = f" ({r['ms'] / mm:.1f}x)" if mm else ""
                mem = "" if r["gib"] is None else f" / {r['gib']:.2f}"
                cells.append(f"{r['ms']:.1f}{ratio}{mem}")
        for n in rank_cols:
            ms = row["ranking_ms"].get(n)
            cells.append("OOM" if ms is None else f"{ms:.1f}" + (f" ({ms / mm:.1f}x)" if mm else ""))
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(f"\nfwd+bwd of symmetric InfoNCE over CMLI, {dtype}, N={N}, M={M}, d={D}; {env}")
    print("(* matmul run as row chunks: its single output would not fit)\n")
    print(table)
    results["table"] = table
    if cuda:
        results["compiled_variants"] = compiled_variants()
        print("compiled kernel variants (one per dtype/tile config; batch sizes add none):",
              results["compiled_variants"])
    save()


if __name__ == "__main__":
    main()
