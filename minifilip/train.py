"""Training loop behind `train_small.py`: AdamW, warm-up + cosine, atomic checkpoints, resume, final eval.

Everything a run produces lands in its output folder:
    checkpoint.pt   state_dict + config + tokenizer (+ optimizer, step, args) - loads with weights_only=True
    metrics.jsonl   one JSON line per logged step (loss, lr, img_per_s, data_wait_frac: the share of the wall
                    time the loop waited for the data loader, ...)
    loss.png        the training loss curve
    final.json      held-out retrieval (R@1/R@5 both ways, chance level), training time, preset, loss
    vocab.json      (real data only) the word vocabulary fitted on the training captions

Data: the built-in grounded shapes by default; --train-data / --val-data read webdataset tar shards, TSV/CSV
lists or img2dataset folders (minifilip/data/sources.py, README.md, "Training on CC3M"). With real data the checkpoint
stores where each loader worker stands in its shard order, and --resume continues from the next unseen sample (an
older checkpoint, another --num-workers or torchrun restart the epoch it stopped in, with a note).

Reading order: `train` is setup -> build_model -> open_train_data -> train_steps -> final_report, and
`train_steps` is the loop, one step in five phases: the batch, the learning rate, forward + backward + optimizer
step, logging, checkpoint.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from . import alignment, distributed, runs
from .checkpoint import checked_config, load_checkpoint, save_checkpoint
from .cli import DefaultsHelpFormatter, Parser, check_number, one_line, parse_device
from .config import PRESETS, FILIPConfig
from .data.builtin import BuiltinTrainStream, builtin_val_pairs
from .data.decode import split_counts
from .data.grounded import CAPTION_STYLES, vocabulary
from .data.grounded_shards import has_groundings, scene_pairs
from .data.transforms import normalize_uint8
from .data.sources import (CsvOptions, check_source, eval_stream, is_builtin, iter_captions, load_pairs, make_loader,
                           train_stream)
from .evaluate import retrieval
from .gradcache import cached_backward
from .model import FILIP
from .tokenizer import WordTokenizer

# flags that may differ between a run and its --resume; everything else comes from the checkpoint
# FILIPConfig fields that --set may not touch, and the flag that sets each instead
SET_RESERVED = {"vocab_size": "--vocab-size (real data) or the built-in vocabulary", "loss": "--loss",
                "token_keep_ratio": "--token-keep-ratio", "dropout": "--dropout"}
RESUME_OVERRIDABLE = ("steps", "device", "precision", "log_every", "save_every", "eval_batch_size",
                      "micro_batch_size", "compile", "num_workers", "gather_dtype", "eval_every")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="train_small.py", description="Train a small FILIP (or CLIP baseline) from scratch. "
                "Defaults: the built-in grounded shapes dataset and the 'tiny' preset, a few minutes on a CPU.",
                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model size (see FILIPConfig)")
    p.add_argument("--loss", default="filip", choices=["filip", "clip", "clip+filip"],
                   help="filip: token-wise late interaction; clip: global CLS/EOS cosine (the baseline); "
                        "clip+filip: the sum of both losses (one shared temperature)")
    p.add_argument("--filip-weight", type=float, default=None,
                   help="with --loss clip+filip: weight of the token-wise term (the CLIP term has weight 1); "
                        "default 1.0")
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
                        "'a circle', or colour-/shape-first drawn per mention); '+background' also names the "
                        "background's texture ('... on a checkered background.')")
    p.add_argument("--out", default=None, help="output folder (default: runs/<timestamp>); a folder that already "
                   "holds a run is refused unless --resume or --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out folder that holds a run: its run files are removed first")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run in DIR from its checkpoint.pt (to --steps in total); only "
                        + ", ".join("--" + k.replace("_", "-") for k in RESUME_OVERRIDABLE)
                        + " and --stop-at may be given with it")
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="end this invocation after STEP steps with a checkpoint (continue later with --resume)")
    p.add_argument("--val-size", type=int, default=1000, help="held-out pairs for the final retrieval eval")
    p.add_argument("--log-every", type=int, default=10, help="steps between metrics.jsonl lines")
    p.add_argument("--save-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--eval-batch-size", type=int, default=256, help="batch size when encoding for evaluation")
    p.add_argument("--eval-every", type=int, default=0, metavar="K",
                   help="every K steps (and at step 0, the untrained network) score held-out pointing game + "
                        "retrieval R@1 into metrics.jsonl, draw alignment.png and keep the best-retrieval "
                        "checkpoint as best.pt; 0 = off (real data: retrieval only, unless the shards carry "
                        "groundings: make_subset --src builtin)")
    p.add_argument("--eval-size", type=int, default=300,
                   help="held-out scenes / pairs scored by --eval-every (the first of the val split)")
    d = p.add_argument_group("real data (see the README section 'Training on CC3M')")
    d.add_argument("--train-data", default=None, metavar="SPEC",
                   help="training pairs: tar shards ('cc3m/{00000..00331}.tar', globs, lists joined by '::'), a "
                        "TSV/CSV list, or an img2dataset folder (default: the built-in grounded dataset)")
    d.add_argument("--val-data", default=None, metavar="SPEC",
                   help="evaluation pairs (its first --val-size samples); without it, the first --val-size "
                        "samples of --train-data are used, with a warning (they are not held out)")
    d.add_argument("--vocab-size", type=int, default=32000,
                   help="max vocabulary entries (special tokens included) fitted on the --train-data captions")
    d.add_argument("--min-count", type=int, default=2,
                   help="keep only words seen at least this often (default 2: words seen once - typos, junk "
                        "captions - become [UNK] instead of growing the vocabulary and the model)")
    d.add_argument("--vocab-samples", type=int, default=200_000,
                   help="fit the vocabulary on the captions of the first this-many training samples (0 = all)")
    d.add_argument("--num-workers", type=int, default=-1,
                   help="DataLoader worker processes for --train-data; -1 = auto: min(8, cores-1) with CUDA, "
                        "min(2, cores-2) on the CPU (the model needs the cores there)")
    d.add_argument("--shuffle-buffer", type=int, default=1000, help="samples each worker shuffles across shards")
    d.add_argument("--csv-img-key", default="filepath", help="image-path column of a TSV/CSV list")
    d.add_argument("--csv-caption-key", default="title", help="caption column of a TSV/CSV list")
    d.add_argument("--csv-separator", default="\t", help="field separator of a TSV/CSV list (default: a tab)")
    distributed.add_arguments(p)  # [distributed] --gather-dtype
    return p


def _check_args(args) -> None:
    for name in ("steps", "batch_size", "val_size", "log_every", "save_every", "eval_batch_size", "eval_size"):
        if getattr(args, name, 1) <= 0:  # getattr: eval_size is absent in checkpoints of older runs
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if getattr(args, "eval_every", 0) < 0:
        raise ValueError(f"--eval-every must be >= 0 (0 = off), got {args.eval_every}")
    if args.batch_size < 2:
        raise ValueError("--batch-size must be at least 2: contrastive learning needs in-batch negatives")
    if args.micro_batch_size < 0:
        raise ValueError(f"--micro-batch-size must be >= 0 (0 = no gradient caching), got {args.micro_batch_size}")
    check_number("--lr", args.lr, positive=True)
    check_number("--weight-decay", args.weight_decay, minimum=0)
    check_number("--warmup", args.warmup, minimum=0)
    if args.stop_at is not None and args.stop_at <= 0:
        raise ValueError(f"--stop-at must be a positive step, got {args.stop_at}")
    if getattr(args, "train_data", None) is not None:  # absent in checkpoints of older runs
        if args.vocab_size <= 4 or args.min_count < 1 or args.vocab_samples < 0 or args.num_workers < -1:
            raise ValueError("need --vocab-size > 4, --min-count >= 1, --vocab-samples >= 0, --num-workers >= -1")
    if caption_style(args) != "color-first" and real_data(args):
        raise ValueError("--caption-style applies to the built-in data only, not to --train-data")
    if getattr(args, "val_data", None) and is_builtin(getattr(args, "train_data", None)):
        raise ValueError("--val-data needs --train-data (the built-in dataset has its own validation split)")


def caption_style(args) -> str:
    """The built-in captions' style (--caption-style; runs saved before the flag existed used colour-first)."""
    return getattr(args, "caption_style", "color-first")


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
        raise ValueError(f"no caption words seen at least --min-count {args.min_count} times in {args.train_data} "
                         "(check --csv-caption-key / the shards; a tiny dataset may need --min-count 1)")
    return tokenizer


def resolve_device(name: str) -> torch.device:
    return parse_device(name)  # ValueError in one line on nonsense ("--device bogus")


def autocast_for(device: torch.device, precision: str):
    """(autocast context factory, GradScaler, resolved precision name) for --precision on `device`.

    "auto" means bf16 autocast on CUDA and fp32 on the CPU. The GradScaler is always there and enabled only for
    fp16, whose narrow exponent range needs loss scaling; disabled, scale() returns the loss unchanged, step() is
    optimizer.step() and update() does nothing, so the loop needs no branch for it.
    """
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs CUDA; use bf16 or fp32 on the CPU")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    if precision == "fp32":
        return contextlib.nullcontext, scaler, precision
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler, precision


def lr_at(step: int, *, lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of step `step` (0-based): linear warm-up to `lr` over `warmup_steps`, then cosine decay to 0
    at `total_steps`."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; the transformer and output-projection matrices decay. Biases, norms, the temperature and the
    embeddings do not: token and position embeddings, the CLS token, and the patch embedding (the image tower's
    input projection, named `patch_embed`, treated like the token embedding it mirrors)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_matrix = p.dim() >= 2 and "embed" not in name and not name.endswith("pos")
        (decay if is_matrix else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98), eps=1e-6)


def forward_backward(model: FILIP, images: torch.Tensor, ids: torch.Tensor, *, micro_batch_size: int,
                     autocast: Callable, scaler: torch.amp.GradScaler, towers=None,
                     gather_dtype: str = "auto") -> torch.Tensor:
    """The batch's loss, with its (scaled) gradient accumulated into the parameters' .grad.

    micro_batch_size > 0: gradient caching (gradcache.py), the memory of a micro-batch with the loss and gradient
    of the whole batch; 0: one plain forward and backward. Under torchrun (`towers` = the DDP-wrapped towers), the
    same over the global batch, the features gathered from every rank (distributed.py).
    """
    if towers is not None:  # [distributed]
        return distributed.train_step(towers, model, images, ids, micro_batch_size, gather_dtype, autocast, scaler)
    if micro_batch_size:
        with autocast():
            return cached_backward(model, images, ids, micro_batch_size, scaler=scaler)
    with autocast():
        loss = model.loss(images, ids)
    scaler.scale(loss).backward()
    return loss


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


def append_jsonl(path: str, row: dict) -> None:
    """One JSON line appended to metrics.jsonl (or any log)."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _trim_metrics(path: str, last_step: int) -> None:
    """Drop metrics logged after the checkpoint we resume from, so the log has no duplicate steps."""
    if os.path.exists(path):
        keep = [line for line in open(path) if line.strip() and json.loads(line).get("step", 0) <= last_step]
        with open(path, "w") as f:
            f.writelines(keep)


@dataclass
class Run:
    """What `setup` resolves before any training: flags, device, model config, tokenizer, precision."""
    args: argparse.Namespace      # the flags; with --resume the checkpoint's, RESUME_OVERRIDABLE ones from argv
    device: torch.device
    config: FILIPConfig
    tokenizer: WordTokenizer
    ckpt: dict | None             # the checkpoint resumed from; None for a fresh run
    autocast: Callable            # context factory for the forward passes (a no-op in fp32)
    scaler: torch.amp.GradScaler  # loss scaling, enabled for fp16 only (see autocast_for)
    precision: str                # "fp32", "bf16" or "fp16" ("auto" resolved)
    towers: object = None         # [distributed] DDP over the two towers under torchrun; None in one process

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.args.out, "metrics.jsonl")


@dataclass
class Progress:
    """How far the run is; saved in every checkpoint and restored by --resume."""
    step: int = 0               # optimizer steps done
    train_seconds: float = 0.0  # wall time spent in training steps (not start-up, not evaluation)


class TrainData:
    """The training batches, in one shape for every source: (images, captions, keys, counts[, position]), where
    counts are the bad / converted samples met since the last batch (always empty for the built-in data) and
    position (real data) is where the batch's loader slot stands in its shard order. It sums the counts over the
    run, turns them into log fields, and keeps every slot's latest position for the checkpoint."""

    def __init__(self, batches: Iterator, batch_size: int, epoch_len: int | None, counts: dict,
                 positions: dict | None = None):
        self.batches, self.batch_size = batches, batch_size
        self.epoch_len = epoch_len  # samples per epoch of real data; None for the built-in stream, which never ends
        self.counts = dict(counts)  # bad / converted samples by reason, over the whole run
        self.positions = positions  # {"slots": n, "at": {slot: [epoch, consumed]}} or None (no exact resume)
        self.last_keys: list[str] = []  # the keys of the latest batch (what tests check resume against)

    def next_batch(self, step: int) -> tuple[torch.Tensor, list[str]]:
        """(images (B, 3, S, S), captions) of the next batch."""
        try:
            images, captions, self.last_keys, counts, *position = next(self.batches)
        except StopIteration:
            raise ValueError(f"the training data ran out at step {step}: no worker found a usable sample "
                             f"(bad samples so far: {split_counts(self.counts)[0]})") from None
        if position and self.positions is not None:
            slot, _slots, epoch, consumed = position[0]
            self.positions["at"][int(slot)] = [int(epoch), int(consumed)]
            self.positions["last_slot"] = int(slot)
        counts = distributed.sum_counts(counts)  # [distributed] every rank's bad samples, on every rank
        for reason, n in counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n
        return images, captions

    def checkpoint_position(self) -> dict:
        """For checkpoint.pt: {"data_position": {"slots": n, "positions": [[slot, epoch, consumed], ...]}} (plain
        ints, so the file still loads with weights_only=True); {} when this run cannot resume exactly."""
        if self.positions is None:
            return {}
        at = self.positions["at"]
        return {"data_position": {"slots": self.positions["slots"], "last_slot": self.positions["last_slot"],
                                  "positions": [[slot, *at[slot]] for slot in sorted(at)]}}

    def log_fields(self, step: int) -> dict:
        """Epoch and bad / converted sample counts for metrics.jsonl (none for the built-in data)."""
        if self.epoch_len is None:
            return {}
        bad, converted = split_counts(self.counts)
        return {"epoch": step * self.batch_size / self.epoch_len, "bad_samples": bad, "converted_samples": converted}

    def postfix(self, step: int) -> dict:
        """The same, short, for the progress bar."""
        fields = self.log_fields(step)
        if not fields:
            return {}
        return {"epoch": f"{fields['epoch']:.2f}", "bad": sum(fields["bad_samples"].values()),
                "conv": sum(fields["converted_samples"].values())}


def setup(args, argv) -> Run:
    """Everything that can fail on bad input, before any training."""
    _check_args(args)
    device = resolve_device(args.device)
    ckpt = None
    if args.resume:
        given = given_flags(argv)
        _check_resume_flags(given)
        path = os.path.join(args.resume, "checkpoint.pt")
        ckpt = load_checkpoint(path)
        missing = [k for k in ("args", "optimizer", "step", "train_seconds", "rng") if k not in ckpt]
        if missing:
            raise ValueError(f"{path} has no training state ({', '.join(missing)} missing): it can be evaluated, "
                             "not resumed")
        saved = dict(ckpt["args"])
        for key in RESUME_OVERRIDABLE:
            if key in given:
                saved[key] = getattr(args, key)
        args = argparse.Namespace(**{**vars(args), **saved, "resume": args.resume, "out": args.resume,
                                     "stop_at": args.stop_at, "overwrite": False})
        _check_args(args)
        if args.stop_at is not None and args.stop_at <= int(ckpt["step"]):
            raise ValueError(f"--stop-at {args.stop_at}: the run is already at step {int(ckpt['step'])}")
        tokenizer = WordTokenizer.from_dict(ckpt["tokenizer"])
        config = checked_config(ckpt, path)  # the weights fit the config: checked before anything is allocated
    else:
        args.out = args.out or os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
        runs.check_new_run(args.out, args.overwrite)  # before the (possibly long) vocabulary fit
        overrides = FILIPConfig.parse_overrides(args.set, reserved=SET_RESERVED)
        tokenizer = fit_tokenizer(args) if real_data(args) else WordTokenizer(vocabulary(args.caption_style))
        if args.filip_weight is not None and args.loss != "clip+filip":
            raise ValueError(f"--filip-weight only applies to --loss clip+filip (got --loss {args.loss})")
        weights = {"filip_weight": args.filip_weight} if args.filip_weight is not None else {}
        config = FILIPConfig.preset(args.preset, vocab_size=len(tokenizer), loss=args.loss,
                                    token_keep_ratio=args.token_keep_ratio, dropout=args.dropout, **weights,
                                    **overrides)
    if args.compile is None:
        args.compile = device.type == "cuda"
    autocast, scaler, precision = autocast_for(device, args.precision)
    return Run(args, device, config, tokenizer, ckpt, autocast, scaler, precision)


def given_flags(argv) -> set[str]:
    """The option names (dests) present in argv, however spelled (--batch 64, --lr=5 ...)."""
    parser, unset = build_parser(), object()
    # argparse fills in a default only where the namespace has no value yet: pre-fill a marker, see what changed
    marked = argparse.Namespace(**{dest: unset for dest in vars(parser.parse_args([]))})
    return {dest for dest, value in vars(parser.parse_args(list(argv), namespace=marked)).items() if value is not unset}


def _check_resume_flags(given: set[str]) -> None:
    """--resume takes the run's settings from its checkpoint: a flag that would be ignored is an error."""
    ignored = sorted(given - set(RESUME_OVERRIDABLE) - {"resume", "stop_at"})
    if ignored:
        flags = ", ".join("--" + k.replace("_", "-") for k in ignored)
        allowed = ", ".join("--" + k.replace("_", "-") for k in (*RESUME_OVERRIDABLE, "stop_at"))
        raise ValueError(f"{flags} cannot be changed when resuming (the run keeps its own settings); with --resume "
                         f"only {allowed} may be given")


def build_model(run: Run) -> tuple[FILIP, torch.optim.Optimizer, Progress, dict]:
    """(model in train mode, optimizer, progress, data counts so far): fresh from --seed, or as the checkpoint
    left them (weights, optimizer state, step, random state)."""
    args = run.args
    torch.manual_seed(args.seed)
    model = FILIP(run.config).to(run.device)
    optimizer = make_optimizer(model, lr=args.lr, weight_decay=args.weight_decay)
    progress, counts = Progress(), {}
    if run.ckpt is not None:
        model.load_state_dict(run.ckpt["model"])  # shapes checked in setup
        try:
            optimizer.load_state_dict(run.ckpt["optimizer"])
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise ValueError(f"{args.out}/checkpoint.pt: the optimizer state does not fit the model ({e})") from None
        progress = Progress(int(run.ckpt["step"]), float(run.ckpt["train_seconds"]))
        counts = dict(run.ckpt.get("data_counts", {}))
        torch.set_rng_state(run.ckpt["rng"])
        if distributed.is_main():  # [distributed]
            _trim_metrics(run.metrics_path, progress.step)
        print(f"resuming {args.out} at step {progress.step}/{args.steps}")
    distributed.seed_ranks(args.seed, run.ckpt)  # [distributed] dropout differs per rank; no-op otherwise
    model.train()
    if args.compile:  # compile the towers only: the state_dict keeps its plain parameter names
        model.visual.compile()
        model.text.compile()
    run.towers = distributed.wrap_towers(model, run.device)  # [distributed] DDP over the towers; None otherwise
    return model, optimizer, progress, counts


def open_train_data(run: Run, step: int, counts: dict) -> TrainData:
    """The batches from step `step` on: the built-in stream, or a DataLoader over --train-data."""
    args = run.args
    if real_data(args):
        saved = (run.ckpt or {}).get("data_position")
        batches, epoch_len, positions = open_real_data(args, run.config, run.tokenizer, run.device, step, saved)
        return TrainData(batches, args.batch_size, epoch_len, counts, positions)
    batches = iter(BuiltinTrainStream(args.batch_size, run.config.image_size, seed=args.seed, start_step=step,
                                      rank=distributed.rank(), world_size=distributed.world_size(),  # [distributed]
                                      caption_style=caption_style(args)))
    return TrainData(batches, args.batch_size, None, counts)


def save_run(run: Run, model: FILIP, optimizer, progress: Progress, data: TrainData) -> None:
    """checkpoint.pt: everything --resume needs to continue as if never stopped."""
    extra = {"data_counts": data.counts, **data.checkpoint_position()} if real_data(run.args) else {}
    extra.update(distributed.rng_states())  # [distributed] every rank's generator (a collective)
    if not distributed.is_main():  # [distributed] only rank 0 writes
        return
    save_checkpoint(os.path.join(run.args.out, "checkpoint.pt"), model, run.tokenizer,
                    optimizer=optimizer.state_dict(), step=progress.step, train_seconds=progress.train_seconds,
                    args=vars(run.args), rng=torch.get_rng_state(), **extra)


def train(args, argv=()) -> dict:
    """One run: set up, build the model, train to --steps (or --stop-at), then evaluate and write the report."""
    run = setup(args, argv)
    run.device = distributed.init(run.args, run.device)  # [distributed] torchrun: join the group; no-op otherwise
    if distributed.is_main():
        runs.start_run(run.args.out, overwrite=run.args.overwrite, resume=run.ckpt is not None)  # checked in setup
    model, optimizer, progress, counts = build_model(run)
    data = open_train_data(run, progress.step, counts)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"minifilip {run.args.preset} ({n_params / 1e6:.1f}M params), loss={run.config.loss}, "
          f"batch {run.args.batch_size}, {run.args.steps} steps on {run.device} ({run.precision}) -> {run.args.out}")
    tracker = make_tracker(run) if run.args.eval_every and distributed.is_main() else None
    train_steps(run, model, optimizer, data, progress, tracker)
    if progress.step < run.args.steps:
        print(f"stopped at step {progress.step}/{run.args.steps}; continue with --resume {run.args.out}")
        return {}
    if not distributed.is_main():  # [distributed] rank 0 evaluates and writes the results
        return {}
    return final_report(run, model, progress, data)


def train_steps(run: Run, model: FILIP, optimizer, data: TrainData, progress: Progress,
                tracker: alignment.AlignmentTracker | None = None) -> None:
    """The training loop, to --steps or --stop-at; each step's phases in the order they happen."""
    args, device = run.args, run.device
    if tracker is not None and progress.step == 0:  # the untrained network: the baseline of every curve
        track_alignment(run, model, tracker, progress)
    stop = min(args.steps, args.stop_at) if args.stop_at else args.steps
    bar = tqdm(total=args.steps, initial=progress.step, desc="train", dynamic_ncols=True,
               disable=None if distributed.is_main() else True)  # [distributed]
    # throughput and loader wait since the last metrics line; the wait is the time from the end of the previous
    # step to having the next batch in hand (a loader that keeps up hands it over at once)
    window_start, window_images, window_wait = time.time(), 0, 0.0
    while progress.step < stop:
        t0 = time.time()
        # ---- the batch: images to the device, captions to token ids
        images, captions = data.next_batch(progress.step)
        window_wait += time.time() - t0
        images = images.to(device, non_blocking=True)
        if images.dtype == torch.uint8:  # real data arrives as uint8 (4x fewer bytes): normalise on the device
            images = normalize_uint8(images)
        ids = run.tokenizer.encode(captions, run.config.context_length).to(device)
        # ---- the learning rate of this step
        for group in optimizer.param_groups:
            group["lr"] = lr_at(progress.step, lr=args.lr, warmup_steps=args.warmup, total_steps=args.steps)
        # ---- forward, backward, optimizer step
        optimizer.zero_grad(set_to_none=True)
        loss = forward_backward(model, images, ids, micro_batch_size=args.micro_batch_size, autocast=run.autocast,
                                scaler=run.scaler, towers=run.towers,
                                gather_dtype=getattr(args, "gather_dtype", "auto"))
        run.scaler.step(optimizer)  # optimizer.step(); under fp16 it first unscales, and skips inf/NaN steps
        run.scaler.update()
        model.clamp_logit_scale_()  # in place, after the step: the temperature can come back from its floor
        progress.step += 1
        progress.train_seconds += time.time() - t0
        # ---- logging: the progress bar every step, a metrics.jsonl line every --log-every steps
        window_images += len(captions) * distributed.world_size()  # [distributed] global throughput
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            hint = "lower --lr" if run.precision == "fp32" else "lower --lr or use --precision fp32"
            raise ValueError(f"loss became {loss_value} at step {progress.step}; {hint} (checkpoint.pt keeps the "
                             "last saved step)")
        window_seconds = time.time() - window_start
        img_per_s, wait_frac = window_images / window_seconds, min(1.0, window_wait / window_seconds)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", img_s=f"{img_per_s:.0f}", wait=f"{wait_frac:.0%}",
                        **data.postfix(progress.step))
        if (progress.step % args.log_every == 0 or progress.step == args.steps) and distributed.is_main():
            row = {"step": progress.step, "loss": loss_value, "lr": optimizer.param_groups[0]["lr"],
                   "temperature": 1.0 / model.inverse_temperature.item(), "img_per_s": img_per_s,
                   "data_wait_frac": wait_frac, "train_seconds": progress.train_seconds}
            if device.type == "cuda":
                row["peak_gpu_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            append_jsonl(run.metrics_path, {**row, **data.log_fields(progress.step)})
            window_start, window_images, window_wait = time.time(), 0, 0.0
        # ---- held-out alignment every --eval-every steps (metrics.jsonl, alignment.png, best.pt)
        if tracker is not None and (progress.step % args.eval_every == 0 or progress.step == args.steps):
            t_eval = time.time()
            track_alignment(run, model, tracker, progress)
            window_start += time.time() - t_eval  # evaluating is not training: keep it out of img/s and the wait
        # ---- checkpoint every --save-every steps and where this invocation stops
        if progress.step % args.save_every == 0 or progress.step == stop:
            save_run(run, model, optimizer, progress, data)
    bar.close()


def make_tracker(run: Run) -> alignment.AlignmentTracker:
    """The fixed held-out set --eval-every scores: the first --eval-size built-in val scenes (pointing game +
    retrieval), or the first --eval-size pairs of --val-data / --train-data (retrieval only, or pointing game +
    retrieval when those are shards with groundings, see make_subset --src builtin)."""
    args, size = run.args, run.config.image_size
    spec = args.val_data or args.train_data
    if real_data(args) and has_groundings(spec):  # shards of built-in scenes: the pointing game too
        images, captions, scenes = scene_pairs(spec, args.eval_size, size)
    elif real_data(args):
        images, captions, _keys, _counts = load_pairs(spec, args.eval_size, size, csv_options(args))
        scenes = None
    else:
        images, captions, scenes = builtin_val_pairs(args.eval_size, size, seed=args.seed,
                                                     caption_style=caption_style(args))
    return alignment.AlignmentTracker(run.tokenizer, images, captions, scenes, args.eval_batch_size, run.autocast)


def track_alignment(run: Run, model: FILIP, tracker: alignment.AlignmentTracker, progress: Progress) -> None:
    """Score the held-out set now: a metrics.jsonl line, alignment.png redrawn, best.pt when retrieval improved."""
    before = alignment.eval_rows(run.metrics_path)
    row = {"step": progress.step, **tracker.measure(model)}
    append_jsonl(run.metrics_path, row)
    alignment.plot_alignment(run.metrics_path, os.path.join(run.args.out, "alignment.png"))
    if not before or alignment.retrieval_score(row) > max(map(alignment.retrieval_score, before)):
        save_checkpoint(os.path.join(run.args.out, "best.pt"), model, run.tokenizer, step=progress.step, val=row)


def load_val_pairs(run: Run) -> tuple[torch.Tensor, list[str]]:
    """(images, captions) held out for evaluation: the built-in val split, or the first --val-size samples of
    --val-data (without it, of --train-data)."""
    args, size = run.args, run.config.image_size
    if real_data(args):
        images, captions, _keys, _counts = load_pairs(args.val_data or args.train_data, args.val_size, size,
                                                      csv_options(args))
    else:
        images, captions, _scenes = builtin_val_pairs(args.val_size, size, seed=args.seed,
                                                      caption_style=caption_style(args))
    return images, captions


def held_out_retrieval(run: Run, model: FILIP, val: tuple[torch.Tensor, list[str]]) -> dict:
    """R@1 / R@5 both ways on the held-out pairs (evaluate.retrieval, under the training precision)."""
    images, captions = val
    return retrieval(model, run.tokenizer, images, captions, run.args.eval_batch_size, ks=(1, 5),
                     autocast=run.autocast)


def final_report(run: Run, model: FILIP, progress: Progress, data: TrainData) -> dict:
    """Held-out retrieval at the end of training -> final.json, loss.png and a table on stdout."""
    args = run.args
    val = load_val_pairs(run)
    final = {"val": held_out_retrieval(run, model, val), "train_seconds": round(progress.train_seconds, 1),
             "preset": args.preset, "loss": run.config.loss, "steps": progress.step, "batch_size": args.batch_size}
    tracked = alignment.summary(alignment.eval_rows(run.metrics_path))
    if tracked:
        final["alignment"] = tracked  # untrained (step 0), best by retrieval (saved as best.pt), last
    if real_data(args):
        bad, converted = split_counts(data.counts)
        final.update(train_data=args.train_data, val_source=args.val_data or
                     f"train (first {len(val[1])} samples of --train-data, not held out)",
                     bad_samples=bad, converted_samples=converted)
    with open(os.path.join(args.out, "final.json"), "w") as f:
        json.dump(final, f, indent=2)
    plot_loss(run.metrics_path, os.path.join(args.out, "loss.png"))
    print_table(final)
    return final


def open_real_data(args, config, tokenizer, device, step: int, saved_position: dict | None = None):
    """Check both sources, save the vocabulary, and return (batch iterator, samples per epoch, positions: see
    TrainData). Everything that can be wrong with the data fails here, in one line, before the first step.
    saved_position: the checkpoint's "data_position"; each loader slot continues after the last sample it
    delivered, so a stopped and resumed run sees every sample of the epoch exactly once."""
    csv = csv_options(args)
    stream = train_stream(args.train_data, config.image_size, seed=args.seed, csv=csv, uint8=True,
                          shuffle_buffer=args.shuffle_buffer, rank=distributed.rank(),
                          world_size=distributed.world_size())  # [distributed] disjoint units per rank
    check_source(stream, args.train_data)
    distributed.check_shares(len(stream.units()), args.train_data)  # [distributed]
    if args.val_data:
        check_source(eval_stream(args.val_data, config.image_size, csv=csv), args.val_data)
    else:
        print(f"warning: no --val-data; the final retrieval eval uses the first {args.val_size} samples of "
              "--train-data, which the model has trained on")
    epoch_len = stream.epoch_length()
    if not epoch_len:
        raise ValueError(f"{args.train_data} holds no samples")
    workers = auto_workers(args.num_workers, device)
    slots = max(1, workers) * distributed.world_size()  # [distributed] every rank's workers
    stream.start_epoch = step * args.batch_size // epoch_len
    positions = {"slots": slots, "last_slot": slots - 1, "at": {s: [stream.start_epoch, 0] for s in range(slots)}}
    if distributed.world_size() > 1:  # [distributed] each rank knows only its own slots: restart the epoch
        positions = None
    if step and positions is not None and saved_position and saved_position.get("slots") == slots:
        stream.resume_positions = {int(s): (int(e), int(c)) for s, e, c in saved_position["positions"]}
        positions["at"].update({s: list(p) for s, p in stream.resume_positions.items()})
        positions["last_slot"] = int(saved_position.get("last_slot", slots - 1))
        stream.worker_rotation = (positions["last_slot"] + 1) % slots  # the next batch's slot comes first
        print(f"resuming the data exactly where each of the {slots} loader slots stopped")
    elif step:  # older checkpoint, another --num-workers, or torchrun: the stream is reproducible from (seed, epoch)
        why = "it stores no loader position" if not saved_position else \
            f"its loader position is for {saved_position.get('slots')} slots, not {slots}" if positions else \
            "exact data resume is for one process"
        print(f"note: the checkpoint cannot resume the data exactly ({why}): restarting epoch {stream.start_epoch} "
              "from its beginning")
    stream.track_positions = positions is not None
    if distributed.is_main():  # [distributed]
        tokenizer.save(os.path.join(args.out, "vocab.json"))
    print(f"train data: {args.train_data}: ~{epoch_len} samples per epoch ({epoch_len // args.batch_size} steps), "
          f"{workers} loader workers, vocabulary of {len(tokenizer)} words")
    loader = make_loader(stream, args.batch_size // distributed.world_size(), workers,  # [distributed]
                         pin_memory=device.type == "cuda", seed=args.seed)
    return iter(loader), epoch_len, positions


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
        print(f"train_small.py: error: {one_line(e)}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()  # [distributed] no-op without torchrun
    return 0
