"""Training-step throughput: plain vs gradient-cached, FILIP vs CLIP loss, eager vs torch.compile.

    python benchmarks/bench_train.py                        # CUDA: `small` preset, 224 px, bf16 (a)-(d)
    python benchmarks/bench_train.py --compile --json out.json
    python benchmarks/bench_train.py --device cpu           # tiny preset, small batches, runs anywhere

Inputs are synthetic and live on the device (random images, random captions of 5-30 words padded to the
context length), so the numbers are the model's, not a data loader's. One step = zero_grad, forward +
backward (plain, or `cached_backward`), AdamW step. Measured parts:

  (a) plain training at the largest batch that fits (batches searched upwards until out of memory)
  (b) gradient-cached training at that batch (overhead ratio; theory 4/3: one extra forward of 3 units)
  (c) gradient-cached training at contrastive batch 4096, micro-batch 256
  (d) FILIP (token selection 25%) vs CLIP loss, plain, at batch 1024
  anchor: CLIP loss, plain, batch 512 (compare: an eager timm ViT-S/16 + 6-layer text tower, 4,900 img/s)
  (e) --loss-rows (issue 17): at contrastive batches --loss-batches (default 1024 and 2048), CLIP, FILIP and
      FILIP with --keep-ratio selection: the whole step, the loss alone (forward + backward of the contrastive
      loss on already-encoded tokens) and the ranking alone (`cmli.token_max_similarity`, auto = the fused kernel
      on CUDA; also the chunked one there, for comparison). One model per mode serves all three losses (the towers
      do not depend on the loss), so torch.compile compiles once per batch shape.

MFU counts the two encoders' model FLOPs only (matmuls ~2 x params x tokens, plus attention; x3 for
forward + backward), not the loss and not gradient caching's recomputed forward, against the bf16 dense
peak (989 TFLOP/s on H100 SXM). A cached step does 4/3 of the work for the same model FLOPs, so its MFU
is lower by construction.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minifilip import FILIP, FILIPConfig, cmli  # noqa: E402
from minifilip.cli import Parser  # noqa: E402
from minifilip.gradcache import cached_backward, reference_microbatched_loss  # noqa: E402

PEAK_BF16_FLOPS = 989e12  # H100 SXM dense bf16


# ---------------------------------------------------------------------------------------- FLOP counting
def tower_flops(tokens: int, width: int, layers: int, mlp_ratio: float, causal: bool) -> float:
    """Forward FLOPs of one sample through a transformer stack: linears 2*(4w^2 + 2*w*h) per token per
    layer, attention scores and weighted sum 2 * 2 * T^2 * w per layer (half of it when causal)."""
    hidden = int(width * mlp_ratio)
    linear = 2 * tokens * (4 * width * width + 2 * width * hidden)
    attention = 4 * tokens * tokens * width * (0.5 if causal else 1.0)
    return layers * (linear + attention)


def encoder_flops_per_sample(cfg: FILIPConfig, text_len: int) -> float:
    """Forward FLOPs of both encoders for one (image, caption) pair, embedding projections included."""
    n = cfg.num_patches
    vision = (2 * n * 3 * cfg.patch_size ** 2 * cfg.vision_width  # patch embedding
              + tower_flops(1 + n, cfg.vision_width, cfg.vision_layers, cfg.mlp_ratio, causal=False)
              + 2 * (1 + n) * cfg.vision_width * cfg.embed_dim)  # per-token projection
    text = (tower_flops(text_len, cfg.text_width, cfg.text_layers, cfg.mlp_ratio, causal=True)
            + 2 * text_len * cfg.text_width * cfg.embed_dim)
    return vision + text


# ---------------------------------------------------------------------------------------- inputs
def synthetic_batch(cfg: FILIPConfig, batch: int, device: torch.device, seed: int = 0):
    """Random images (B, 3, H, W) and caption ids (B, L): [BOS] 5-30 random words [EOS] [PAD]...

    Words are capped so [BOS] + words + [EOS] fit the context length (the tiny preset's is 24).
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    images = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g).to(device)
    L = cfg.context_length
    lengths = torch.randint(5, min(30, L - 2) + 1, (batch,), generator=g)  # (B,) words per caption
    pos = torch.arange(L)[None, :]  # (1, L)
    words = torch.randint(4, cfg.vocab_size, (batch, L), generator=g)  # (B, L)
    ids = torch.where(pos <= lengths[:, None], words, 0)  # words then padding
    ids[:, 0] = 1  # [BOS]
    ids[torch.arange(batch), lengths + 1] = 2  # [EOS]
    return images, ids.to(device)


# ---------------------------------------------------------------------------------------- one measurement
def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.rows: list[dict] = []
        self.models: dict = {}
        self.t0 = time.perf_counter()

    def out_of_time(self) -> bool:
        return time.perf_counter() - self.t0 > self.args.time_budget

    def model(self, loss: str, keep: float, compiled: bool):
        """One model + AdamW per (loss, keep ratio, compiled); reused across batch sizes."""
        key = (loss, keep, compiled)
        if key not in self.models:
            self.models.clear()  # free the previous model's memory before building the next
            gc.collect()
            torch.manual_seed(0)
            cfg = FILIPConfig.preset(self.args.preset, loss="filip" if loss == "shared" else loss,
                                     token_keep_ratio=keep, dropout=0.0,
                                     **({"vocab_size": 32000, "context_length": 32} if self.args.preset != "tiny"
                                        else {}))
            model = FILIP(cfg).to(self.device).train()
            if compiled:  # compile the towers in place: state_dict keys unchanged, loss code stays eager
                model.visual.compile()
                model.text.compile()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=self.cuda)
            self.models[key] = (model, opt)
        return self.models[key]

    def shared_model(self, loss: str, keep: float, compiled: bool):
        """One model + AdamW per mode for every loss: its config is swapped to (loss, keep) on each call. The
        towers never read the loss, so a compiled model is not recompiled when only the loss changes."""
        model, opt = self.model("shared", 1.0, compiled)
        model.config = dataclasses.replace(model.config, loss=loss, token_keep_ratio=keep)
        return model, opt

    def timed_ms(self, fn) -> float:
        """Median ms of fn over --steps runs after one untimed run (synchronised on CUDA)."""
        times = []
        for i in range(1 + self.args.steps):
            if self.cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if self.cuda:
                torch.cuda.synchronize()
            if i:
                times.append(1e3 * (time.perf_counter() - t))
        return round(statistics.median(times), 2)

    def loss_and_ranking(self, model, images, ids, row: dict) -> None:
        """row += loss_ms (fwd + bwd of the contrastive loss on encoded tokens) and, for token losses, ranking_ms
        (token_max_similarity, auto) and on CUDA ranking_chunked_ms."""
        amp = dict(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.args.amp == "bf16")
        with torch.no_grad(), torch.autocast(**amp):
            it, im = model.encode_image(images)
            tt, tm = model.encode_text(ids)
        it, tt = it.detach().requires_grad_(), tt.detach().requires_grad_()

        def loss_only():
            with torch.autocast(**amp):
                loss = model.contrastive_loss(it, im, tt, tm)
            loss.backward()
            it.grad = tt.grad = model.logit_scale.grad = None

        row["loss_ms"] = self.timed_ms(loss_only)
        if it.shape[1] > 1:  # token-wise: what selection would rank
            row["ranking_ms"] = self.timed_ms(lambda: cmli.token_max_similarity(it, im, tt, tm))
            if self.cuda:
                row["ranking_chunked_ms"] = self.timed_ms(
                    lambda: cmli.token_max_similarity(it, im, tt, tm, impl="chunked"))

    def step(self, model, opt, images, ids, micro):
        opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.args.amp == "bf16"):
            if micro:
                cached_backward(model, images, ids, micro)
            else:
                loss = model.loss(images, ids)
        if not micro:
            loss.backward()
        opt.step()

    def measure(self, part: str, loss: str, batch: int, micro: int | None = None, keep: float = 1.0,
                compiled: bool = False, loss_alone: bool = False) -> dict:
        """One row: the training step (and with loss_alone, the loss and the ranking alone, on a shared model)."""
        a = self.args
        row = dict(part=part, mode="compiled" if compiled else "eager", loss=loss, keep=keep, batch=batch,
                   micro=micro or "-", status="ok")
        if self.out_of_time():
            row["status"] = "skipped (time budget)"
            return self._record(row)
        model, opt = self.shared_model(loss, keep, compiled) if loss_alone else self.model(loss, keep, compiled)
        cfg = model.config
        err = None
        try:
            images, ids = synthetic_batch(cfg, batch, self.device)
            if self.cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            for _ in range(a.warmup):  # includes compilation for a new shape
                self.step(model, opt, images, ids, micro)
            if self.cuda:
                torch.cuda.synchronize()
            row["warmup_s"] = round(time.perf_counter() - t, 1)
            t = time.perf_counter()
            for _ in range(a.steps):
                self.step(model, opt, images, ids, micro)
            if self.cuda:
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t) / a.steps
            text_len = int((ids != 0).sum(dim=1).max())  # every micro-batch is padded to ids.shape[1]
            flops = 3 * batch * encoder_flops_per_sample(cfg, ids.shape[1])
            row.update(step_ms=round(1e3 * dt, 1), img_s=round(batch / dt),
                       tflops=round(flops / dt / 1e12, 1),
                       mfu=round(100 * flops / dt / PEAK_BF16_FLOPS, 1) if self.cuda else None,
                       peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1) if self.cuda else None,
                       text_len=text_len)
            if loss_alone:
                self.loss_and_ranking(model, images, ids, row)
        except Exception as e:  # noqa: BLE001 - report and carry on with the next configuration
            err = e
        if err is not None:
            row["status"] = "OOM" if _is_oom(err) else f"error: {type(err).__name__}: {str(err)[:200]}"
            err = None
            images = ids = None
            for p in model.parameters():
                p.grad = None
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()
        return self._record(row)

    def _record(self, row: dict) -> dict:
        self.rows.append(row)
        shown = {k: row.get(k) for k in ("part", "mode", "loss", "keep", "batch", "micro", "step_ms", "img_s",
                                         "mfu", "peak_gib", "warmup_s", "loss_ms", "ranking_ms",
                                         "ranking_chunked_ms", "status") if k in row}
        print(json.dumps(shown), flush=True)
        if self.args.json:  # rewrite after every row: a run stopped by a time limit still leaves its results
            self.save()
        return row

    def save(self, summary: dict | None = None):
        meta = dict(device=torch.cuda.get_device_name() if self.cuda else "cpu", torch=torch.__version__,
                    preset=self.args.preset, amp=self.args.amp, cmli_impls=sorted(cmli.IMPLEMENTATIONS),
                    select_tokens=hasattr(cmli, "select_tokens"), peak_tflops=PEAK_BF16_FLOPS / 1e12,
                    elapsed_s=round(time.perf_counter() - self.t0, 1))
        tmp = self.args.json + ".tmp"  # atomic: a reader (or a killed run) never leaves half a file
        with open(tmp, "w") as f:
            json.dump(dict(meta=meta, rows=self.rows, summary=summary or {}), f, indent=1)
        os.replace(tmp, self.args.json)


# ---------------------------------------------------------------------------------------- correctness on device
def device_check(device: torch.device) -> dict:
    """On the benchmark's device: cached gradients vs the micro-batched reference, with dropout 0.1, in fp32
    and under bf16 autocast (flash attention's own dropout RNG), with and without the random-state replay.
    Worst per-parameter relative error; the replayed error must be far below the unreplayed one."""
    out = {}
    for amp in ("fp32", "bf16"):
        torch.manual_seed(0)
        cfg = FILIPConfig.preset("tiny", dropout=0.1)
        model = FILIP(cfg).to(device).train()
        images, ids = synthetic_batch(cfg, 24, device)
        errs = {}
        for name, fn in (("reference", lambda: reference_microbatched_loss(model, images, ids, 10).backward()),
                         ("cached", lambda: cached_backward(model, images, ids, 10)),
                         ("cached_no_replay", lambda: cached_backward(model, images, ids, 10, _replay_rng=False))):
            torch.manual_seed(123)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
                fn()
            errs[name] = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
            model.zero_grad(set_to_none=True)
        ref = errs.pop("reference")
        out[amp] = {k: max(((g[n] - ref[n]).norm() / ref[n].norm().clamp_min(1e-30)).item() for n in ref)
                    for k, g in errs.items()}
    print("device check (max relative gradient error vs reference):", json.dumps(out), flush=True)
    return out


# ---------------------------------------------------------------------------------------- the plan
def run_suite(bench: Bench, compiled: bool, plain_batch: dict) -> dict:
    """Parts (a)-(d) and the anchor for one mode. plain_batch: {loss: largest batch} found by eager (a)."""
    a = bench.args
    res = {}
    has_sel = hasattr(cmli, "select_tokens")
    res["anchor"] = bench.measure("anchor", "clip", a.anchor_batch, compiled=compiled)
    # (a) largest plain batch: searched in eager mode; compiled mode re-measures eager's best batch
    for loss in a.losses:
        if not compiled:
            best = None
            for b in a.batches:
                r = bench.measure("a", loss, b, compiled=False)
                if r["status"] != "ok":
                    break
                best = r
            plain_batch[loss] = best["batch"] if best else None
            res[f"a_{loss}"] = best
        elif plain_batch.get(loss):
            res[f"a_{loss}"] = bench.measure("a", loss, plain_batch[loss], compiled=True)
    # (b) cached at that batch, same loss as the config (the first of --losses)
    loss0 = a.losses[0]
    if plain_batch.get(loss0):
        res["b"] = bench.measure("b", loss0, plain_batch[loss0], micro=a.micro, compiled=compiled)
    # (c) a contrastive batch too large for plain training, by micro-batches
    res["c"] = bench.measure("c", loss0, a.big_batch, micro=a.micro, compiled=compiled)
    # (d) FILIP with token selection vs CLIP at equal batch
    keep = a.keep_ratio if has_sel else 1.0
    res["d_filip"] = bench.measure("d", "filip", a.compare_batch, keep=keep, compiled=compiled)
    res["d_clip"] = bench.measure("d", "clip", a.compare_batch, compiled=compiled)
    return res


LOSS_VARIANTS = (("clip", 1.0), ("filip", 1.0), ("filip", None))  # None: --keep-ratio


def run_loss_rows(bench: Bench, compiled: bool) -> dict:
    """(e): CLIP, FILIP, FILIP + selection at each --loss-batches size: step, loss alone, ranking alone."""
    a = bench.args
    res = {}
    for batch in a.loss_batches:
        for loss, keep in LOSS_VARIANTS:
            keep = a.keep_ratio if keep is None else keep
            name = f"{loss}{'' if keep == 1.0 else f'_keep{keep:g}'}_{batch}"
            res[name] = bench.measure("e", loss, batch, keep=keep, compiled=compiled, loss_alone=True)
        clip, filip = res[f"clip_{batch}"], res[f"filip_{batch}"]
        sel = res[f"filip_keep{a.keep_ratio:g}_{batch}"]
        res[f"ratios_{batch}"] = dict(filip_over_clip=ratio(filip, clip), selection_over_clip=ratio(sel, clip),
                                      selection_over_filip=ratio(sel, filip),
                                      selection_loss_over_filip_loss=ratio(sel, filip, "loss_ms"))
    return res


def loss_markdown(rows: list[dict]) -> str:
    head = ("| mode | loss | keep | batch | step ms | loss alone ms | ranking ms (auto) | ranking ms (chunked) "
            "| status |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        if r["part"] != "e":
            continue
        cells = [r["mode"], r["loss"], r["keep"], r["batch"], r.get("step_ms", ""), r.get("loss_ms", ""),
                 r.get("ranking_ms", ""), r.get("ranking_chunked_ms", ""), r["status"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def ratio(slow, fast, key="step_ms"):
    if slow and fast and slow.get("status") == "ok" and fast.get("status") == "ok":
        return round(slow[key] / fast[key], 3)
    return None


def markdown(rows: list[dict]) -> str:
    head = "| part | mode | loss | keep | batch | micro | step ms | img/s | MFU % | peak GiB | status |"
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        cells = [r["part"], r["mode"], r["loss"], r["keep"], r["batch"], r["micro"], r.get("step_ms", ""),
                 r.get("img_s", ""), r.get("mfu", "") if r.get("mfu") is not None else "",
                 r.get("peak_gib", "") if r.get("peak_gib") is not None else "", r["status"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = Parser(prog="benchmarks/bench_train.py", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda (small preset, 224 px) or cpu (tiny preset, small batches)")
    p.add_argument("--preset", default=None, help="model preset (default: small on cuda, tiny on cpu)")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile'd encoders")
    p.add_argument("--losses", default="filip,clip", help="losses for the (a) batch search; the first is "
                   "used for (b) and (c)")
    p.add_argument("--batches", default=None, help="comma list for the (a) search (default 256,512,1024,2048)")
    p.add_argument("--micro", type=int, default=None, help="micro-batch of cached runs (default 256)")
    p.add_argument("--big-batch", type=int, default=None, help="contrastive batch for (c) (default 4096)")
    p.add_argument("--compare-batch", type=int, default=None, help="batch for (d) (default 1024)")
    p.add_argument("--anchor-batch", type=int, default=None, help="batch of the CLIP anchor row (default 512)")
    p.add_argument("--keep-ratio", type=float, default=0.25, help="token selection ratio for (d) and (e)")
    p.add_argument("--loss-rows", action="store_true", help="add part (e): CLIP / FILIP / FILIP + selection "
                   "step, loss alone and ranking alone at --loss-batches")
    p.add_argument("--loss-batches", default=None, help="comma list for (e) (default 1024,2048; cpu 8,16)")
    p.add_argument("--only-loss-rows", action="store_true", help="run part (e) only (implies --loss-rows)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument("--amp", choices=["bf16", "none"], default=None, help="autocast (default bf16 on cuda)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per row (default 3 cuda, 2 cpu)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per row (default 5 cuda, 1 cpu)")
    p.add_argument("--time-budget", type=float, default=1e9, help="seconds; later rows are skipped after it")
    p.add_argument("--check", action="store_true", help="first check cached gradients on the device "
                   "(dropout replay, fp32 and bf16)")
    p.add_argument("--json", default=None, help="write all rows and a summary to this path")
    a = p.parse_args(argv)
    cpu = a.device == "cpu"
    a.preset = a.preset or ("tiny" if cpu else "small")
    a.batches = [int(b) for b in (a.batches or ("8,16" if cpu else "256,512,1024,2048")).split(",")]
    a.micro = a.micro or (8 if cpu else 256)
    a.big_batch = a.big_batch or (32 if cpu else 4096)
    a.compare_batch = a.compare_batch or (16 if cpu else 1024)
    a.anchor_batch = a.anchor_batch or (16 if cpu else 512)
    a.amp = a.amp or ("none" if cpu else "bf16")
    a.warmup = a.warmup or (2 if cpu else 3)
    a.steps = a.steps or (1 if cpu else 5)
    a.losses = a.losses.split(",")
    a.loss_rows = a.loss_rows or a.only_loss_rows
    a.loss_batches = [int(b) for b in (a.loss_batches or ("8,16" if cpu else "1024,2048")).split(",")]
    if a.json and os.path.exists(a.json) and not a.overwrite:
        p.error(f"--json {a.json} exists; pass --overwrite to replace it")
    if not cpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    bench = Bench(a)
    print(f"device {bench.device} ({torch.cuda.get_device_name() if bench.cuda else 'cpu'}), torch "
          f"{torch.__version__}, preset {a.preset}, amp {a.amp}, CMLI impls {sorted(cmli.IMPLEMENTATIONS)}, "
          f"select_tokens {'yes' if hasattr(cmli, 'select_tokens') else 'NO (d runs with keep 1.0)'}", flush=True)
    check = device_check(bench.device) if a.check else None
    plain_batch: dict = {}
    eager = {} if a.only_loss_rows else run_suite(bench, False, plain_batch)
    compiled = run_suite(bench, True, plain_batch) if a.compile and not a.only_loss_rows else {}
    loss_rows = {}
    if a.loss_rows:
        loss_rows["eager"] = run_loss_rows(bench, False)
        if a.compile:
            loss_rows["compiled"] = run_loss_rows(bench, True)

    summary = {"device_check": check} if check else {}
    for mode, res in loss_rows.items():
        summary.setdefault("loss_rows", {})[mode] = {k: v for k, v in res.items() if k.startswith("ratios_")}
    for mode, res in (("eager", eager), ("compiled", compiled)):
        if not res:
            continue
        summary[mode] = dict(
            largest_plain_batch={k: (v or {}).get("batch") for k, v in res.items() if k.startswith("a_")},
            cached_overhead=ratio(res.get("b"), res.get(f"a_{a.losses[0]}")),
            filip_over_clip=ratio(res.get("d_filip"), res.get("d_clip")),
            anchor_img_s=(res.get("anchor") or {}).get("img_s"),
            big_batch_ok=(res.get("c") or {}).get("status") == "ok")
    if compiled:
        summary["compile_speedup_anchor"] = ratio(eager.get("anchor"), compiled.get("anchor"))
    print()
    print(markdown(bench.rows))
    if loss_rows:
        print()
        print(loss_markdown(bench.rows))
    print()
    print(json.dumps(summary, indent=1))
    if a.json:
        bench.save(summary)


if __name__ == "__main__":
    main()
