"""Encoders, config validation and the loss."""
import pytest
import torch

from minifilip import FILIP, FILIPConfig
from minifilip.tokenizer import BOS_ID, EOS_ID


def small_config(**kw):
    base = dict(vision_layers=2, text_layers=2, vision_width=64, text_width=64, vision_heads=2, text_heads=2,
                embed_dim=32, vocab_size=50, image_size=32, patch_size=8, context_length=12)
    return FILIPConfig.preset("tiny", **{**base, **kw})


def random_ids(B, L, vocab=50, lengths=None):
    ids = torch.zeros(B, L, dtype=torch.long)
    for b in range(B):
        n = int(lengths[b]) if lengths is not None else int(torch.randint(1, L - 1, ()))
        ids[b, 0], ids[b, 1:n + 1], ids[b, n + 1] = BOS_ID, torch.randint(4, vocab, (n,)), EOS_ID
    return ids


def test_presets_and_overrides():
    base = FILIPConfig.preset("base")
    assert (base.patch_size, base.text_layers, base.text_width, base.text_heads, base.context_length,
            base.embed_dim) == (32, 12, 512, 8, 77, 256)
    assert FILIPConfig.preset("small").num_patches == 196
    assert FILIPConfig.preset("tiny", loss="clip").loss == "clip"
    with pytest.raises(ValueError, match="unknown preset"):
        FILIPConfig.preset("huge")


@pytest.mark.parametrize("overrides, field", [
    (dict(image_size=60), "image_size"), (dict(vision_width=130), "vision_width"),
    (dict(text_heads=3), "text_width"), (dict(loss="siglip"), "loss"), (dict(embed_dim=0), "embed_dim"),
    (dict(token_keep_ratio=0.0), "token_keep_ratio"), (dict(dropout=1.5), "dropout"),
    (dict(init_temperature=0.001), "init_temperature"), (dict(nonsense=1), "nonsense"),
])
def test_invalid_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        FILIPConfig.preset("tiny", **overrides)


def test_encoder_shapes_masks_and_unit_norm():
    cfg = small_config()
    model = FILIP(cfg)
    img, img_mask = model.encode_image(torch.randn(3, 3, 32, 32))
    assert img.shape == (3, 16, 32) and img_mask.shape == (3, 16) and img_mask.all()
    ids = random_ids(3, 12, lengths=[1, 5, 10])
    txt, txt_mask = model.encode_text(ids)
    assert txt.shape == (3, 12, 32)
    assert txt_mask.sum(1).tolist() == [1, 5, 10]  # words only: no [BOS], [EOS] or padding
    assert torch.allclose(img.norm(dim=-1), torch.ones(3, 16), atol=1e-5)
    assert torch.allclose(txt.norm(dim=-1), torch.ones(3, 12), atol=1e-5)
    with_special = FILIP(small_config(text_special_tokens=True))
    assert with_special.encode_text(ids)[1].sum(1).tolist() == [3, 7, 12]
    g, gm = model.encode_text(ids, granularity="global")
    assert g.shape == (3, 1, 32) and gm.all()


def test_causal_mask_is_causal():
    model = FILIP(small_config()).eval()
    ids = random_ids(1, 12, lengths=[8])
    out = model.text(ids)
    changed = ids.clone()
    changed[0, 6] = (changed[0, 6] - 4 + 1) % 46 + 4  # another word at position 6
    out2 = model.text(changed)
    assert torch.allclose(out[0, :6], out2[0, :6], atol=1e-6)  # earlier positions untouched
    assert not torch.allclose(out[0, 6:], out2[0, 6:], atol=1e-4)  # later ones see the change


def test_image_tower_is_bidirectional():
    model = FILIP(small_config()).eval()
    x = torch.randn(1, 3, 32, 32)
    y = x.clone()
    y[..., 24:, 24:] += 1.0  # only the last patch changes
    a, b = model.encode_image(x)[0], model.encode_image(y)[0]
    assert not torch.allclose(a[0, 0], b[0, 0], atol=1e-5)  # the first patch attends to the last


def test_wrong_inputs_raise_clear_errors():
    model = FILIP(small_config())
    with pytest.raises(ValueError, match="images must have shape"):
        model.encode_image(torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match="context_length"):
        model.encode_text(torch.ones(2, 40, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids must lie"):
        model.encode_text(torch.full((2, 5), 999))
    with pytest.raises(ValueError, match="no valid token"):  # an empty caption: [BOS] [EOS] only
        model.loss(torch.randn(2, 3, 32, 32), torch.tensor([[1, 2, 0], [1, 5, 2]]))


def test_temperature_init_and_clamp():
    model = FILIP(small_config())
    assert abs(float(1 / model.inverse_temperature.detach()) - 0.07) < 1e-6
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.clamp_logit_scale_()  # what training does after each optimizer step
    assert float(model.inverse_temperature.detach()) == pytest.approx(100.0)  # 1 / min_temperature
    model = FILIP(small_config(min_temperature=0.05))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.clamp_logit_scale_()
    assert float(model.inverse_temperature.detach()) == pytest.approx(20.0)


def test_config_of_older_checkpoints_loads():
    """Configs saved before the temperature vocabulary hold max_logit_scale (a clamp on 1/tau)."""
    old = {k: v for k, v in small_config().to_dict().items() if k != "min_temperature"}
    cfg = FILIPConfig.from_dict({**old, "max_logit_scale": 50.0})
    assert cfg.min_temperature == 1 / 50.0 and "max_logit_scale" not in cfg.to_dict()
    assert FILIPConfig.from_dict({**old, "max_logit_scale": 100.0}) == small_config()


def test_loss_is_stable_for_huge_logits():
    from minifilip.loss import info_nce
    s = torch.randn(6, 6)
    loss = info_nce(s * 1e4, s * 1e4, torch.tensor(100.0))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("loss", ["filip", "clip"])
def test_loss_decreases_when_overfitting_one_batch(loss):
    torch.manual_seed(0)
    model = FILIP(small_config(loss=loss))
    images, ids = torch.randn(8, 3, 32, 32), random_ids(8, 12)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    first = model.loss(images, ids)
    assert torch.isfinite(first)
    for _ in range(40):
        opt.zero_grad()
        model.loss(images, ids).backward()
        opt.step()
    last = model.loss(images, ids).item()
    assert last < 0.25 * first.item(), (first.item(), last)


def test_similarity_matches_scores():
    model = FILIP(small_config()).eval()
    images, ids = torch.randn(4, 3, 32, 32), random_ids(5, 12)
    s_i2t, s_t2i = model.pairwise_scores(*model.encode_image(images), *model.encode_text(ids), block=3)
    assert s_i2t.shape == (4, 5)
    assert torch.allclose(model.similarity(images, ids), 0.5 * (s_i2t + s_t2i))
    assert torch.allclose(model.similarity(images, ids, direction="t2i"), s_t2i)
