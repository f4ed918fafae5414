"""Several processes, one contrastive batch: torchrun data parallelism with FILIP's communication tricks.

    torchrun --nproc_per_node=4 train_small.py --batch-size 1024 ...    # 4 ranks x 256 pairs, one loss over 1024

Each rank (one process, one GPU) encodes its share b = B / world_size of the global batch of B pairs. Contrastive
learning needs every image scored against every caption of the *global* batch, so the ranks exchange features:

    1. select   (optional, FILIP's trick) each rank keeps its most informative tokens, ranked against its *local*
                batch, before anything is sent: communication and the B x B loss shrink together
    2. cast     (optional, --gather-dtype) the kept tokens to fp16/bf16: half the bytes on the wire
    3. pad      trailing all-padding slots are dropped, then token widths are padded to the largest across
                ranks (all_gather needs one shape everywhere)
    4. gather   tokens and masks of every rank; the gradient of the gathered tokens flows back to their owner
    5. loss     this rank's b rows (images -> all texts) and b columns (texts -> all images) only, with the
                labels offset by rank x b: open_clip's "local loss". The mean of the ranks' local losses is
                exactly the single-process loss over the global batch, and no rank builds the full B x B
                score matrices.

The towers are wrapped in DistributedDataParallel (DDP), which averages their gradients across ranks; the
temperature lives outside the towers and is averaged by hand (`sync_logit_scale_grad`). Gradient caching
(`--micro-batch-size`) composes with all this: pass 1 encodes the local micro-batches without a graph, the
gathered loss runs once, pass 2 replays each micro-batch under `no_sync` except the last, so DDP communicates
once per step. Why the gradient is exactly the global batch's: rank r's feature gradient is the sum over ranks
of d(local loss)/d(its features), i.e. world_size x dL/dE_r with L the global loss; DDP's average divides the
world_size back out.

Without torchrun (no RANK / WORLD_SIZE in the environment) nothing here runs and training is unchanged.
"""
from __future__ import annotations

import builtins
import contextlib
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from . import cmli
from .gradcache import RNGState, _cuda_devices, _restore_buffers, _snapshot_buffers, replay_rng

GATHER_DTYPES = {"auto": None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------- process group and rank helpers
def launched_by_torchrun() -> bool:
    """torchrun (python -m torch.distributed.run) sets RANK and WORLD_SIZE for every process it starts."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_enabled() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_enabled() else 0


def world_size() -> int:
    return dist.get_world_size() if is_enabled() else 1


def is_main() -> bool:
    """Rank 0 (or a plain single process): the one that prints and writes files."""
    return rank() == 0


def add_arguments(parser) -> None:
    """The flags of multi-process training (they do nothing in a plain single process)."""
    g = parser.add_argument_group("several GPUs (launch with torchrun; see the README section 'More than one GPU')")
    g.add_argument("--gather-dtype", default="auto", choices=sorted(GATHER_DTYPES),
                   help="precision of the token features sent between ranks: auto = as encoded (bf16 under "
                        "--precision bf16, fp32 under fp32); fp16 is the paper's choice")


def init(args, device: torch.device) -> torch.device:
    """Join the torchrun process group (NCCL on CUDA, gloo on the CPU) and make every rank agree on the run.

    Returns this rank's device (cuda:LOCAL_RANK for CUDA). Checks that the global batch splits evenly, gives
    every rank rank 0's output folder, and silences print on ranks > 0. No-op without torchrun.
    """
    if not launched_by_torchrun():
        return device
    world, local_rank = int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    check_batch(args.batch_size, world)
    if device.type == "cuda":
        if device.index not in (None, local_rank) and world > 1:
            raise ValueError(f"--device {device} with torchrun: each rank uses cuda:LOCAL_RANK; pass --device cuda")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not is_enabled():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    args.out = broadcast_object(args.out)  # each rank stamped its own default runs/<time>; rank 0's wins
    if not is_main():
        _silence_stdout()
    print(f"torchrun: {world} processes ({dist.get_backend()}), batch {args.batch_size} = {world} x "
          f"{args.batch_size // world} pairs per rank")
    return device


def shutdown() -> None:
    if is_enabled():
        dist.destroy_process_group()


def check_batch(batch_size: int, world: int) -> None:
    """One-line errors for a global batch that does not split into equal rank shares."""
    if batch_size % world:
        raise ValueError(f"--batch-size {batch_size} must be divisible by the number of processes ({world}): "
                         "every rank encodes an equal share of the global batch")
    if batch_size // world < 2:
        raise ValueError(f"--batch-size {batch_size} over {world} processes leaves fewer than 2 pairs per rank")


def check_shares(n_units: int, spec: str) -> None:
    """A real-data stream deals its units (shards, index chunks) to ranks; a rank with none would stop while the
    others wait for it forever, so refuse that up front."""
    if n_units < world_size():
        raise ValueError(f"{spec} has {n_units} shard(s) for {world_size()} processes; every rank needs at least "
                         "one (split the data into more shards)")


def _silence_stdout() -> None:
    """Ranks > 0 print nothing to stdout (errors on stderr still show), so the log reads like one process."""
    plain_print = builtins.print

    def print_errors_only(*a, file=None, **kw):
        if file is not None and file is not sys.stdout:
            plain_print(*a, file=file, **kw)
    builtins.print = print_errors_only


def broadcast_object(obj):
    """Rank 0's value of a picklable object, on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_counts(counts: dict) -> dict:
    """{reason: n} summed over ranks (bad / converted real-data samples), so rank 0 reports every rank's.
    A collective: every rank must call it. Unchanged in a single process."""
    if not is_enabled():
        return counts
    parts = [None] * world_size()
    dist.all_gather_object(parts, dict(counts))
    total: dict = {}
    for part in parts:
        for reason, n in part.items():
            total[reason] = total.get(reason, 0) + n
    return total


# ---------------------------------------------------------------------- random numbers
def seed_ranks(seed: int, ckpt: dict | None) -> None:
    """Weights agree (every rank built them from `seed`, and DDP broadcasts rank 0's); dropout must differ.

    Call after the model is built. A fresh run seeds each rank from (seed, rank); a resumed run restores each
    rank's own generator from the checkpoint when the number of ranks is unchanged (else seeds from
    (seed, rank, step) and says so). No-op in a single process.
    """
    if not is_enabled():
        return
    saved = (ckpt or {}).get("rng_ranks")
    if saved is not None and len(saved) == world_size():
        torch.set_rng_state(saved[rank()])
        return
    step = int(ckpt["step"]) if ckpt is not None else 0
    if ckpt is not None:
        print(f"note: the checkpoint holds no random state for {world_size()} ranks; dropout reseeded")
    torch.manual_seed(int(np.random.SeedSequence([seed, rank(), step]).generate_state(1)[0]))


def rng_states() -> dict:
    """{"rng_ranks": [every rank's CPU generator state]} for the checkpoint ({} in a single process).
    A collective: every rank must call it."""
    if not is_enabled():
        return {}
    states = [None] * world_size()
    dist.all_gather_object(states, torch.get_rng_state())
    return {"rng_ranks": states}


# ---------------------------------------------------------------------- gathering features
class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0; the backward hands each rank the gradient of its own slice, summed over every
    rank's loss (a reduce-scatter). Same as torch.distributed.nn.functional.all_gather, without its
    deprecation, and returning one concatenated tensor."""

    @staticmethod
    def forward(ctx, x):  # x (b, ...) -> (world * b, ...)
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):  # grad (world * b, ...) -> (b, ...)
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            mine = torch.empty_like(grad.chunk(world_size())[0])
            dist.reduce_scatter_tensor(mine, grad)
            return mine
        dist.all_reduce(grad)  # gloo has no reduce-scatter: sum everything, keep my slice
        return grad.chunk(world_size())[rank()]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(b, ...) on every rank -> (world * b, ...), rank r's rows at [r*b, (r+1)*b), differentiable."""
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """all_gather without gradient (masks)."""
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def pad_width(tokens: torch.Tensor, mask: torch.Tensor, width: int):
    """(b, L, D), (b, L) -> (b, width, D), (b, width): zero tokens and False mask on the new slots."""
    extra = width - tokens.shape[1]
    return F.pad(tokens, (0, 0, 0, extra)), F.pad(mask, (0, extra), value=False)


def trim_padding(tokens: torch.Tensor, mask: torch.Tensor):
    """Drop the trailing slots that are padding in every sample (captions padded to the full context length):
    nothing to send for them. (b, L, D), (b, L) -> (b, L', D), (b, L') with L' = last used slot + 1."""
    used = mask.any(dim=0).nonzero()  # (n_used, 1) columns some sample uses
    width = int(used.max()) + 1 if used.numel() else 1
    return tokens[:, :width], mask[:, :width]


def gather_tokens(tokens: torch.Tensor, mask: torch.Tensor):
    """Tokens (b, L_r, D) and mask (b, L_r) of every rank -> (B, L, D), (B, L), L the widest L_r."""
    width = torch.tensor(tokens.shape[1], device=tokens.device)
    dist.all_reduce(width, op=dist.ReduceOp.MAX)
    tokens, mask = pad_width(tokens, mask, int(width))
    return gather_with_grad(tokens), gather(mask.to(torch.uint8)).bool()


@dataclass
class Gathered:
    """The global batch's features, as every rank sees them after the exchange; rows [offset, offset + b) are
    this rank's own samples."""
    image_tokens: torch.Tensor  # (B, N', D)
    image_mask: torch.Tensor    # (B, N')
    text_tokens: torch.Tensor   # (B, M', D)
    text_mask: torch.Tensor     # (B, M')
    offset: int                 # rank * b
    local: int                  # b


def select_and_gather(image_tokens, image_mask, text_tokens, text_mask, keep_ratio: float = 1.0,
                      dtype: torch.dtype | None = None) -> Gathered:
    """Steps 1-4 of the module docstring on this rank's (b, N, D) / (b, M, D) features."""
    if keep_ratio < 1.0:  # ranked against the local batch only: the paper selects before communicating
        image_tokens, image_mask, text_tokens, text_mask = cmli.select_tokens(
            image_tokens, image_mask, text_tokens, text_mask, keep_ratio)
    if dtype is not None:
        image_tokens, text_tokens = image_tokens.to(dtype), text_tokens.to(dtype)
    image_tokens, image_mask = trim_padding(image_tokens, image_mask)
    text_tokens, text_mask = trim_padding(text_tokens, text_mask)
    b = image_tokens.shape[0]
    return Gathered(*gather_tokens(image_tokens, image_mask), *gather_tokens(text_tokens, text_mask),
                    offset=rank() * b, local=b)


# ---------------------------------------------------------------------- the loss
def local_info_nce(s_i2t: torch.Tensor, s_t2i: torch.Tensor, logit_scale: torch.Tensor, offset: int):
    """InfoNCE of this rank's pairs against the whole batch.

    s_i2t (b, B): my images' rows; s_t2i (B, b): my texts' columns. My pair k is global sample offset + k.
    The mean of this over ranks equals loss.info_nce on the full (B, B) matrices.
    """
    labels = offset + torch.arange(s_i2t.shape[0], device=s_i2t.device)  # (b,)
    loss_i2t = F.cross_entropy(logit_scale * s_i2t.float(), labels)  # each of my images picks its text
    loss_t2i = F.cross_entropy(logit_scale * s_t2i.float().t(), labels)  # each of my texts picks its image
    return 0.5 * (loss_i2t + loss_t2i)


def local_contrastive_loss(model, image_tokens, image_mask, text_tokens, text_mask,
                           dtype: torch.dtype | None = None) -> torch.Tensor:
    """This rank's share of the global contrastive loss (the ranks' mean is the global loss).

    Inputs: this rank's encoded features (model.encode_image / encode_text outputs). Token selection uses the
    model's config.token_keep_ratio (token-wise terms only); dtype: the cast before the gather (None: as encoded).
    "clip+filip" (granularity "both": the global vector at position 0, then the tokens) adds the two terms with
    their weights, as FILIP.contrastive_loss does.
    """
    cfg = model.config
    if cfg.loss != "clip+filip":
        ratio = cfg.token_keep_ratio if cfg.loss == "filip" else 1.0
        return _local_term(model, image_tokens, image_mask, text_tokens, text_mask, ratio, dtype)
    total = 0.0
    if cfg.clip_weight:  # the CLS / EOS vectors at position 0 (masked out of the token-wise term)
        ones = lambda x: torch.ones(x.shape[0], 1, dtype=torch.bool, device=x.device)  # noqa: E731
        total = total + cfg.clip_weight * _local_term(model, image_tokens[:, :1], ones(image_tokens),
                                                      text_tokens[:, :1], ones(text_tokens), 1.0, dtype)
    if cfg.filip_weight:
        total = total + cfg.filip_weight * _local_term(model, image_tokens[:, 1:], image_mask[:, 1:],
                                                       text_tokens[:, 1:], text_mask[:, 1:], cfg.token_keep_ratio,
                                                       dtype)
    return total


def _local_term(model, image_tokens, image_mask, text_tokens, text_mask, ratio: float, dtype) -> torch.Tensor:
    """One InfoNCE term: select locally, gather, score my rows and columns against the whole batch."""
    g = select_and_gather(image_tokens, image_mask, text_tokens, text_mask, ratio, dtype)
    mine = slice(g.offset, g.offset + g.local)
    s_i2t, _ = model.scores(g.image_tokens[mine], g.image_mask[mine], g.text_tokens, g.text_mask)  # (b, B)
    _, s_t2i = model.scores(g.image_tokens, g.image_mask, g.text_tokens[mine], g.text_mask[mine])  # (B, b)
    return local_info_nce(s_i2t, s_t2i, model.inverse_temperature, g.offset)


def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The average of a scalar over ranks, detached (the global loss, for logging)."""
    x = x.detach().float().clone()
    dist.all_reduce(x)
    return x / world_size()


# ---------------------------------------------------------------------- towers under DDP, one training step
class Towers(nn.Module):
    """The two encoders as one module for DDP: forward(images, ids) -> model.encode_image + model.encode_text.

    Only the towers are registered (DDP averages their gradients); the temperature stays outside, since pass 2
    of gradient caching never touches it. The FILIP model is held without registering it (no parameter twice).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.visual, self.text = model.visual, model.text
        self._model = [model]  # a list hides it from nn.Module registration

    def forward(self, images: torch.Tensor, ids: torch.Tensor):
        model = self._model[0]
        return (*model.encode_image(images), *model.encode_text(ids))  # img (b,N,D), mask, txt (b,M,D), mask


def wrap_towers(model: nn.Module, device: torch.device) -> DistributedDataParallel | None:
    """DDP over the model's towers (rank 0's weights broadcast to all), or None in a single process."""
    if not is_enabled():
        return None
    with torch.no_grad():
        dist.broadcast(model.logit_scale.data, src=0)
    return DistributedDataParallel(Towers(model), device_ids=[device] if device.type == "cuda" else None)


def sync_logit_scale_grad(model: nn.Module) -> None:
    """Average the temperature's gradient over ranks (DDP does the towers)."""
    grad = model.logit_scale.grad
    dist.all_reduce(grad)
    grad /= world_size()


def train_step(towers: DistributedDataParallel, model: nn.Module, images: torch.Tensor, ids: torch.Tensor,
               micro_batch_size: int = 0, gather_dtype: str = "auto", autocast=contextlib.nullcontext,
               scaler=None) -> torch.Tensor:
    """Fill every parameter's .grad with the gradient of the global-batch loss; return that loss (detached).

    images (b, 3, H, W), ids (b, L): this rank's share. micro_batch_size > 0: gradient caching.
    """
    dtype = GATHER_DTYPES[gather_dtype]
    if micro_batch_size:
        loss = _cached_step(towers, model, images, ids, micro_batch_size, dtype, autocast, scaler)
    else:
        with autocast():
            loss = local_contrastive_loss(model, *towers(images, ids), dtype=dtype)
        (scaler.scale(loss) if scaler is not None else loss).backward()
    sync_logit_scale_grad(model)
    return mean_over_ranks(loss)


def _cached_step(towers, model, images, ids, micro_batch_size, dtype, autocast, scaler) -> torch.Tensor:
    """Gradient caching across ranks (see gradcache.py for the one-process version and why it is exact)."""
    cuda_devices = _cuda_devices(model, images, ids)
    chunks = list(zip(torch.split(images, micro_batch_size), torch.split(ids, micro_batch_size)))
    # pass 1: features only; each micro-batch encodes its images then its texts from a saved random state
    states, outs = [], []
    with torch.no_grad(), autocast():
        for image_chunk, id_chunk in chunks:
            states.append(RNGState(cuda_devices))
            outs.append((*model.encode_image(image_chunk), *model.encode_text(id_chunk)))
    buffers = _snapshot_buffers(model)
    img, img_mask, txt, txt_mask = (torch.cat(parts) for parts in zip(*outs))  # (b, N, D), (b, N), ...
    img.requires_grad_(), txt.requires_grad_()
    del outs
    # the gathered loss, once; its backward runs the gather's reduce-scatter and fills img.grad / txt.grad
    with autocast():
        loss = local_contrastive_loss(model, img, img_mask, txt, txt_mask, dtype=dtype)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    grads = zip(torch.split(img.grad, micro_batch_size), torch.split(txt.grad, micro_batch_size))
    # pass 2: replay each micro-batch with a graph; DDP all-reduces only after the last one
    for k, ((image_chunk, id_chunk), state, (g_img, g_txt)) in enumerate(zip(chunks, states, grads)):
        sync = contextlib.nullcontext() if k == len(chunks) - 1 else towers.no_sync()
        with sync:
            with replay_rng(state, cuda_devices), autocast():
                tokens_img, _, tokens_txt, _ = towers(image_chunk, id_chunk)
            torch.autograd.backward([tokens_img, tokens_txt], [g_img, g_txt])
    _restore_buffers(model, buffers)
    return loss.detach()
