"""Benchmark the CMLI implementations: forward + backward of the symmetric InfoNCE loss over the CMLI scores.

    python benchmarks/bench_cmli.py                       # CUDA: bf16, N=196, M=32, d=256, batch 128..4096
    python benchmarks/bench_cmli.py --device cpu          # CPU: fp32, small batches
    python benchmarks/bench_cmli.py --check --tune --json out.json

Per batch: median ms (CUDA events) and peak extra GiB (max_memory_allocated minus the baseline with the inputs
already allocated) for each implementation, plus the time of one [B*N, d] @ [d, B*M] matmul (the floor: every
implementation must at least form all the scores once) and each implementation's ratio to it. An implementation
that runs out of memory shows "OOM" and is skipped at larger batches, as is one slower than --time-cap-ms.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minifilip.cmli import late_interaction  # noqa: E402

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
def check(device, dtype_names=("fp32", "bf16")):
    """Compare chunked and triton with the reference (scores and input gradients) at a few awkward sizes."""
    worst = {}
    for name in dtype_names:
        dtype = DTYPES[name]
        for (I, T, N, M, D) in [(37, 29, 196, 32, 256), (8, 5, 50, 7, 64), (3, 70, 196, 1, 256)]:
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
            for impl in ("chunked", "triton"):
                if impl == "triton" and device.type != "cuda":
                    continue
                a, b = late_interaction(v, im, w, tm, impl=impl)
                out = [a, b, *torch.autograd.grad((a * gi).sum() + (b * gt).sum(), [v, w])]
                errs = [((o.double() - r).norm() / r.norm()).item() for o, r in zip(out, ref)]
                bad = any(math.isnan(e) for e in errs)
                print(f"check {name} {impl:8s} I={I} T={T} N={N} M={M} D={D}: rel err s_i2t {errs[0]:.1e} "
                      f"s_t2i {errs[1]:.1e} dV {errs[2]:.1e} dW {errs[3]:.1e}{' NaN!' if bad else ''}")
                worst[(name, impl)] = max(worst.get((name, impl), 0.0), *errs)
    return {f"{k[0]}/{k[1]}": v for k, v in worst.items()}


# --------------------------------------------------------------------------------------------------- tuning
def _cfgs(keys, rows):
    return [dict(zip(keys, r)) for r in rows]


# (BLOCK_N, BT, BLOCK_D*, num_warps, num_stages[, ARGMAX | SPLIT_I]); the first of each list is the committed
# default. Earlier sweeps (benchmarks/RESULTS.md) covered the tile shapes; these lists time the newer knobs: the
# forward's arg-max (0: tl.max with indices, 1: max, then min index where equal) and the dW kernel's split of the
# images over SPLIT_I programs per text block (fp32 atomics).
TUNE_CANDIDATES = {
    "fwd": _cfgs(("BLOCK_N", "BT", "BLOCK_D", "num_warps", "num_stages", "ARGMAX"),
                 [(64, 8, 64, 8, 3, 0), (64, 8, 64, 8, 3, 1), (64, 16, 64, 8, 3, 1), (128, 8, 64, 8, 3, 1)]),
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


# ------------------------------------------------------------------------------------------------------ main
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--tune", type=int, default=0, metavar="BATCH", help="first tune the Triton tiles at BATCH")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    batches = args.batches or ([128, 256, 512, 1024, 2048, 4096] if cuda else [16, 32, 64])
    N, M, D = args.N or (196 if cuda else 49), args.M, args.D or (256 if cuda else 64)
    timer = Timer(device)
    args.impls = args.impls or ["reference", "chunked", "chunked-recompute"] + (["triton"] if cuda else [])
    if cuda:
        import triton
        env = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}"
    else:
        env = f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}"
    print(env)
    results = {"env": env, "dtype": str(dtype), "N": N, "M": M, "D": D, "rows": []}
    if args.tune:
        results["tune"] = tune(args.tune, N, M, D, dtype, device, timer)
    if args.check:  # after tuning: check the tiles the table will use
        results["check_max_rel_err"] = check(device)

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

    # the table
    names = args.impls
    head = ["batch", "1 matmul ms"] + [f"{n} ms (x mm) / GiB" for n in names]
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
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(f"\nfwd+bwd of symmetric InfoNCE over CMLI, {dtype}, N={N}, M={M}, d={D}; {env}")
    print("(* matmul run as row chunks: its single output would not fit)\n")
    print(table)
    results["table"] = table
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
