"""Training loop behind `train_small.py`: AdamW, warm-up + cosine, atomic checkpoints, resume, final eval.

Everything a run produces lands in its output folder:
    checkpoint.pt   state_dict + config + tokenizer (+ optimizer, step, args) - loads with weights_only=True
    metrics.jsonl   one JSON line per logged step
    loss.png        the training loss curve
    final.json      held-out retrieval (R@1/R@5 both ways, chance level), training time, preset, loss
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time

import torch
from tqdm import tqdm

from .checkpoint import load_checkpoint, save_checkpoint
from .config import PRESETS, FILIPConfig
from .gradcache import cached_backward
from .data.builtin import BuiltinTrainStream, builtin_val_pairs
from .data.grounded import vocabulary
from .metrics import retrieval_metrics
from .model import FILIP
from .tokenizer import WordTokenizer

# flags that may differ between a run and its --resume; everything else comes from the checkpoint
RESUME_OVERRIDABLE = ("steps", "device", "precision", "log_every", "save_every", "eval_batch_size",
                      "micro_batch_size", "compile")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line instead of usage + error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="train_small.py", description="Train a small FILIP (or CLIP baseline) from scratch. "
                "Defaults: the built-in grounded shapes dataset and the 'tiny' preset, a few minutes on a CPU.",
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model size (see FILIPConfig)")
    p.add_argument("--loss", default="filip", choices=["filip", "clip"],
                   help="filip: token-wise late interaction; clip: global CLS/EOS cosine (the baseline)")
    p.add_argument("--steps", type=int, default=400, help="optimizer steps in total")
    p.add_argument("--batch-size", type=int, default=128, help="contrastive batch: pairs per step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices")
    p.add_argument("--warmup", type=int, default=40, help="linear warm-up steps, then cosine decay to 0")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, data order and the built-in data")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 autocast on CUDA, fp32 on CPU; fp16 uses a GradScaler")
    p.add_argument("--token-keep-ratio", type=float, default=1.0,
                   help="FILIP token selection: keep this fraction of patches/tokens in the loss (1.0 = all)")
    p.add_argument("--dropout", type=float, default=0.0, help="dropout in both towers")
    p.add_argument("--micro-batch-size", type=int, default=0,
                   help="gradient caching: encode in micro-batches of this size while the loss and gradient "
                        "stay those of the whole --batch-size (0 = off)")
    p.add_argument("--compile", action="store_true", help="torch.compile the two encoders (CUDA)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<timestamp>)")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run in DIR from its checkpoint.pt (to --steps in total)")
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="end this invocation after STEP steps with a checkpoint (continue later with --resume)")
    p.add_argument("--val-size", type=int, default=1000, help="held-out pairs for the final retrieval eval")
    p.add_argument("--log-every", type=int, default=10, help="steps between metrics.jsonl lines")
    p.add_argument("--save-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--eval-batch-size", type=int, default=256, help="batch size when encoding for evaluation")
    return p


def _check_args(args) -> None:
    for name in ("steps", "batch_size", "val_size", "log_every", "save_every", "eval_batch_size"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.batch_size < 2:
        raise ValueError("--batch-size must be at least 2: contrastive learning needs in-batch negatives")
    if args.micro_batch_size < 0:
        raise ValueError(f"--micro-batch-size must be >= 0 (0 = no gradient caching), got {args.micro_batch_size}")
    if args.lr <= 0 or args.weight_decay < 0 or args.warmup < 0:
        raise ValueError("--lr must be positive, --weight-decay and --warmup non-negative")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)  # raises RuntimeError on nonsense
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but CUDA is not available on this machine")
    return device


def autocast_for(device: torch.device, precision: str):
    """(autocast context factory, GradScaler or None) for the chosen precision."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext, None, precision
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs CUDA; use bf16 or fp32 on the CPU")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler, precision


def lr_at(step: int, args) -> float:
    """Linear warm-up to args.lr, then cosine decay to 0 at args.steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: torch.nn.Module, args) -> torch.optim.Optimizer:
    """AdamW; matrices decay, biases / norms / embeddings / temperature do not."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_matrix = p.dim() >= 2 and "embed" not in name and not name.endswith("pos")
        (decay if is_matrix else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98), eps=1e-6)


@torch.no_grad()
def evaluate_retrieval(model: FILIP, images: torch.Tensor, ids: torch.Tensor, captions: list[str],
                       device: torch.device, batch_size: int = 256, autocast=contextlib.nullcontext) -> dict:
    """Held-out retrieval: encode in batches, score every image against every caption, R@1/R@5."""
    model.eval()
    img_parts, txt_parts = [], []
    for i in range(0, len(images), batch_size):
        with autocast():
            img_parts.append(model.encode_image(images[i:i + batch_size].to(device)))
            txt_parts.append(model.encode_text(ids[i:i + batch_size].to(device)))
    img, img_mask = (torch.cat(t) for t in zip(*img_parts))
    txt, txt_mask = (torch.cat(t) for t in zip(*txt_parts))
    s_i2t, s_t2i = model.pairwise_scores(img, img_mask, txt, txt_mask)
    model.train()
    return retrieval_metrics(s_i2t, s_t2i, captions)


def plot_loss(metrics_path: str, png_path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open(metrics_path)] if os.path.exists(metrics_path) else []
    rows = [r for r in rows if "loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
    ax.set_xlabel("step"), ax.set_ylabel("contrastive loss"), ax.grid(alpha=0.3)
    ax.set_title(os.path.basename(os.path.dirname(os.path.abspath(png_path))))
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


def _trim_metrics(path: str, last_step: int) -> None:
    """Drop metrics logged after the checkpoint we resume from, so the log has no duplicate steps."""
    if os.path.exists(path):
        keep = [line for line in open(path) if line.strip() and json.loads(line).get("step", 0) <= last_step]
        with open(path, "w") as f:
            f.writelines(keep)


def setup(args, argv):
    """Everything that can fail on bad input, before any training: returns the run's state."""
    _check_args(args)
    device = resolve_device(args.device)
    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(os.path.join(args.resume, "checkpoint.pt"))
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in argv if a.startswith("--")}
        saved = dict(ckpt["args"])
        for key in RESUME_OVERRIDABLE:
            if key in given:
                saved[key] = getattr(args, key)
        args = argparse.Namespace(**{**vars(args), **saved, "resume": args.resume, "out": args.resume,
                                     "stop_at": args.stop_at})
        _check_args(args)
        tokenizer = WordTokenizer.from_dict(ckpt["tokenizer"])
        config = FILIPConfig.from_dict(ckpt["config"])
    else:
        tokenizer = WordTokenizer(vocabulary())
        config = FILIPConfig.preset(args.preset, vocab_size=len(tokenizer), loss=args.loss,
                                    token_keep_ratio=args.token_keep_ratio, dropout=args.dropout)
        args.out = args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    autocast, scaler, precision = autocast_for(device, args.precision)
    return args, device, ckpt, tokenizer, config, autocast, scaler, precision


def train(args, argv=()) -> dict:
    args, device, ckpt, tokenizer, config, autocast, scaler, precision = setup(args, argv)
    os.makedirs(args.out, exist_ok=True)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    torch.manual_seed(args.seed)
    model = FILIP(config).to(device)
    optimizer = make_optimizer(model, args)
    step, train_seconds = 0, 0.0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, train_seconds = int(ckpt["step"]), float(ckpt["train_seconds"])
        torch.set_rng_state(ckpt["rng"])
        _trim_metrics(metrics_path, step)
        print(f"resuming {args.out} at step {step}/{args.steps}")
    model.train()
    if args.compile:  # compile the towers only: the state_dict keeps its plain parameter names
        model.visual.compile()
        model.text.compile()

    def checkpoint():
        save_checkpoint(os.path.join(args.out, "checkpoint.pt"), model, tokenizer, optimizer=optimizer.state_dict(),
                        step=step, train_seconds=train_seconds, args=vars(args), rng=torch.get_rng_state())

    stream = iter(BuiltinTrainStream(args.batch_size, config.image_size, seed=args.seed, start_step=step))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"FILIP {args.preset} ({n_params / 1e6:.1f}M params), loss={config.loss}, batch {args.batch_size}, "
          f"{args.steps} steps on {device} ({precision}) -> {args.out}")
    bar = tqdm(total=args.steps, initial=step, desc="train", dynamic_ncols=True, disable=None)
    window_start, window_images = time.time(), 0
    stop = min(args.steps, args.stop_at) if args.stop_at else args.steps
    while step < stop:
        t0 = time.time()
        images, captions = next(stream)
        images, ids = images.to(device, non_blocking=True), tokenizer.encode(captions, config.context_length).to(device)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        optimizer.zero_grad(set_to_none=True)
        if args.micro_batch_size:  # gradient caching: memory of a micro-batch, gradient of the whole batch
            with autocast():
                loss = cached_backward(model, images, ids, args.micro_batch_size, scaler=scaler)
        else:
            with autocast():
                loss = model.loss(images, ids)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        step += 1
        train_seconds += time.time() - t0
        window_images += len(captions)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise RuntimeError(f"loss became {loss_value} at step {step}; lower --lr or use --precision fp32")
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", img_s=f"{window_images / (time.time() - window_start):.0f}")
        if step % args.log_every == 0 or step == args.steps:
            row = {"step": step, "loss": loss_value, "lr": optimizer.param_groups[0]["lr"],
                   "temperature": 1.0 / model.temperature_scale.item(),
                   "img_per_s": window_images / (time.time() - window_start), "train_seconds": train_seconds}
            if device.type == "cuda":
                row["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            window_start, window_images = time.time(), 0
        if step % args.save_every == 0 or step == stop:
            checkpoint()
    bar.close()
    if step < args.steps:
        print(f"stopped at step {step}/{args.steps}; continue with --resume {args.out}")
        return {}

    images, captions, _ = builtin_val_pairs(args.val_size, config.image_size, seed=args.seed)
    ids = tokenizer.encode(captions, config.context_length)
    val = evaluate_retrieval(model, images, ids, captions, device, args.eval_batch_size, autocast)
    final = {"val": val, "train_seconds": round(train_seconds, 1), "preset": args.preset, "loss": config.loss,
             "steps": step, "batch_size": args.batch_size}
    with open(os.path.join(args.out, "final.json"), "w") as f:
        json.dump(final, f, indent=2)
    plot_loss(metrics_path, os.path.join(args.out, "loss.png"))
    print_table(final)
    return final


def print_table(final: dict) -> None:
    v = final["val"]
    print(f"\nheld-out retrieval on {v['n']} pairs ({final['loss']}, {final['preset']}, "
          f"{final['train_seconds']:.0f} s of training)")
    print("| direction | R@1 | R@5 | chance R@1 |\n|---|---|---|---|")
    for d, name in (("i2t", "image -> text"), ("t2i", "text -> image")):
        print(f"| {name} | {v[f'{d}_R@1']:.3f} | {v[f'{d}_R@5']:.3f} | {v['chance_R@1']:.4f} |")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        train(args, argv)
    except (ValueError, FileNotFoundError) as e:
        print(f"train_small.py: error: {e}", file=sys.stderr)
        return 2
    return 0
