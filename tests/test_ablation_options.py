"""Opt-in switches for the alignment ablation (issue 12): --set, caption styles, a bidirectional text tower.

Each is default-off: the default config, captions and vocabulary are exactly what they were.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, rel_err
from minifilip.config import FILIPConfig
from minifilip.data.builtin import BuiltinTrainStream
from minifilip.data.grounded import BACKGROUNDS, CAPTION_STYLES, render_scene, split_style, vocabulary
from minifilip.model import FILIP
from minifilip.tokenizer import PAD_ID, WordTokenizer, split_words


# ------------------------------------------------------------------ --set KEY=VALUE
def test_parse_overrides_reads_each_field_by_its_type():
    out = FILIPConfig.parse_overrides(["vision_layers=2", "text_special_tokens=true", "init_temperature=0.05",
                                       "cmli_impl=reference", "text_causal=0"])
    assert out == {"vision_layers": 2, "text_special_tokens": True, "init_temperature": 0.05,
                   "cmli_impl": "reference", "text_causal": False}
    assert isinstance(out["vision_layers"], int) and isinstance(out["text_causal"], bool)
    cfg = FILIPConfig.preset("tiny", **out)
    assert cfg.vision_layers == 2 and cfg.text_special_tokens and not cfg.text_causal
    assert FILIPConfig.parse_overrides([]) == {} and FILIPConfig.parse_overrides(None) == {}


@pytest.mark.parametrize("items, message", [
    (["nope=1"], "unknown FILIPConfig field 'nope'"),
    (["vision_layers"], "KEY=VALUE"),
    (["vision_layers=two"], "not a valid int"),
    (["text_causal=maybe"], "not a valid bool"),
    (["init_temperature=warm"], "not a valid float"),
    (["loss=clip"], "use --loss"),
])
def test_parse_overrides_rejects_bad_items_in_one_line(items, message):
    with pytest.raises(ValueError, match=message) as e:
        FILIPConfig.parse_overrides(items, reserved={"loss": "--loss"})
    assert "\n" not in str(e.value)


def _train(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "train_small.py"), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)


def test_train_cli_applies_set_and_caption_style(tmp_path):
    out = tmp_path / "run"
    proc = _train("--steps", "2", "--batch-size", "4", "--val-size", "8", "--warmup", "1", "--out", str(out),
                  "--set", "vision_layers=1", "--set", "text_causal=false", "--caption-style", "shape-first")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["vision_layers"] == 1 and ckpt["config"]["text_causal"] is False
    assert "in" in ckpt["tokenizer"]["itos"] and ckpt["args"]["caption_style"] == "shape-first"


@pytest.mark.parametrize("args, message", [
    (["--set", "bogus=1"], "unknown FILIPConfig field 'bogus'"),
    (["--set", "vocab_size=50"], "--set vocab_size: use"),
    (["--set", "vision_layers=0"], "vision_layers must be a positive integer"),
    (["--caption-style", "shape-first", "--train-data", "x.tsv"], "built-in data only"),
])
def test_train_cli_bad_overrides_fail_in_one_line(tmp_path, capsys, args, message):
    from minifilip.train import main
    assert main(["--steps", "1", "--out", str(tmp_path / "run"), *args]) == 2  # in-process: no model is built
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not (tmp_path / "run").exists()


# ------------------------------------------------------------------ caption styles
def test_caption_styles_tie_words_to_objects_and_order_them():
    orders = {style: set() for style in CAPTION_STYLES}
    for style in CAPTION_STYLES:
        tok = WordTokenizer(vocabulary(style))
        for i in range(40):
            sc = render_scene(0, "train", i, caption_style=style)
            for caption, words, groundings in zip(sc.captions, sc.words, sc.groundings):
                assert split_words(caption) == words and "[UNK]" not in tok.tokens(caption, 24)
                kinds = {"shape-only": ["shape"]}.get(split_style(style)[0], ["color", "shape"])
                assert len(groundings) == len(kinds) * len(sc.objects)
                for g in groundings:
                    assert g.kind in kinds and tok.tokens(caption, 24)[g.token_index] == g.word
                    assert g.word == sc.objects[g.object_index][g.kind]
                by_object = {}
                for g in groundings:
                    by_object.setdefault(g.object_index, {})[g.kind] = g.token_index
                for pos in by_object.values():
                    if len(pos) == 2:
                        orders[style].add("shape-first" if pos["shape"] < pos["color"] else "color-first")
                if split_style(style)[0] == "shape-only":
                    assert not set(words) & {o["color"] for o in sc.objects}
    expected = {"color-first": {"color-first"}, "shape-first": {"shape-first"}, "shape-only": set(),
                "mixed": {"color-first", "shape-first"}}
    assert orders == {**expected, **{f"{k}+background": v for k, v in expected.items()}}


def test_background_words_name_the_drawn_texture_and_change_nothing_else():
    seen = set()
    for i in range(40):
        plain, named = render_scene(0, "val", i), render_scene(0, "val", i, caption_style="color-first+background")
        assert np.array_equal(plain.image, named.image) and plain.objects == named.objects
        assert [[vars(g) for g in c] for c in plain.groundings] == [[vars(g) for g in c] for c in named.groundings]
        texture = named.words[0][-3]
        for before, after, words in zip(plain.captions, named.captions, named.words):
            assert after == before[:-1] + f" on a {texture} background." and words[-3] == texture
        background = named.image[~named.masks.any(0)].astype(float)  # (pixels, 3) outside every object
        spread = background.std(0).max()
        assert (spread < 1.0) == (texture == "plain"), (i, texture, spread)  # only "plain" is flat
        seen.add(texture)
    assert seen == set(BACKGROUNDS)
    with pytest.raises(ValueError, match="caption style"):
        render_scene(0, "val", 0, caption_style="color-first+sky")


def test_caption_style_changes_captions_only_and_default_is_unchanged():
    for i in range(10):
        default = render_scene(0, "val", i)
        same = render_scene(0, "val", i, caption_style="color-first")
        other = render_scene(0, "val", i, caption_style="shape-first")
        assert default.captions == same.captions and np.array_equal(default.image, other.image)
        assert default.objects == other.objects and default.captions != other.captions
    assert "in" not in vocabulary() and vocabulary() == vocabulary("color-first")
    (x1, c1, *_), (x2, c2, *_) = BuiltinTrainStream(4).batch(3), BuiltinTrainStream(4, caption_style="mixed").batch(3)
    assert torch.equal(x1, x2) and c1 != c2
    with pytest.raises(ValueError, match="caption style"):
        render_scene(0, "val", 0, caption_style="colour-first")


# ------------------------------------------------------------------ bidirectional text tower (diagnosis)
def _text_model(**overrides):
    cfg = FILIPConfig(image_size=32, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2, vocab_size=50,
                      context_length=12, text_width=32, text_layers=2, text_heads=2, embed_dim=16, **overrides)
    return FILIP(cfg).eval()


def test_bidirectional_text_sees_later_words_and_ignores_padding():
    model = _text_model(text_causal=False)
    ids = torch.tensor([[1, 7, 9, 11, 13, 2, 0, 0, 0]])
    changed = ids.clone()
    changed[0, 4] = 20  # a later word changes
    with torch.no_grad():
        a, b = model.text(ids), model.text(changed)
    assert not torch.allclose(a[0, :4], b[0, :4], atol=1e-5)  # earlier words see it: not causal
    # padding is masked out: the same caption padded to another length gives the same token vectors
    short, padded = ids[:, :6], torch.cat([ids[:, :6], torch.full((1, 6), PAD_ID)], dim=1)
    with torch.no_grad():
        assert rel_err(model.text(padded)[0, :6], model.text(short)[0]) < 1e-5


def test_bidirectional_batch_matches_one_caption_at_a_time():
    """The key mask is an exact stand-in for running each caption unpadded on its own."""
    model = _text_model(text_causal=False)
    lengths = [3, 7, 10, 5]
    ids = torch.zeros(len(lengths), 12, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.cat([torch.tensor([1]), torch.randint(4, 50, (n - 2,)), torch.tensor([2])])
    with torch.no_grad():
        batch = model.text(ids)  # (B, L, D)
        for b, n in enumerate(lengths):
            assert rel_err(batch[b, :n], model.text(ids[b:b + 1, :n])[0]) < 1e-5


def test_causal_default_ignores_the_flag_path():
    """text_causal=True (the default) keeps FILIP's causal tower: same weights, same outputs as before."""
    torch.manual_seed(0)
    causal = _text_model()
    torch.manual_seed(0)
    bidir = _text_model(text_causal=False)
    ids = torch.tensor([[1, 7, 9, 11, 2, 0]])
    assert causal.config.text_causal and not bidir.config.text_causal
    for a, b in zip(causal.parameters(), bidir.parameters()):
        assert torch.equal(a, b)  # the flag adds no parameter and changes no initialisation
    with torch.no_grad():  # [BOS] sees the words after it only in the bidirectional tower
        assert rel_err(causal.text(ids)[0, 0], bidir.text(ids)[0, 0]) > 1e-3


# ------------------------------------------------------------------ the ablation driver
def test_ablation_driver_lists_variants_and_rejects_unknown_ones(tmp_path):
    script = os.path.join(ROOT, "benchmarks", "ablate_alignment.py")
    listed = subprocess.run([sys.executable, script, "--list"], capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0 and "--caption-style shape-first" in listed.stdout and "base" in listed.stdout
    bad = subprocess.run([sys.executable, script, "--variants", "base,nope", "--out", str(tmp_path / "a")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "unknown variant(s) ['nope']" in bad.stderr and not (tmp_path / "a").exists()


# ------------------------------------------------------------------ token selection on the patches only
def test_patch_only_selection_keeps_every_text_token_and_the_same_patches():
    from minifilip.cmli import select_tokens
    img = torch.nn.functional.normalize(torch.randn(3, 16, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(3, 6, 8), dim=-1)
    txt_mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    both = select_tokens(img, None, txt, txt_mask, 0.25)
    patches_only = select_tokens(img, None, txt, txt_mask, 0.25, text_ratio=1.0)
    assert torch.equal(patches_only[0], both[0]) and torch.equal(patches_only[1], both[1])  # same patches kept
    assert patches_only[2] is txt and patches_only[3] is txt_mask  # the texts untouched
    assert both[3].sum() < txt_mask.sum()
    with pytest.raises(ValueError, match="text_ratio"):
        select_tokens(img, None, txt, txt_mask, 0.25, text_ratio=0.0)


def test_token_keep_text_flag_reaches_the_loss():
    """FILIPConfig.token_keep_text=False: the loss equals late interaction on selected patches and all words."""
    from minifilip.cmli import late_interaction, select_tokens
    from minifilip.loss import info_nce
    model = _text_model(token_keep_ratio=0.25, token_keep_text=False)
    images, ids = torch.randn(4, 3, 32, 32), torch.tensor([[1, 5, 6, 7, 2, 0]] * 2 + [[1, 9, 8, 2, 0, 0]] * 2)
    with torch.no_grad():
        img, txt = model.encode_image(images), model.encode_text(ids)
        loss = model.contrastive_loss(*img, *txt)
        kept = select_tokens(*img, *txt, 0.25, text_ratio=1.0)
        want = info_nce(*late_interaction(*kept), model.inverse_temperature)
        both = info_nce(*late_interaction(*select_tokens(*img, *txt, 0.25)), model.inverse_temperature)
    assert rel_err(loss, want) < 1e-6 and rel_err(loss, both) > 1e-4
