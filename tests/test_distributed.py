"""minifilip/distributed.py with 2 real processes (gloo, CPU), spawned with torch.multiprocessing.

Every rank checks itself against a single-process reference it computes on the whole batch; a failed assert
in a rank fails the test with that rank's traceback.
"""
import argparse
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from minifilip import cmli, distributed
from minifilip.loss import info_nce
from test_gradcache import grads_of, make_model, max_rel_err
from test_gradcache import make_batch as random_batch

WORLD, B = 2, 8  # 2 ranks x 4 pairs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker, *args):
    mp.spawn(worker, args=(free_port(), *args), nprocs=WORLD, join=True)


def join(rank, port):
    """What torchrun does for a process: the environment, then distributed.init."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    args = argparse.Namespace(batch_size=B, micro_batch_size=0, out=f"from-rank-{rank}")
    assert distributed.init(args, torch.device("cpu")) == torch.device("cpu")
    assert args.out == "from-rank-0" and distributed.world_size() == WORLD and distributed.rank() == rank


# ---------------------------------------------------------------------- gradients of a whole training step
def _step_worker(rank, port):
    join(rank, port)
    mine = slice(rank * B // WORLD, (rank + 1) * B // WORLD)
    for loss_kind in ("filip", "clip", "clip+filip"):
        model = make_model(loss=loss_kind)
        images, ids = random_batch(model, B)
        ref_loss = model.loss(images, ids)  # one process, the whole global batch
        ref_loss.backward()
        ref = grads_of(model)
        towers = distributed.wrap_towers(model, torch.device("cpu"))
        for micro in (0, 3, 1):  # plain; gradient caching with a partial last micro-batch; one pair at a time
            loss = distributed.train_step(towers, model, images[mine], ids[mine], micro_batch_size=micro)
            got = grads_of(model)
            assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item()), (micro, loss, ref_loss)
            err = max_rel_err(got, ref)
            assert err <= 1e-5, f"{loss_kind}, rank {rank}, micro-batch {micro}: gradients off by {err:.2e}"
    distributed.shutdown()


def test_gathered_step_gives_the_full_batch_gradient():
    """Each rank's gradients after train_step (DDP + gathered local loss, with and without gradient caching,
    FILIP, CLIP and CLIP+FILIP losses) equal the single-process gradients of the global batch, temperature included."""
    spawn(_step_worker)


# ---------------------------------------------------------------------- selection before the gather, fp16
def local_selection_reference(img, img_mask, txt, txt_mask, ratio):
    """One process: each rank's slice selects against itself, is padded to the widest, all slices concatenated."""
    b = img.shape[0] // WORLD
    parts = [cmli.select_tokens(img[r * b:(r + 1) * b], img_mask[r * b:(r + 1) * b], txt[r * b:(r + 1) * b],
                                txt_mask[r * b:(r + 1) * b], ratio) for r in range(WORLD)]
    out = []
    for tokens_at, mask_at in ((0, 1), (2, 3)):
        width = max(p[tokens_at].shape[1] for p in parts)
        padded = [distributed.pad_width(p[tokens_at], p[mask_at], width) for p in parts]
        out += [torch.cat([t for t, _ in padded]), torch.cat([m for _, m in padded])]
    return out  # image tokens (B, N', D), image mask, text tokens (B, M', D), text mask


def _features_worker(rank, port):
    join(rank, port)
    model = make_model(token_keep_ratio=0.4)
    images, ids = random_batch(model, B, seed=2)
    with torch.no_grad():
        img, img_mask = model.encode_image(images)  # (B, N, D): the global batch, computed once
        txt, txt_mask = model.encode_text(ids)      # (B, M, D)
    img.requires_grad_(), txt.requires_grad_()
    mine = slice(rank * B // WORLD, (rank + 1) * B // WORLD)

    # without selection: all-padding trailing slots stay home, the rest arrives unchanged in every rank's rows
    full = distributed.select_and_gather(img[mine], img_mask[mine], txt[mine], txt_mask[mine])
    width = int(txt_mask.any(dim=0).nonzero().max()) + 1  # the longest caption of the global batch
    assert full.text_tokens.shape[1] == width < txt.shape[1] and torch.equal(full.text_mask, txt_mask[:, :width])
    assert torch.equal(full.text_tokens[full.text_mask], txt[:, :width][full.text_mask])
    assert torch.equal(full.image_tokens, img) and torch.equal(full.image_mask, img_mask)

    # what crosses the wire: this rank's tokens selected against its own batch, every rank's the same way
    g = distributed.select_and_gather(img[mine], img_mask[mine], txt[mine], txt_mask[mine], keep_ratio=0.4)
    ref = local_selection_reference(img.detach(), img_mask, txt.detach(), txt_mask, 0.4)
    for got, want in zip((g.image_tokens, g.image_mask, g.text_tokens, g.text_mask), ref):
        assert torch.equal(got.detach(), want), "gathered tokens differ from the local-selection reference"
    assert g.offset == rank * B // WORLD and g.text_mask.sum() < txt_mask.sum()  # selection did drop tokens

    # the ranks' mean loss and each rank's feature gradient match the reference loss on those tokens
    loss = distributed.local_contrastive_loss(model, img[mine], img_mask[mine], txt[mine], txt_mask[mine])
    loss.backward()
    got_img, got_txt = img.grad[mine] / WORLD, txt.grad[mine] / WORLD  # rank grad = world x d(global loss)
    img.grad, txt.grad = None, None
    ref_loss = info_nce(*cmli.late_interaction(*local_selection_reference(img, img_mask, txt, txt_mask, 0.4)),
                        model.inverse_temperature)
    ref_loss.backward()
    assert abs(distributed.mean_over_ranks(loss).item() - ref_loss.item()) <= 1e-5 * ref_loss.item()
    for got, want in ((got_img, img.grad[mine]), (got_txt, txt.grad[mine])):
        assert (got - want).norm() <= 1e-5 * want.norm(), "feature gradients differ from the reference"

    # fp16 on the wire: the loss stays within FP16_TOLERANCE (relative) of the fp32 exchange
    with torch.no_grad():
        args = (img[mine], img_mask[mine], txt[mine], txt_mask[mine])
        fp32 = distributed.mean_over_ranks(distributed.local_contrastive_loss(model, *args)).item()
        fp16 = distributed.mean_over_ranks(distributed.local_contrastive_loss(model, *args, dtype=torch.float16))
        half = distributed.select_and_gather(*args, keep_ratio=0.4, dtype=torch.float16)
    assert half.image_tokens.dtype == half.text_tokens.dtype == torch.float16
    assert 0 < abs(fp16.item() - fp32) <= FP16_TOLERANCE * fp32, (fp16.item(), fp32)

    # real data: every rank's bad-sample counts reach every rank; a rank without a shard is refused up front
    assert distributed.sum_counts({"decode_error": rank + 1, f"only_{rank}": 1}) == {
        "decode_error": 3, "only_0": 1, "only_1": 1}
    with pytest.raises(ValueError, match="1 shard"):
        distributed.check_shares(1, "one.tar")
    distributed.shutdown()


FP16_TOLERANCE = 2e-4  # relative; measured ~1.5e-5 at these dims (fp16 keeps ~5e-4 of each coordinate)


def test_selection_before_gather_and_half_precision():
    """Selected tokens per rank == local-selection reference; loss and gradients through the gather match a
    one-process reference on those tokens; fp16 exchange keeps the loss within FP16_TOLERANCE of fp32."""
    spawn(_features_worker)


def test_builtin_data_gives_each_rank_its_slice_of_the_global_batch():
    from minifilip.data import BuiltinTrainStream
    whole = BuiltinTrainStream(6, image_size=16, seed=3).batch(5)
    parts = [BuiltinTrainStream(6, image_size=16, seed=3, rank=r, world_size=3).batch(5) for r in range(3)]
    assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
    assert sum((p[1] for p in parts), []) == whole[1]
    with pytest.raises(ValueError, match="split evenly"):
        BuiltinTrainStream(7, world_size=2)
