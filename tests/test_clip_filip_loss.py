"""loss="clip+filip": the sum of the CLIP and FILIP losses (SPARC's mix), one shared temperature."""
import pytest
import torch

from minifilip import FILIP, FILIPConfig
from minifilip.gradcache import cached_backward
from test_gradcache import grads_of, make_batch, make_model, max_rel_err


def twin(pure: str, seed=0, **mix):
    """A pure-loss model and a clip+filip model with the same weights (same architecture and parameters)."""
    a = make_model(seed, loss=pure)
    b = make_model(seed, loss="clip+filip", **mix)
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("pure, zero", [("clip", "filip_weight"), ("filip", "clip_weight")])
def test_weight_zero_is_the_pure_loss(pure, zero):
    a, b = twin(pure, **{zero: 0.0})
    images, ids = make_batch(a)
    la, lb = a.loss(images, ids), b.loss(images, ids)
    assert la.item() == lb.item()  # bit for bit
    la.backward(), lb.backward()
    ga, gb = grads_of(a), grads_of(b)
    assert max_rel_err(gb, ga) <= 1e-5  # same gradient up to fp32 rounding (the other term adds nothing)


def test_sum_of_the_two_losses_with_weights():
    clip, mix = twin("clip", clip_weight=0.5, filip_weight=2.0)
    filip, _ = twin("filip")
    images, ids = make_batch(clip)
    want = 0.5 * clip.loss(images, ids) + 2.0 * filip.loss(images, ids)
    torch.testing.assert_close(mix.loss(images, ids), want, rtol=1e-6, atol=0)


def test_encoders_put_a_masked_global_vector_first():
    clip, mix = twin("clip")
    filip, _ = twin("filip")
    images, ids = make_batch(clip)
    img, img_mask = mix.encode_image(images)
    txt, txt_mask = mix.encode_text(ids)
    assert not img_mask[:, 0].any() and not txt_mask[:, 0].any()
    torch.testing.assert_close(img[:, :1], clip.encode_image(images)[0])
    torch.testing.assert_close(txt[:, :1], clip.encode_text(ids)[0])
    torch.testing.assert_close(img[:, 1:], filip.encode_image(images)[0])
    assert torch.equal(txt_mask[:, 1:], filip.encode_text(ids)[1])
    # every late-interaction consumer ignores the masked global vector: scores are FILIP's own
    for got, want in zip(mix.pairwise_scores(img, img_mask, txt, txt_mask),
                         filip.pairwise_scores(*filip.encode_image(images), *filip.encode_text(ids))):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("keep", [1.0, 0.5])  # with and without token selection on the FILIP term
@pytest.mark.parametrize("micro", [3, 4])
def test_gradient_caching_matches_full_batch(micro, keep):
    model = make_model(loss="clip+filip", filip_weight=0.7, token_keep_ratio=keep)
    images, ids = make_batch(model)
    ref_loss = model.loss(images, ids)
    ref_loss.backward()
    ref = grads_of(model)
    got_loss = cached_backward(model, images, ids, micro)
    got = grads_of(model)
    torch.testing.assert_close(got_loss, ref_loss.detach(), rtol=1e-6, atol=1e-6)
    assert ref["logit_scale"].abs() > 0 and max_rel_err(got, ref) <= 1e-5


def test_token_selection_changes_only_the_filip_term():
    clip, mix = twin("clip", token_keep_ratio=0.5)
    filip = make_model(loss="filip", token_keep_ratio=0.5)
    filip.load_state_dict(clip.state_dict())
    images, ids = make_batch(clip)
    torch.testing.assert_close(mix.loss(images, ids), clip.loss(images, ids) + filip.loss(images, ids),
                               rtol=1e-6, atol=0)


def test_trains_without_nan():
    torch.manual_seed(0)
    model = make_model(loss="clip+filip", token_keep_ratio=0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    images, ids = make_batch(model, n=8)
    first = model.loss(images, ids).item()
    for _ in range(30):
        opt.zero_grad()
        loss = model.loss(images, ids)
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
    assert model.loss(images, ids).item() < 0.5 * first


@pytest.mark.parametrize("overrides, field", [(dict(loss="clip+filip", clip_weight=0.0, filip_weight=0.0), "both"),
                                              (dict(filip_weight=-1.0), "filip_weight"),
                                              (dict(loss="sum"), "loss")])
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        FILIPConfig.preset("tiny", **overrides)


def test_wrong_granularity_is_a_clear_error():
    model = make_model(loss="clip+filip")
    images, ids = make_batch(model)
    with pytest.raises(ValueError, match="granularity='both'"):
        model.contrastive_loss(*model.encode_image(images, "tokens"), *model.encode_text(ids, "tokens"))


def test_train_cli_clip_filip_and_weight_flag(tmp_path):
    from test_train_cli import FAST, run
    out = tmp_path / "mix"
    run(*FAST, "--steps", "2", "--loss", "clip+filip", "--filip-weight", "0.5", "--micro-batch-size", "3",
        "--out", str(out))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["loss"] == "clip+filip" and ckpt["config"]["filip_weight"] == 0.5
    bad = run(*FAST, "--loss", "filip", "--filip-weight", "0.5", "--out", str(tmp_path / "bad"), check=False)
    assert bad.returncode == 2 and "--filip-weight only applies" in bad.stderr and "Traceback" not in bad.stderr
