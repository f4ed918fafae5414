"""Training loop behind `train_small.py`: AdamW, warm-up + cosine, atomic checkpoints, resume, final eval.

Everything a run produces lands in its output folder:
    checkpoint.pt   state_dict + config + tokenizer (+ optimizer, step, args) - loads with weights_only=True
    metrics.jsonl   one JSON line per logged step
    loss.png        the training loss curve
    final.json      held-out retrieval (R@1/R@5 both ways, chance level), training time, preset, loss
    vocab.json      (real data only) the word vocabulary fitted on the training captions

Data: the built-in grounded shapes by default; --train-data / --val-data read webdataset tar shards, TSV/CSV
lists or img2dataset folders (minifilip/data/sources.py, README.md, "Training on CC3M"). With real data the stream is
reproducible from (seed, epoch); --resume restarts the stream at the beginning of the epoch it stopped in.
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
from .data.decode import split_counts
from .data.sources import (CsvOptions, check_source, eval_stream, is_builtin, iter_captions, load_pairs, make_loader,
                           train_stream)
from .data.grounded import CAPTION_STYLES, vocabulary
from .metrics import retrieval_metrics
from .model import FILIP
from .tokenizer import WordTokenizer

# flags that may differ between a run and its --resume; everything else comes from the checkpoint
# FILIPConfig fields that --set may not touch, and the flag that sets each instead
SET_RESERVED = {"vocab_size": "--vocab-size (real data) or the built-in vocabulary", "loss": "--loss",
                "token_keep_ratio": "--token-keep-ratio", "dropout": "--dropout"}
RESUME_OVERRIDABLE = ("steps", "device", "precision", "log_every", "save_every", "eval_batch_size",
                      "micro_batch_size", "compile", "num_workers")


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
    p.add_argument("--steps", type=int, default=500, help="optimizer steps in total")
    p.add_argument("--batch-size", type=int, default=64, help="contrastive batch: pairs per step")
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
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the two encoders (default: on with CUDA, where it measured 1.37x faster "
                        "for the small preset; off on the CPU)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any FILIPConfig field of the preset, e.g. --set vision_layers=2 --set "
                        "text_special_tokens=true (repeatable; see minifilip/config.py)")
    p.add_argument("--caption-style", default="color-first", choices=list(CAPTION_STYLES),
                   help="built-in data: how captions name an object ('a red circle', 'a circle in red', "
                        "'a circle', or colour-/shape-first drawn per mention)")
    p.add_argument("--out", default=None, help="output folder (default: runs/<timestamp>)")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run in DIR from its checkpoint.pt (to --steps in total)")
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="end this invocation after STEP steps with a checkpoint (continue later with --resume)")
    p.add_argument("--val-size", type=int, default=1000, help="held-out pairs for the final retrieval eval")
    p.add_argument("--log-every", type=int, default=10, help="steps between metrics.jsonl lines")
    p.add_argument("--save-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--eval-batch-size", type=int, default=256, help="batch size when encoding for evaluation")
    d = p.add_argument_group("real data (see the README section 'Training on CC3M')")
    d.add_argument("--train-data", default=None, metavar="SPEC",
                   help="training pairs: tar shards ('cc3m/{00000..00331}.tar', globs, lists joined by '::'), a "
                        "TSV/CSV list, or an img2dataset folder (default: the built-in grounded dataset)")
    d.add_argument("--val-data", default=None, metavar="SPEC",
                   help="evaluation pairs (its first --val-size samples); without it, the first --val-size "
                        "samples of --train-data are used, with a warning (they are not held out)")
    d.add_argument("--vocab-size", type=int, default=32000,
                   help="max vocabulary entries (special tokens included) fitted on the --train-data captions")
    d.add_argument("--min-count", type=int, default=1, help="keep only words seen at least this often")
    d.add_argument("--vocab-samples", type=int, default=200_000,
                   help="fit the vocabulary on the captions of the first this-many training samples (0 = all)")
    d.add_argument("--num-workers", type=int, default=-1,
                   help="DataLoader worker processes for --train-data; -1 = auto: min(8, cores-1) with CUDA, "
                        "min(2, cores-2) on the CPU (the model needs the cores there)")
    d.add_argument("--shuffle-buffer", type=int, default=1000, help="samples each worker shuffles across shards")
    d.add_argument("--csv-img-key", default="filepath", help="image-path column of a TSV/CSV list")
    d.add_argument("--csv-caption-key", default="title", help="caption column of a TSV/CSV list")
    d.add_argument("--csv-separator", default="\t", help="field separator of a TSV/CSV list")
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
    if getattr(args, "train_data", None) is not None:  # absent in checkpoints of older runs
        if args.vocab_size <= 4 or args.min_count < 1 or args.vocab_samples < 0 or args.num_workers < -1:
            raise ValueError("need --vocab-size > 4, --min-count >= 1, --vocab-samples >= 0, --num-workers >= -1")
    if getattr(args, "caption_style", "color-first") != "color-first" and real_data(args):
        raise ValueError("--caption-style applies to the built-in data only, not to --train-data")
    if getattr(args, "val_data", None) and is_builtin(getattr(args, "train_data", None)):
        raise ValueError("--val-data needs --train-data (the built-in dataset has its own validation split)")


def real_data(args) -> bool:
    return not is_builtin(getattr(args, "train_data", None))


def csv_options(args) -> CsvOptions:
    return CsvOptions(args.csv_img_key, args.csv_caption_key, args.csv_separator)


def auto_workers(requested: int, device: torch.device) -> int:
    if requested >= 0:
        return requested
    cores = os.cpu_count() or 1
    return min(8, cores - 1) if device.type == "cuda" else max(0, min(2, cores - 2))


def fit_tokenizer(args) -> WordTokenizer:
    """Vocabulary from the training captions only (no image is decoded)."""
    limit = f"first {args.vocab_samples}" if args.vocab_samples else "all"
    print(f"fitting the vocabulary on the captions of the {limit} samples of {args.train_data} ...")
    tokenizer = WordTokenizer.fit(iter_captions(args.train_data, args.vocab_samples, csv_options(args)),
                                  max_size=args.vocab_size, min_count=args.min_count)
    if len(tokenizer) <= 4:
        raise ValueError(f"no caption words found in {args.train_data} (check --csv-caption-key / the shards)")
    return tokenizer


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
        overrides = FILIPConfig.parse_overrides(args.set, reserved=SET_RESERVED)
        tokenizer = fit_tokenizer(args) if real_data(args) else WordTokenizer(vocabulary(args.caption_style))
        config = FILIPConfig.preset(args.preset, vocab_size=len(tokenizer), loss=args.loss,
                                    token_keep_ratio=args.token_keep_ratio, dropout=args.dropout, **overrides)
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
    if args.compile is None:
        args.compile = device.type == "cuda"
    if args.compile:  # compile the towers only: the state_dict keeps its plain parameter names
        model.visual.compile()
        model.text.compile()

    data_counts: dict = {}  # bad / converted training samples by reason (real data), over the whole run
    if ckpt is not None and "data_counts" in ckpt:
        data_counts = dict(ckpt["data_counts"])

    def checkpoint():
        extra = {"data_counts": data_counts} if real_data(args) else {}
        save_checkpoint(os.path.join(args.out, "checkpoint.pt"), model, tokenizer, optimizer=optimizer.state_dict(),
                        step=step, train_seconds=train_seconds, args=vars(args), rng=torch.get_rng_state(), **extra)

    epoch_len = None
    if real_data(args):
        stream, epoch_len = open_real_data(args, config, tokenizer, device, step)
    else:
        stream = iter(BuiltinTrainStream(args.batch_size, config.image_size, seed=args.seed, start_step=step,
                                         caption_style=getattr(args, "caption_style", "color-first")))
    n_params = sum(p.numel() for p in model.parameters())
    print(f"minifilip {args.preset} ({n_params / 1e6:.1f}M params), loss={config.loss}, batch {args.batch_size}, "
          f"{args.steps} steps on {device} ({precision}) -> {args.out}")
    bar = tqdm(total=args.steps, initial=step, desc="train", dynamic_ncols=True, disable=None)
    window_start, window_images = time.time(), 0
    stop = min(args.steps, args.stop_at) if args.stop_at else args.steps
    while step < stop:
        t0 = time.time()
        if epoch_len is None:
            images, captions = next(stream)
        else:
            try:
                images, captions, _keys, counts = next(stream)
            except StopIteration:
                raise ValueError(f"the training data ran out at step {step}: no worker found a usable sample "
                                 f"(bad samples so far: {split_counts(data_counts)[0]})") from None
            for reason, n in counts.items():
                data_counts[reason] = data_counts.get(reason, 0) + n
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
        postfix = dict(loss=f"{loss_value:.3f}", img_s=f"{window_images / (time.time() - window_start):.0f}")
        if epoch_len is not None:
            bad, converted = split_counts(data_counts)
            postfix.update(epoch=f"{step * args.batch_size / epoch_len:.2f}", bad=sum(bad.values()),
                           conv=sum(converted.values()))
        bar.set_postfix(**postfix)
        if step % args.log_every == 0 or step == args.steps:
            row = {"step": step, "loss": loss_value, "lr": optimizer.param_groups[0]["lr"],
                   "temperature": 1.0 / model.temperature_scale.item(),
                   "img_per_s": window_images / (time.time() - window_start), "train_seconds": train_seconds}
            if device.type == "cuda":
                row["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            if epoch_len is not None:
                bad, converted = split_counts(data_counts)
                row.update(epoch=step * args.batch_size / epoch_len, bad_samples=bad, converted_samples=converted)
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            window_start, window_images = time.time(), 0
        if step % args.save_every == 0 or step == stop:
            checkpoint()
    bar.close()
    if step < args.steps:
        print(f"stopped at step {step}/{args.steps}; continue with --resume {args.out}")
        return {}

    if real_data(args):
        val_spec = args.val_data or args.train_data
        images, captions, _keys, _counts = load_pairs(val_spec, args.val_size, config.image_size, csv_options(args))
    else:
        images, captions, _ = builtin_val_pairs(args.val_size, config.image_size, seed=args.seed,
                                                caption_style=getattr(args, "caption_style", "color-first"))
    ids = tokenizer.encode(captions, config.context_length)
    val = evaluate_retrieval(model, images, ids, captions, device, args.eval_batch_size, autocast)
    final = {"val": val, "train_seconds": round(train_seconds, 1), "preset": args.preset, "loss": config.loss,
             "steps": step, "batch_size": args.batch_size}
    if real_data(args):
        final.update(train_data=args.train_data, val_source=args.val_data or
                     f"train (first {len(captions)} samples of --train-data, not held out)",
                     bad_samples=split_counts(data_counts)[0], converted_samples=split_counts(data_counts)[1])
    with open(os.path.join(args.out, "final.json"), "w") as f:
        json.dump(final, f, indent=2)
    plot_loss(metrics_path, os.path.join(args.out, "loss.png"))
    print_table(final)
    return final


def open_real_data(args, config, tokenizer, device, step: int):
    """Check both sources, save the vocabulary, and return (batch iterator, samples per epoch).
    Everything that can be wrong with the data fails here, in one line, before the first step."""
    csv = csv_options(args)
    stream = train_stream(args.train_data, config.image_size, seed=args.seed, csv=csv,
                          shuffle_buffer=args.shuffle_buffer)
    check_source(stream, args.train_data)
    if args.val_data:
        check_source(eval_stream(args.val_data, config.image_size, csv=csv), args.val_data)
    else:
        print(f"warning: no --val-data; the final retrieval eval uses the first {args.val_size} samples of "
              "--train-data, which the model has trained on")
    epoch_len = stream.epoch_length()
    if not epoch_len:
        raise ValueError(f"{args.train_data} holds no samples")
    # resume: the stream is reproducible from (seed, epoch), so restart at the start of the current epoch
    stream.start_epoch = step * args.batch_size // epoch_len
    tokenizer.save(os.path.join(args.out, "vocab.json"))
    workers = auto_workers(args.num_workers, device)
    print(f"train data: {args.train_data}: ~{epoch_len} samples per epoch ({epoch_len // args.batch_size} steps), "
          f"{workers} loader workers, vocabulary of {len(tokenizer)} words")
    loader = make_loader(stream, args.batch_size, workers, pin_memory=device.type == "cuda")
    return iter(loader), epoch_len


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
