"""The one-GPU CC3M recipe, rehearsed end to end on grounded scenes written as shards, in one command.

    python benchmarks/rehearse_cc3m.py --json rehearsal.json            # GPU machine: planned for <= 8 min wall
    python benchmarks/rehearse_cc3m.py --tiny --json rehearsal.json     # any CPU: tiny preset, 64 px, seconds

What it does, in order, each stage timed (a failed stage is recorded as an error, the others still run):
  1. write --n built-in grounded scenes at --size px as img2dataset shards with their ground truth
     (`make_subset --src builtin`, --writers processes), plus --val-n held-out (val split) scenes;
  2. synthetic-input step rate of the recipe's training step (same preset, loss, batch, micro-batch, precision,
     torch.compile setting as train_small.py would use), for the FILIP and the CLIP loss: what the GPU can do;
  3. the README's one-GPU recipe (train_small.py --preset small --train-data ... --num-workers 15) with gradient
     caching (contrastive batch --batch-size, micro-batch --micro-batch-size) and --eval-every, for a fixed
     budget: the step count is --budget-s x the synthetic rate / batch. Then the same with --loss clip.
     Recorded per run: end-to-end img/s over the steps after the first logged window (compile excluded, evals
     excluded), the mean data_wait_frac over the same rows, the step rate the loop would reach without waiting
     (img/s / (1 - wait), derived), peak GPU memory, GPU utilisation (torch.cuda.utilization sampled once a
     second, if the NVML bindings are present), final held-out retrieval and pointing game;
  4. the loader sweep of benchmarks/bench_data.py on photo-like 256-px shards (224-px crops) and on pre-resized
     128-px shards (128-px crops), --sweep-workers (capped at the cores).

GPU plan (H200, 16 cores, defaults): writing 50k scenes at 224 px with 15 processes ~0.5 min (~4 ms per scene on
one core, measured on this 2-core CPU); 2 synthetic rates ~1.5-2 min (torch.compile of each graph, 30-45 s on the
H100 before); 2 training runs of --budget-s 60 s of steps + start-up (vocabulary, compile, evals, final eval)
~4 min; loader sweep ~1 min: ~7.5 min in all. The plan is an estimate from CPU and H100 figures: the script
prints each stage's wall time so the next run can be sized from measurement. No figure here is a GPU measurement until this runs.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from minifilip.cli import one_line  # noqa: E402
from minifilip.config import FILIPConfig  # noqa: E402
from minifilip.data.make_subset import make_subset  # noqa: E402


# ------------------------------------------------------------------------------------------ stages

def stage(result: dict, name: str, fn, *args, **kwargs):
    """Run one stage, record its wall time and its value (or its error, in one line) under result[name]."""
    t0 = time.perf_counter()
    print(f"[rehearse] {name} ...", file=sys.stderr, flush=True)
    try:
        value = fn(*args, **kwargs)
        result[name] = {"seconds": round(time.perf_counter() - t0, 1), **(value or {})}
    except Exception as e:  # noqa: BLE001 - a failed stage must not cost the others' figures
        result[name] = {"seconds": round(time.perf_counter() - t0, 1), "error": f"{type(e).__name__}: {one_line(e)}"}
    error = f"  ERROR {result[name]['error']}" if "error" in result[name] else ""
    print(f"[rehearse] {name}: {result[name]['seconds']} s{error}", file=sys.stderr, flush=True)
    return result[name]


def write_scenes(folder: str, n: int, size: int, split: str, writers: int) -> dict:
    summary = make_subset("builtin", folder, n=n, size=size, split=split, workers=writers, overwrite=True,
                          samples_per_shard=min(10_000, -(-n // 64)), progress=False)  # 64 shards: 4+ per worker
    return {"n": summary["n_written"], "shards": summary["shards"], "size": size, "split": split}


def synthetic_step_rate(preset: str, image_size: int, loss: str, batch: int, micro: int, steps: int, device: str,
                        compile_: bool) -> dict:
    """img/s of the training step on inputs already on the device (train.py's forward_backward + AdamW step)."""
    from minifilip.model import FILIP
    from minifilip.train import autocast_for, forward_backward, make_optimizer
    dev = torch.device(device)
    cfg = FILIPConfig.preset(preset, image_size=image_size, loss=loss)
    torch.manual_seed(0)
    model = FILIP(cfg).to(dev).train()
    if compile_:
        model.visual.compile()
        model.text.compile()
    opt = make_optimizer(model, lr=1e-4, weight_decay=0.1)
    autocast, scaler, precision = autocast_for(dev, "auto")
    images = torch.randn(batch, 3, cfg.image_size, cfg.image_size, device=dev)
    ids = torch.randint(4, cfg.vocab_size, (batch, cfg.context_length), device=dev)
    ids[:, 0], ids[:, 12:] = 1, 0  # [BOS], then ~10 words as CC3M captions have, [EOS], padding
    ids[:, 11] = 2

    def step():
        opt.zero_grad(set_to_none=True)
        forward_backward(model, images, ids, micro_batch_size=micro, autocast=autocast, scaler=scaler)
        scaler.step(opt)
        scaler.update()

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(2):  # warm-up: compilation, allocator
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = (time.perf_counter() - t0) / steps
    out = {"img_s": batch / seconds, "step_s": seconds, "precision": precision, "compile": compile_}
    if dev.type == "cuda":
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30
    del model, opt
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


class UtilisationSampler:
    """torch.cuda.utilization() once a second in a thread (NVML); no samples without CUDA or NVML bindings."""

    def __init__(self):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(1.0):
            try:
                self.samples.append(float(torch.cuda.utilization()))
            except Exception:  # noqa: BLE001 - no NVML: say nothing rather than guess
                return

    def __enter__(self):
        if torch.cuda.is_available():
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()

    def summary(self) -> dict:
        return {"gpu_util_mean_pct": statistics.mean(self.samples) if self.samples else None,
                "gpu_util_samples": len(self.samples)}


def summarise_run(out: str, batch: int) -> dict:
    """End-to-end figures of one run folder from metrics.jsonl and final.json."""
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if line.strip()]
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "val_i2t_R@1" in r]
    final = json.load(open(os.path.join(out, "final.json")))
    res = {"steps": final["steps"], "final_loss": steps[-1]["loss"] if steps else None,
           "final_val": final["val"], "final_alignment": final.get("alignment", {}).get("last"),
           "train_seconds": final["train_seconds"], "eval_rows": len(evals)}
    if len(steps) >= 2:  # from the end of the first window (compile, worker start-up) to the last row
        first, last = steps[0], steps[-1]
        seconds = last["train_seconds"] - first["train_seconds"]
        res["e2e_img_s"] = (last["step"] - first["step"]) * batch / seconds if seconds > 0 else None
        waits = [r["data_wait_frac"] for r in steps[1:] if "data_wait_frac" in r]
        res["data_wait_frac"] = statistics.mean(waits) if waits else None
        if res["e2e_img_s"] and res["data_wait_frac"] is not None and res["data_wait_frac"] < 1:
            res["derived_step_img_s_without_wait"] = res["e2e_img_s"] / (1 - res["data_wait_frac"])
    peaks = [r["peak_gpu_gib"] for r in steps if "peak_gpu_gib" in r]
    res["peak_gpu_gib"] = max(peaks) if peaks else None
    return res


def train_run(out: str, train: str, val: str, args, loss: str, steps: int) -> dict:
    from minifilip.train import main as train_main
    argv = ["--preset", args.preset, "--loss", loss, "--train-data", train, "--val-data", val,
            "--batch-size", str(args.batch_size), "--micro-batch-size", str(args.micro_batch_size),
            "--steps", str(steps), "--warmup", str(max(1, steps // 10)), "--lr", "5e-4",
            "--num-workers", str(args.num_workers), "--eval-every", str(max(1, steps // 3)),
            "--eval-size", str(args.eval_size), "--val-size", str(args.val_size), "--log-every", str(args.log_every),
            "--save-every", str(steps), "--min-count", "1", "--device", args.device, "--out", out, "--overwrite",
            "--set", f"image_size={args.size}"]
    with UtilisationSampler() as util:
        code = train_main(argv)
    if code != 0:
        raise RuntimeError(f"train_small.py exited with {code}")
    return {"command": "python train_small.py " + " ".join(argv), **summarise_run(out, args.batch_size),
            **util.summary()}


def loader_sweep(src_size: int, size: int, workers: str, images: int, batch: int, quick: bool) -> dict:
    import bench_data
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        argv = ["--src-size", str(src_size), "--size", str(size), "--workers", workers, "--images", str(images),
                "--batch-size", str(batch), "--json", f.name] + (["--quick"] if quick else [])
        bench_data.main(argv)
        return json.load(open(f.name))


# ------------------------------------------------------------------------------------------ main

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/rehearse_cc3m.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tiny", action="store_true",
                   help="CPU smoke mode: 48 scenes at 64 px, tiny preset, batch 16 / micro 8, 3 steps, 1 worker")
    p.add_argument("--n", type=int, default=50_000, help="training scenes to write")
    p.add_argument("--val-n", type=int, default=1000, help="held-out (val split) scenes to write")
    p.add_argument("--size", type=int, default=224, help="scene side in px (the small preset trains at 224)")
    p.add_argument("--writers", type=int, default=15, help="processes rendering scenes")
    p.add_argument("--preset", default="small", help="model preset")
    p.add_argument("--batch-size", type=int, default=4096, help="contrastive batch")
    p.add_argument("--micro-batch-size", type=int, default=256, help="gradient-caching micro-batch")
    p.add_argument("--num-workers", type=int, default=15, help="DataLoader workers of the training runs")
    p.add_argument("--budget-s", type=float, default=60.0,
                   help="seconds of training steps per run, at the synthetic rate (sets --steps)")
    p.add_argument("--synthetic-steps", type=int, default=5, help="timed steps of the synthetic-input rate")
    p.add_argument("--eval-size", type=int, default=300, help="held-out scenes scored by --eval-every")
    p.add_argument("--val-size", type=int, default=1000, help="held-out pairs of the final retrieval")
    p.add_argument("--log-every", type=int, default=5, help="steps between metrics lines")
    p.add_argument("--sweep-workers", default="1,2,4,8,16", help="loader sweep worker counts")
    p.add_argument("--sweep-images", type=int, default=1500, help="synthetic JPEGs per loader sweep")
    p.add_argument("--skip", default="", help="comma list of stages to skip: synthetic, filip, clip, sweep")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    p.add_argument("--workdir", default=None, help="where shards and runs go (default: a temporary folder, removed)")
    p.add_argument("--json", default=None, help="write the results here (atomically)")
    return p


def apply_tiny(args) -> None:
    args.n, args.val_n, args.size, args.writers, args.preset = 48, 16, 64, 1, "tiny"
    args.batch_size, args.micro_batch_size, args.num_workers, args.synthetic_steps = 16, 8, 1, 1
    args.eval_size, args.val_size, args.log_every = 8, 8, 1
    args.sweep_workers, args.sweep_images = "1", 32


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.tiny:
        apply_tiny(args)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    skip = {s for s in args.skip.split(",") if s}
    if args.json and os.path.isdir(args.json):
        print(f"rehearse_cc3m.py: error: --json {args.json} is a folder", file=sys.stderr)
        return 2
    compile_ = args.device.startswith("cuda")  # what train_small.py does by default
    result = {"mode": "tiny" if args.tiny else "full", "device": torch.cuda.get_device_name() if
              args.device.startswith("cuda") else "cpu", "cores": os.cpu_count(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "config": {k: v for k, v in vars(args).items() if k not in ("json", "workdir")}}
    work = args.workdir or tempfile.mkdtemp(prefix="rehearse-")
    t_start = time.perf_counter()
    try:
        train, val = os.path.join(work, "train"), os.path.join(work, "val")
        stage(result, "write_train", write_scenes, train, args.n, args.size, "train", args.writers)
        if "seconds" in result["write_train"] and "error" not in result["write_train"]:
            result["write_train"]["img_s"] = result["write_train"]["n"] / max(1e-9, result["write_train"]["seconds"])
        stage(result, "write_val", write_scenes, val, args.val_n, args.size, "val", args.writers)
        for loss in ("filip", "clip"):
            if "synthetic" not in skip:
                stage(result, f"synthetic_{loss}", synthetic_step_rate, args.preset, args.size, loss, args.batch_size,
                      args.micro_batch_size, args.synthetic_steps, args.device, compile_)
            if loss in skip:
                continue
            rate = result.get(f"synthetic_{loss}", {}).get("img_s")
            steps = max(3, round(args.budget_s * rate / args.batch_size)) if rate and not args.tiny else 3
            stage(result, f"run_{loss}", train_run, os.path.join(work, f"run_{loss}"), train, val, args, loss, steps)
            run = result[f"run_{loss}"]
            if rate and run.get("e2e_img_s"):
                run["e2e_over_synthetic"] = run["e2e_img_s"] / rate
        if "sweep" not in skip:
            stage(result, "sweep_256px", loader_sweep, 256 if not args.tiny else 80, 224 if not args.tiny else 64,
                  args.sweep_workers, args.sweep_images, 64 if not args.tiny else 8, args.tiny)
            stage(result, "sweep_128px", loader_sweep, 128 if not args.tiny else 64, 128 if not args.tiny else 64,
                  args.sweep_workers, args.sweep_images, 64 if not args.tiny else 8, args.tiny)
    finally:
        result["wall_seconds"] = round(time.perf_counter() - t_start, 1)
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json + ".tmp", "w") as f:
                json.dump(result, f, indent=2, default=str)
            os.replace(args.json + ".tmp", args.json)
    print_table(result)
    return 1 if any(isinstance(v, dict) and "error" in v for v in result.values()) else 0


def print_table(result: dict) -> None:
    fmt = lambda v, spec=".0f": "-" if v is None else format(v, spec)  # noqa: E731
    print(f"\n{result['device']}, {result['cores']} cores, torch {result['torch']}, mode {result['mode']}, "
          f"wall {result['wall_seconds']} s")
    w = result.get("write_train", {})
    print(f"scenes written: {w.get('n', '-')} in {w.get('seconds', '-')} s ({fmt(w.get('img_s'))} img/s)")
    print("| loss | synthetic step img/s | end-to-end img/s | e2e / synthetic | data wait | peak GiB | "
          "GPU util % | R@1 i2t / t2i | pointing (chance) |\n|---|---|---|---|---|---|---|---|---|")
    for loss in ("filip", "clip"):
        s, r = result.get(f"synthetic_{loss}", {}), result.get(f"run_{loss}", {})
        if not s and not r:
            continue
        v, a = r.get("final_val") or {}, r.get("final_alignment") or {}
        point = f"{fmt(a.get('val_pointing_acc'), '.3f')} ({fmt(a.get('val_pointing_chance'), '.3f')})"
        print(f"| {loss} | {fmt(s.get('img_s'))} | {fmt(r.get('e2e_img_s'))} | "
              f"{fmt(r.get('e2e_over_synthetic'), '.0%')} | {fmt(r.get('data_wait_frac'), '.0%')} | {fmt(r.get('peak_gpu_gib'), '.1f')} | "
              f"{fmt(r.get('gpu_util_mean_pct'))} | {fmt(v.get('i2t_R@1'), '.3f')} / {fmt(v.get('t2i_R@1'), '.3f')}"
              f" | {point} |")
    for name in ("sweep_256px", "sweep_128px"):
        sw = result.get(name, {})
        if "loader" in sw:
            rates = ", ".join(f"{r['workers']}: {r['img_s']:.0f}" for r in sw["loader"])
            print(f"{name} (workers: img/s): {rates}; per image, one thread: decode+train "
                  f"{sw['per_image_ms']['decode+train']:.2f} ms")
    errors = {k: v["error"] for k, v in result.items() if isinstance(v, dict) and "error" in v}
    for k, e in errors.items():
        print(f"stage {k} failed: {e}")


if __name__ == "__main__":
    sys.exit(main())
