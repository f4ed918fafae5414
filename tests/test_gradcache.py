"""Gradient caching must give the full-batch gradient: exactly (fp32 rounding), dropout included."""
import pytest
import torch

from minifilip import FILIP, FILIPConfig
from minifilip.gradcache import cached_backward, reference_microbatched_loss

B = 10  # batch; micro-batches of 3 and 4 leave a partial last one


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = FILIPConfig.preset("tiny", image_size=16, patch_size=4, vision_width=32, vision_layers=2,
                             vision_heads=2, text_width=32, text_layers=2, text_heads=2, embed_dim=16,
                             vocab_size=40, context_length=10, **overrides)
    return FILIP(cfg).train()


def make_batch(model, n=B, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    images = torch.randn(n, 3, cfg.image_size, cfg.image_size, generator=g)  # (n, 3, H, W)
    ids = torch.zeros(n, cfg.context_length, dtype=torch.long)  # (n, L): BOS words EOS PAD...
    lengths = torch.randint(1, cfg.context_length - 1, (n,), generator=g)
    for i, k in enumerate(lengths.tolist()):
        ids[i, 0], ids[i, k + 1] = 1, 2
        ids[i, 1:k + 1] = torch.randint(4, cfg.vocab_size, (k,), generator=g)
    return images, ids


def grads_of(model):
    """{name: grad clone} and zero the grads, ready for the next run."""
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def max_rel_err(a, b):
    """Worst per-parameter relative error ||a - b|| / ||b||."""
    return max(((a[n] - b[n]).norm() / b[n].norm().clamp_min(1e-30)).item() for n in b)


@pytest.mark.parametrize("micro", [1, 3, 5, B, B + 7])  # partial last chunk, divides, == B, > B
@pytest.mark.parametrize("loss", ["filip", "clip"])
def test_matches_full_batch_backward(micro, loss):
    model = make_model(loss=loss)
    images, ids = make_batch(model)
    ref_loss = model.loss(images, ids)
    ref_loss.backward()
    ref = grads_of(model)
    got_loss = cached_backward(model, images, ids, micro)
    got = grads_of(model)
    assert not got_loss.requires_grad
    torch.testing.assert_close(got_loss, ref_loss.detach(), rtol=1e-6, atol=1e-6)
    assert set(got) == set(ref) and "logit_scale" in got and ref["logit_scale"].abs() > 0
    assert max_rel_err(got, ref) <= 1e-5


def test_accumulates_into_existing_grads():
    model = make_model()
    images, ids = make_batch(model)
    model.loss(images, ids).backward()
    once = grads_of(model)
    cached_backward(model, images, ids, 4)
    cached_backward(model, images, ids, 4)  # like calling .backward() twice
    twice = grads_of(model)
    assert max_rel_err(twice, {n: 2 * g for n, g in once.items()}) <= 1e-5


def test_dropout_masks_are_replayed():
    model = make_model(dropout=0.3)  # attention + residual dropout in both towers
    images, ids = make_batch(model)

    torch.manual_seed(123)
    reference_microbatched_loss(model, images, ids, 4).backward()
    rng_after_ref = torch.get_rng_state()
    ref = grads_of(model)

    torch.manual_seed(123)
    cached_backward(model, images, ids, 4)
    got = grads_of(model)
    assert max_rel_err(got, ref) <= 1e-5
    # the global generator ends where the reference forward left it (pass 2's draws are forked away)
    assert torch.equal(torch.get_rng_state(), rng_after_ref)

    # without the replay, pass 2 draws fresh masks and the gradient is simply wrong
    torch.manual_seed(123)
    cached_backward(model, images, ids, 4, _replay_rng=False)
    wrong = grads_of(model)
    assert max_rel_err(wrong, ref) > 1e-2


def test_loss_computed_once_on_the_whole_batch():
    """Counting calls catches the classic bug of one (local-negatives) loss per micro-batch."""
    model = make_model()
    images, ids = make_batch(model)
    calls = []
    original = model.contrastive_loss
    model.contrastive_loss = lambda *a: calls.append(a[0].shape[0]) or original(*a)
    cached_backward(model, images, ids, 3)
    assert calls == [B]


def test_buffers_updated_once_per_micro_batch():
    """BatchNorm-style running statistics must not be updated a second time by pass 2."""
    def add_bn(model):
        model.visual.bn = torch.nn.BatchNorm1d(model.config.embed_dim, affine=False)
        def hook(module, inputs, out):  # side effect only: returning None keeps the output
            module.bn(out.detach().flatten(0, 1).float())  # (b * T, D) updates running stats
        model.visual.register_forward_hook(hook)
        return model

    ref_model, model = add_bn(make_model()), add_bn(make_model())
    images, ids = make_batch(model)
    reference_microbatched_loss(ref_model, images, ids, 4).backward()
    cached_backward(model, images, ids, 4)
    assert model.visual.bn.num_batches_tracked.item() == 3  # ceil(10 / 4) image micro-batches
    for a, b in zip(model.buffers(), ref_model.buffers()):
        torch.testing.assert_close(a, b)


def test_token_selection():
    model = make_model(token_keep_ratio=0.25)
    images, ids = make_batch(model)
    model.loss(images, ids).backward()
    ref = grads_of(model)
    cached_backward(model, images, ids, 3)
    assert max_rel_err(grads_of(model), ref) <= 1e-5


@pytest.mark.parametrize("bad", [0, -2, 2.0, True, None, "4"])
def test_bad_micro_batch_size(bad):
    model = make_model()
    images, ids = make_batch(model)
    with pytest.raises(ValueError):
        cached_backward(model, images, ids, bad)


def test_mismatched_pairs():
    model = make_model()
    images, ids = make_batch(model)
    with pytest.raises(ValueError):
        cached_backward(model, images, ids[:-1], 4)


class FakeScaler:
    """The part of GradScaler's contract gradient caching relies on: scale() multiplies the loss."""

    def scale(self, loss):
        return loss * 64.0


@pytest.mark.parametrize("make_scaler", [FakeScaler, lambda: torch.amp.GradScaler("cpu", init_scale=64.0)])
def test_grad_scaler(make_scaler):
    model = make_model()
    images, ids = make_batch(model)
    ref_loss = model.loss(images, ids)
    ref_loss.backward()
    ref = grads_of(model)
    loss = cached_backward(model, images, ids, 3, scaler=make_scaler())
    torch.testing.assert_close(loss, ref_loss.detach())  # returned unscaled
    # every gradient, the temperature's included, carries the scale exactly once
    assert max_rel_err(grads_of(model), {n: 64.0 * g for n, g in ref.items()}) <= 1e-5


def test_grad_scaler_step_unscales():
    """Full fp16-style loop on CPU: scaler.step must see the same update as an unscaled plain step."""
    results = []
    for cached in (False, True):
        model = make_model()
        images, ids = make_batch(model)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
        if cached:
            cached_backward(model, images, ids, 4, scaler=scaler)
        else:
            model.loss(images, ids).backward()  # reference: no scaler at all
            opt.step()
            results.append([p.detach().clone() for p in model.parameters()])
            continue
        scaler.step(opt)
        scaler.update()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_bf16_autocast():
    model = make_model()
    images, ids = make_batch(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss = model.loss(images, ids)
    ref_loss.backward()
    ref = grads_of(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = cached_backward(model, images, ids, 4)
    got = grads_of(model)
    torch.testing.assert_close(loss, ref_loss.detach(), rtol=2e-2, atol=2e-2)
    assert all(g.dtype == torch.float32 for g in got.values())
    assert max_rel_err(got, ref) <= 5e-2  # bf16 rounding, not a wrong gradient (that would be O(1))
