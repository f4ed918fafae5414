"""Data-loader throughput: can the CPU decode + augment images as fast as the GPU trains on them?

    python benchmarks/bench_data.py                         # full: 1, 2, 4, 8, 16 workers (capped at the cores)
    python benchmarks/bench_data.py --quick                 # < 1 minute on a laptop CPU
    python benchmarks/bench_data.py --json bench_data.json  # also write the rows as JSON

The script writes its own shards (img2dataset layout, JPEGs of ~256 px with realistic file sizes of ~20-30 KB)
into a temporary folder, then measures:
  * in one process, one thread: ms per image for JPEG decode alone, + the eval transform, + the training
    transform (RandomResizedCrop + AutoAugment + normalise) -- where the CPU time goes;
  * the real training pipeline (`train_stream` + `make_loader`: tar streaming, shuffle buffer, decode, augment,
    uint8 tensors as train.py uses them (normalised later, on the device), collate) in images/s against the
    number of DataLoader workers;
  * with CUDA: the training step rate of the `small` preset (synthetic batch on the GPU, bf16), i.e. how many
    images/s the loader must deliver; and a GPU JPEG decode path (torchvision.io.decode_jpeg on a list of
    encoded images, device="cuda", then a resize to the training size) for comparison. The GPU path is only
    measured, not used by train.py: it cannot run AutoAugment's PIL ops, and would compete with training.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from minifilip.data.decode import decode_image  # noqa: E402
from minifilip.data.sources import make_loader, train_stream  # noqa: E402
from minifilip.data.transforms import draft_side_for, eval_transform, train_transform  # noqa: E402
from minifilip.data.writer import ShardWriter  # noqa: E402


def synthetic_jpeg(rng: np.random.Generator, side: int) -> bytes:
    """A photo-like JPEG: smooth colour blobs plus mild noise (pure noise would compress 5x worse than photos)."""
    w, h = side, int(side * rng.uniform(1.0, 1.33))
    small = rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC), dtype=np.float32)
    img += rng.normal(0, 6, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_shards(folder: str, n: int, side: int, per_shard: int = 200) -> tuple[str, list[bytes]]:
    rng = np.random.default_rng(0)
    samples = []
    with ShardWriter(folder, samples_per_shard=per_shard) as w:
        for i in range(n):
            data = synthetic_jpeg(rng, side)
            samples.append(data)
            w.write(data, f"a photo of thing number {i} on a table", meta={"width": side})
        shards = len(w.paths)
    return os.path.join(folder, "{00000..%05d}.tar" % (shards - 1)), samples


def per_image_ms(samples: list[bytes], size: int) -> dict:
    """Single-thread costs in this process: decode, decode + eval transform, decode + train transform."""
    torch.set_num_threads(1)
    out = {}
    for name, tf, train in (("decode", None, True), ("decode+eval", eval_transform(size), False),
                            ("decode+train", train_transform(size), True),
                            ("decode+train_uint8", train_transform(size, uint8=True), True)):
        t0 = time.perf_counter()
        for data in samples:
            img = decode_image(data, draft_side=draft_side_for(size, train))
            if tf is not None:
                tf(img)
        out[name] = 1000 * (time.perf_counter() - t0) / len(samples)
    torch.set_num_threads(os.cpu_count() or 1)
    return out


def loader_rate(spec: str, size: int, workers: int, batch: int, batches: int) -> float:
    """Images/s of the training pipeline after its first batch (worker start-up excluded)."""
    loader = make_loader(train_stream(spec, size, shuffle_buffer=200, uint8=True), batch, workers)  # as train.py
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * batch / (time.perf_counter() - t0)
    del it, loader  # shuts the workers down
    return rate


def gpu_step_rate(batch: int, steps: int = 10) -> float | None:
    """Images/s of `small`-preset training steps on synthetic GPU data (bf16 autocast), or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    from minifilip import FILIP, FILIPConfig
    cfg = FILIPConfig.preset("small")
    model = FILIP(cfg).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images = torch.randn(batch, 3, cfg.image_size, cfg.image_size, device="cuda")
    ids = torch.randint(4, cfg.vocab_size, (batch, cfg.context_length), device="cuda")
    ids[:, 0], ids[:, -1] = 1, 2

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model.loss(images, ids)
        loss.backward()
        opt.step()

    rate = batch / _cuda_seconds(step, warmup=3, rounds=steps)
    del model, opt
    torch.cuda.empty_cache()
    return rate


def _cuda_seconds(fn, warmup: int, rounds: int) -> float:
    """Mean seconds of one fn() call on the GPU after `warmup` untimed calls (synchronised around the timing)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(rounds):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / rounds


def gpu_decode_rate(samples: list[bytes], size: int, batch: int, rounds: int = 5) -> float | None:
    """Images/s of batched nvJPEG decode + per-image resize to size x size on the GPU, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    from torchvision.io import decode_jpeg
    import torch.nn.functional as F
    encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in samples[:batch]]

    def run():
        decoded = decode_jpeg(encoded, device="cuda")
        return torch.stack([F.interpolate(x[None].float(), size=(size, size), mode="bilinear", antialias=True)[0]
                            for x in decoded])

    return len(encoded) / _cuda_seconds(run, warmup=1, rounds=rounds)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few images, workers 1 and 2 only (CPU, < 1 minute)")
    p.add_argument("--workers", default="1,2,4,8,16", help="DataLoader worker counts (capped at the core count)")
    p.add_argument("--images", type=int, default=None, help="synthetic images to write (default 2000, quick 192)")
    p.add_argument("--src-size", type=int, default=256, help="shorter side of the synthetic JPEGs")
    p.add_argument("--size", type=int, default=224, help="training crop size")
    p.add_argument("--batch-size", type=int, default=None, help="loader batch (default 64, quick 16)")
    p.add_argument("--gpu-batch", type=int, default=256, help="batch of the GPU step / GPU decode measurements")
    p.add_argument("--json", default=None, help="write the results to this path")
    args = p.parse_args(argv)
    n_images = args.images or (192 if args.quick else 2000)
    batch = args.batch_size or (16 if args.quick else 64)
    cores = os.cpu_count() or 1
    workers = [w for w in (int(x) for x in args.workers.split(",")) if w <= cores]
    if args.quick:
        workers = [w for w in workers if w <= 2]
    batches = max(2, (n_images // batch) * (1 if args.quick else 2))

    result = {"cores": cores, "images": n_images, "src_size": args.src_size, "size": args.size, "batch": batch,
              "torch": torch.__version__, "device": torch.cuda.get_device_name() if torch.cuda.is_available()
              else "cpu only"}
    with tempfile.TemporaryDirectory() as tmp:
        spec, samples = write_shards(tmp, n_images, args.src_size)
        result["mean_jpeg_kb"] = sum(map(len, samples)) / len(samples) / 1024
        result["per_image_ms"] = per_image_ms(samples[: min(len(samples), 64 if args.quick else 256)], args.size)
        rows = []
        for w in workers:
            rate = loader_rate(spec, args.size, w, batch, batches)
            rows.append({"workers": w, "img_s": rate, "img_s_per_worker": rate / w})
            print(f"  {w:2d} workers: {rate:7.1f} img/s", file=sys.stderr)
        result["loader"] = rows
        result["gpu_step_img_s"] = gpu_step_rate(args.gpu_batch)
        result["gpu_decode_img_s"] = gpu_decode_rate(samples, args.size, args.gpu_batch)

    ms = result["per_image_ms"]
    print(f"\n{result['device']}, {cores} cores, torch {result['torch']}; {n_images} synthetic JPEGs of "
          f"{args.src_size} px (mean {result['mean_jpeg_kb']:.1f} KB) -> {args.size} px crops, batch {batch}")
    print(f"one thread, in process: decode {ms['decode']:.2f} ms/img, + eval transform {ms['decode+eval']:.2f}, "
          f"+ train transform (RandomResizedCrop + AutoAugment) {ms['decode+train']:.2f}, the same with uint8 "
          f"out (normalised on the device, as train.py does) {ms['decode+train_uint8']:.2f}\n")
    need = result["gpu_step_img_s"]
    print("| workers | loader img/s | img/s per worker | keeps up with `small` training? |\n|---|---|---|---|")
    for r in rows:
        verdict = "n/a (no CUDA)" if need is None else \
            ("yes" if r["img_s"] >= need else f"no ({r['img_s'] / need:.0%} of it)")
        print(f"| {r['workers']} | {r['img_s']:.0f} | {r['img_s_per_worker']:.0f} | {verdict} |")
    print(f"\n`small` preset training step (batch {args.gpu_batch}, bf16): "
          + (f"{need:.0f} img/s" if need else "n/a (no CUDA)"))
    gd = result["gpu_decode_img_s"]
    print("GPU decode (decode_jpeg on a list, device=cuda, + resize): "
          + (f"{gd:.0f} img/s" if gd else "n/a (no CUDA)"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
