"""Prompt ensembles: averaging similarities (FILIP) vs averaging embeddings (CLIP), templates, data."""
import math

import pytest
import torch
import torch.nn.functional as F

from minifilip import FILIP, FILIPConfig, WordTokenizer
from minifilip.cmli import late_interaction_reference
from minifilip.data.grounded import COLORS, SHAPES, vocabulary
from minifilip.model import pairwise_scores, pick_direction
from minifilip.zeroshot import BUILTIN_TEMPLATES, builtin_zeroshot_data, ensemble_scores, fill, unknown_words, zero_shot


def _random_tokens(n, length, dim=8):
    x = F.normalize(torch.randn(n, length, dim), dim=-1)
    mask = torch.rand(n, length) < 0.7
    mask[:, 0] = True  # at least one valid token each
    return x, mask


@pytest.mark.parametrize("direction", ["i2t", "t2i", "mean"])
def test_one_template_equals_plain_similarity(direction):
    img, img_mask = _random_tokens(5, 6)
    txt, txt_mask = _random_tokens(4, 7)  # 4 classes x 1 template
    got = ensemble_scores(img, img_mask, txt, txt_mask, n_templates=1, direction=direction)
    s_i2t, s_t2i = late_interaction_reference(img, img_mask, txt, txt_mask)
    assert torch.allclose(got, pick_direction(s_i2t, s_t2i, direction), atol=1e-5)


def test_similarity_ensemble_is_the_mean_of_late_interaction_scores():
    img, img_mask = _random_tokens(3, 5)
    txt, txt_mask = _random_tokens(2 * 3, 6)  # 2 classes x 3 templates, class-major
    got = ensemble_scores(img, img_mask, txt, txt_mask, n_templates=3, ensemble="similarity")
    s_i2t, _ = late_interaction_reference(img, img_mask, txt, txt_mask)
    assert torch.allclose(got, s_i2t.view(3, 2, 3).mean(dim=2), atol=1e-5)


def test_averaging_similarities_and_embeddings_rank_classes_differently():
    # one global token per side: similarity-averaging gives <v, mean w>, embedding-averaging <v, mean w / |mean w|>
    v = F.normalize(torch.tensor([[1.0, 1.2, 0.0]]), dim=-1)[:, None]  # (1 image, 1 token, 3)
    a = torch.tensor([1.0, 0.0, 0.0])
    b1, b2 = F.normalize(torch.tensor([0.0, 1.0, 1.0]), dim=0), F.normalize(torch.tensor([0.0, 1.0, -1.0]), dim=0)
    txt = torch.stack([a, a, b1, b2])[:, None]  # class A twice the same prompt; class B two spread prompts
    ones_i, ones_t = torch.ones(1, 1, dtype=torch.bool), torch.ones(4, 1, dtype=torch.bool)
    sim = ensemble_scores(v, ones_i, txt, ones_t, n_templates=2, ensemble="similarity")[0]
    emb = ensemble_scores(v, ones_i, txt, ones_t, n_templates=2, ensemble="embedding")[0]
    va, vb = 1 / math.hypot(1, 1.2), 1.2 / math.hypot(1, 1.2)  # cosines of v with e1 and e2
    assert torch.allclose(sim, torch.tensor([va, vb / math.sqrt(2)]), atol=1e-5)  # A wins: 0.64 > 0.54
    assert torch.allclose(emb, torch.tensor([va, vb]), atol=1e-5)  # B wins: 0.64 < 0.77
    assert sim.argmax() == 0 and emb.argmax() == 1


def test_embedding_ensemble_with_one_template_pools_tokens():
    img, img_mask = _random_tokens(2, 4)
    txt, txt_mask = _random_tokens(3, 5)
    pooled = F.normalize((txt * txt_mask[..., None]).sum(1), dim=-1)[:, None]  # (3, 1, D)
    want, _ = pairwise_scores(img, img_mask, pooled, torch.ones(3, 1, dtype=torch.bool))
    got = ensemble_scores(img, img_mask, txt, txt_mask, n_templates=1, ensemble="embedding")
    assert torch.allclose(got, want, atol=1e-5)


def test_fill_uses_an_before_vowels_and_builtin_templates_are_in_vocab():
    assert fill("a photo of a {}.", "orange") == "a photo of an orange."
    assert fill("an image of a {}.", "red") == "an image of a red."
    tok = WordTokenizer(vocabulary())
    prompts = [fill(t, c) for t in BUILTIN_TEMPLATES for c in SHAPES + list(COLORS)]
    assert unknown_words(tok, prompts) == []
    assert unknown_words(tok, ["a photo of a zebra."]) == ["zebra"]


def test_builtin_zeroshot_data_labels_single_objects():
    images, labels, names = builtin_zeroshot_data("color", n=8)
    assert images.shape == (8, 3, 64, 64) and labels.shape == (8,) and names == list(COLORS)
    _, shape_labels, shape_names = builtin_zeroshot_data("shape", n=8)
    assert shape_names == SHAPES and int(shape_labels.max()) < len(SHAPES)


def test_zero_shot_runs_on_a_model_and_warns_about_unknown_words(capsys):
    tok = WordTokenizer(vocabulary())
    model = FILIP(FILIPConfig.preset("tiny", vocab_size=len(tok), vision_layers=1, text_layers=1,
                                     vision_width=32, text_width=32, embed_dim=16))
    images, labels, names = builtin_zeroshot_data("shape", n=6)
    out = zero_shot(model, tok, images, labels, names, ["a {}.", "a {} in the picture."])
    assert 0.0 <= out["acc"] <= 1.0 and out["n"] == 6 and out["chance"] == 1 / 6
    assert "[UNK]" in capsys.readouterr().err and out["unknown_words"] == ["in", "picture", "the"]
