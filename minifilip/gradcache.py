"""Gradient caching: contrastive batches of thousands on one GPU, with the exact full-batch gradient.

A contrastive loss couples every sample with every other, so plain gradient accumulation (a loss per
micro-batch) changes the objective: each micro-batch only sees its own negatives. Gradient caching
(Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup") keeps the
objective and splits the *work* instead:

    pass 1  (no grad)   encode every micro-batch -> token embeddings E, keep E (small), drop activations
    loss    (grad)      L = contrastive_loss(E) once, on the whole batch; dL/dE is cached
    pass 2  (grad)      re-encode each micro-batch and backpropagate the cached dL/dE through it

By the chain rule dL/dtheta = sum over micro-batches of (dE_mb/dtheta)^T dL/dE_mb, which is what pass 2
accumulates. Peak activation memory is that of one micro-batch; compute is one extra forward (~1.33x).

The gradient is exact only if pass 2 recomputes *the same* E as pass 1. Three things can break that, and
this implementation handles each:

* random numbers (dropout): the CPU and CUDA generator states are saved before each micro-batch in pass 1
  and replayed in pass 2, so every dropout mask is drawn again identically;
* buffers mutated by a forward (e.g. BatchNorm running statistics): snapshotted after pass 1 and restored
  after pass 2, so they are updated once per micro-batch, as a single forward would;
* micro-batch boundaries: the batch is cut with `torch.split`, so a last, smaller micro-batch is fine.

    loss = cached_backward(model, images, ids, micro_batch_size=256)   # .grad filled, like loss.backward()
    optimizer.step()

Randomness: after the call the global generators are where `reference_microbatched_loss` (the same
micro-batches encoded once, with grad) leaves them, i.e. advanced exactly by pass 1; pass 2's draws are
replayed from saved states and forked away. (A plain `model.loss` on the whole batch draws the same
*number* of dropout values on CPU, but in a different layout, so its masks differ from micro-batched ones.)
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


# ---------------------------------------------------------------------- random state
class RNGState:
    """A snapshot of the CPU generator and the CUDA generators of `cuda_devices`."""

    def __init__(self, cuda_devices: list[torch.device]):
        self.cpu = torch.get_rng_state()
        self.cuda = [(d, torch.cuda.get_rng_state(d)) for d in cuda_devices]

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for device, state in self.cuda:
            torch.cuda.set_rng_state(state, device)


@contextmanager
def replay_rng(state: RNGState, cuda_devices: list[torch.device]):
    """Run the body from the random state `state`, then put the generators back where they were.

    Like `torch.random.fork_rng`, the body's draws do not leak out; unlike it, the body starts from a
    saved state instead of the current one, so it repeats the draws made after `state` was captured.
    """
    outside = RNGState(cuda_devices)
    state.restore()
    try:
        yield
    finally:
        outside.restore()


def _cuda_devices(model: torch.nn.Module, *tensors: torch.Tensor) -> list[torch.device]:
    """The CUDA devices whose generators a forward of `model` on `tensors` may draw from."""
    devices = {p.device for p in model.parameters()} | {t.device for t in tensors}
    return sorted((d for d in devices if d.type == "cuda"), key=lambda d: d.index or 0)


# ---------------------------------------------------------------------- helpers
def _check(images: torch.Tensor, text_ids: torch.Tensor, micro_batch_size) -> None:
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size <= 0:
        raise ValueError(f"micro_batch_size must be a positive integer, got {micro_batch_size!r}")
    if images.shape[0] != text_ids.shape[0]:
        raise ValueError(f"need matched pairs: {images.shape[0]} images vs {text_ids.shape[0]} captions")
    if images.shape[0] == 0:
        raise ValueError("empty batch")


def _encoders(model, images: torch.Tensor, text_ids: torch.Tensor, micro_batch_size: int):
    """The micro-batch jobs in the order pass 1 runs them: every image chunk, then every text chunk.

    Yields (encode_fn, chunk). The order is part of the contract: dropout masks are drawn in this order,
    by `cached_backward`'s pass 1 and by `reference_microbatched_loss` alike.
    """
    for chunk in torch.split(images, micro_batch_size):  # last chunk may be smaller
        yield model.encode_image, chunk
    for chunk in torch.split(text_ids, micro_batch_size):
        yield model.encode_text, chunk


def _snapshot_buffers(model: torch.nn.Module) -> list[torch.Tensor]:
    return [b.detach().clone() for b in model.buffers()]


def _restore_buffers(model: torch.nn.Module, saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for b, s in zip(model.buffers(), saved):
            b.copy_(s)


# ---------------------------------------------------------------------- the two entry points
def reference_microbatched_loss(model, images: torch.Tensor, text_ids: torch.Tensor,
                                micro_batch_size: int) -> torch.Tensor:
    """The loss `cached_backward` differentiates, computed the memory-hungry way (for tests and teaching).

    Encodes the same image micro-batches, then text micro-batches, in the same order WITH grad (so the
    dropout masks are those of cached_backward's pass 1), concatenates, and returns the full-batch
    `contrastive_loss`. `loss.backward()` on it gives the gradient cached_backward must reproduce.
    """
    _check(images, text_ids, micro_batch_size)
    outs = [encode(chunk) for encode, chunk in _encoders(model, images, text_ids, micro_batch_size)]
    n_img = len(torch.split(images, micro_batch_size))
    img = torch.cat([o[0] for o in outs[:n_img]])      # (B, N, D)
    img_mask = torch.cat([o[1] for o in outs[:n_img]])  # (B, N)
    txt = torch.cat([o[0] for o in outs[n_img:]])       # (B, M, D)
    txt_mask = torch.cat([o[1] for o in outs[n_img:]])  # (B, M)
    return model.contrastive_loss(img, img_mask, txt, txt_mask)


def cached_backward(model, images: torch.Tensor, text_ids: torch.Tensor, micro_batch_size: int,
                    scaler=None, *, _replay_rng: bool = True) -> torch.Tensor:
    """Accumulate into every parameter's `.grad` the gradient of the full-batch loss; return the loss.

    model: a FILIP (anything with encode_image, encode_text and contrastive_loss).
    images (B, 3, H, W), text_ids (B, L): one batch of matched pairs; captions already padded to one
    common length (they are one tensor), so every micro-batch's text mask has the same width L.
    micro_batch_size: samples per encoder call; need not divide B.
    scaler: a `torch.amp.GradScaler` for fp16 training, or None. The loss is scaled before the first
    backward, so the cached embedding gradients, and through them all parameter gradients, carry the scale;
    call `scaler.step(optimizer); scaler.update()` afterwards as usual.
    Autocast: runs under whatever autocast context the caller has active (bf16 or fp16).

    Returns the unscaled loss, detached. The gradient equals that of
    `reference_microbatched_loss(model, images, text_ids, micro_batch_size).backward()` (and with no
    dropout, that of `model.loss(images, text_ids).backward()`), up to floating-point rounding.
    `_replay_rng=False` (tests only) skips the random-state replay, to show that it matters.
    """
    _check(images, text_ids, micro_batch_size)
    cuda_devices = _cuda_devices(model, images, text_ids)
    jobs = list(_encoders(model, images, text_ids, micro_batch_size))
    n_img = len(torch.split(images, micro_batch_size))

    # ---- pass 1: embeddings only; remember the random state each micro-batch started from
    states, embeddings, masks = [], [], []
    with torch.no_grad():
        for encode, chunk in jobs:
            states.append(RNGState(cuda_devices))
            tokens, mask = encode(chunk)  # (b, N or M, D), (b, N or M)
            embeddings.append(tokens)
            masks.append(mask)
    buffers = _snapshot_buffers(model)  # as pass 1 left them (e.g. BatchNorm stats updated once)

    # ---- the loss, once, on the whole batch; leaves = detached embeddings so we can read dL/dE
    img = torch.cat(embeddings[:n_img]).requires_grad_()  # (B, N, D)
    txt = torch.cat(embeddings[n_img:]).requires_grad_()  # (B, M, D)
    del embeddings
    loss = model.contrastive_loss(img, torch.cat(masks[:n_img]), txt, torch.cat(masks[n_img:]))
    # backward() (not autograd.grad) so the temperature's gradient accumulates into logit_scale.grad
    (scaler.scale(loss) if scaler is not None else loss).backward()
    grads = list(torch.split(img.grad, micro_batch_size)) + list(torch.split(txt.grad, micro_batch_size))
    del img, txt, masks

    # ---- pass 2: re-encode each micro-batch with grad, under its pass-1 random state, and push dL/dE back
    for (encode, chunk), state, grad in zip(jobs, states, grads):
        if _replay_rng:
            with replay_rng(state, cuda_devices):
                tokens, _ = encode(chunk)  # (b, N or M, D): bit-for-bit pass 1's, now with a graph
        else:
            tokens, _ = encode(chunk)
        if tokens.requires_grad:  # a frozen tower has nothing to backpropagate into
            torch.autograd.backward(tokens, grad)
    _restore_buffers(model, buffers)  # undo pass 2's second update of running statistics
    return loss.detach()
