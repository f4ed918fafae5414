"""The reference late interaction against a plain Python loop, and its masking rules."""
import pytest
import torch
import torch.nn.functional as F

from minifilip.cmli import late_interaction, late_interaction_reference


def loop_cmli(img, txt, text_mask, image_mask):
    """The definitions, one pair and one token at a time."""
    I, T = img.shape[0], txt.shape[0]
    s_i2t, s_t2i = torch.zeros(I, T, dtype=torch.float64), torch.zeros(I, T, dtype=torch.float64)
    for i in range(I):
        patches = [img[i, k].double() for k in range(img.shape[1]) if image_mask[i, k]]
        for j in range(T):
            tokens = [txt[j, l].double() for l in range(txt.shape[1]) if text_mask[j, l]]
            s_i2t[i, j] = sum(max(float(p @ w) for w in tokens) for p in patches) / len(patches)
            s_t2i[i, j] = sum(max(float(p @ w) for p in patches) for w in tokens) / len(tokens)
    return s_i2t, s_t2i


def random_inputs(I=3, T=4, N=5, M=6, D=8):
    img = F.normalize(torch.randn(I, N, D), dim=-1)
    txt = F.normalize(torch.randn(T, M, D), dim=-1)
    text_mask = torch.rand(T, M) < 0.6
    text_mask[torch.arange(T), torch.randint(M, (T,))] = True  # at least one valid token each
    image_mask = torch.rand(I, N) < 0.7
    image_mask[torch.arange(I), torch.randint(N, (I,))] = True
    return img, txt, text_mask, image_mask


def test_reference_equals_python_loop():
    img, txt, text_mask, image_mask = random_inputs()
    s_i2t, s_t2i = late_interaction_reference(img, image_mask, txt, text_mask)
    want_i2t, want_t2i = loop_cmli(img, txt, text_mask, image_mask)
    assert torch.allclose(s_i2t.double(), want_i2t, atol=1e-6)
    assert torch.allclose(s_t2i.double(), want_t2i, atol=1e-6)
    assert not torch.allclose(s_i2t, s_t2i)  # the two directions are not the same score


def test_padding_never_changes_a_score():
    img, txt, text_mask, image_mask = random_inputs()
    before = late_interaction_reference(img, image_mask, txt, text_mask)
    # append padded tokens / patches carrying huge similarity: masked, they must not count
    txt_pad = torch.cat([txt, img[:1, :3].expand(txt.shape[0], 3, -1) * 1.0], dim=1)
    tm_pad = torch.cat([text_mask, torch.zeros(txt.shape[0], 3, dtype=torch.bool)], dim=1)
    img_pad = torch.cat([img, txt[:1, :2].expand(img.shape[0], 2, -1)], dim=1)
    im_pad = torch.cat([image_mask, torch.zeros(img.shape[0], 2, dtype=torch.bool)], dim=1)
    after = late_interaction_reference(img_pad, im_pad, txt_pad, tm_pad)
    for a, b in zip(before, after):
        assert torch.allclose(a, b, atol=1e-6)
    # and values under masked positions are irrelevant too
    txt_noise = txt.clone()
    txt_noise[~text_mask] = F.normalize(torch.randn(int((~text_mask).sum()), txt.shape[-1]), dim=-1)
    for a, b in zip(before, late_interaction_reference(img, image_mask, txt_noise, text_mask)):
        assert torch.allclose(a, b, atol=1e-6)


def test_cls_never_influences_scores():
    from minifilip import FILIP, FILIPConfig
    cfg = FILIPConfig.preset("tiny", vision_layers=1, text_layers=1, vision_width=32, text_width=32,
                             vision_heads=2, text_heads=2, embed_dim=16, vocab_size=20)
    model = FILIP(cfg).eval()
    images = torch.randn(2, 3, 64, 64)
    ids = torch.tensor([[1, 5, 6, 2, 0], [1, 7, 2, 0, 0]])
    img, mask = model.encode_image(images)
    assert img.shape == (2, cfg.num_patches, cfg.embed_dim)  # CLS dropped
    txt, tmask = model.encode_text(ids)
    before = model.scores(img, mask, txt, tmask)
    # overwrite the CLS output with the texts' own tokens: if CLS took part, scores would jump
    forward = model.visual.forward
    def cls_hijacked(x):
        out = forward(x).clone()
        out[:, 0] = model.text(ids)[:, 1] * 100
        return out
    model.visual.forward = cls_hijacked
    after = model.scores(*model.encode_image(images), txt, tmask)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    # ... while the CLIP view (granularity="global") does read exactly that output
    glob, _ = model.encode_image(images, granularity="global")
    assert torch.allclose(glob[:, 0], F.normalize(model.text(ids)[:, 1], dim=-1), atol=1e-5)


def test_text_without_valid_token_is_a_clear_error():
    img, txt, text_mask, _ = random_inputs()
    text_mask[1] = False
    with pytest.raises(ValueError, match="no valid token"):
        late_interaction(img, None, txt, text_mask)


def test_bad_shapes_and_impl_raise():
    img, txt, text_mask, _ = random_inputs()
    with pytest.raises(ValueError):
        late_interaction(img[0], None, txt, text_mask)
    with pytest.raises(ValueError):
        late_interaction(img, None, txt[..., :4], text_mask)
    with pytest.raises(ValueError):
        late_interaction(img, None, txt, text_mask[:, :2])
    with pytest.raises(ValueError, match="unknown"):
        late_interaction(img, None, txt, text_mask, impl="nope")


def test_gradient_flows_only_through_argmax():
    img, txt, text_mask, image_mask = random_inputs(I=1, T=1)
    img.requires_grad_(True)
    s_i2t, _ = late_interaction_reference(img, image_mask, txt, text_mask)
    s_i2t.sum().backward()
    # each valid patch's gradient is exactly (1/N) times its best valid token
    scores = img[0].detach() @ txt[0].t()
    best = scores.masked_fill(~text_mask[0], -2).argmax(dim=1)
    want = txt[0][best] / image_mask[0].sum() * image_mask[0, :, None]
    assert torch.allclose(img.grad[0], want, atol=1e-6)
