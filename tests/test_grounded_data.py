"""The built-in grounded dataset: deterministic, exact masks, words tied to objects, disjoint splits."""
import hashlib

import numpy as np
import pytest

from minifilip.data.builtin import BuiltinTrainStream, builtin_val_pairs
from minifilip.data.grounded import COLORS, SHAPES, SIZES, render_scene, shape_mask, vocabulary
from minifilip.tokenizer import WordTokenizer, split_words


def test_same_seed_same_scene_other_seed_other_scene():
    a, b = render_scene(3, "train", 17), render_scene(3, "train", 17)
    assert np.array_equal(a.image, b.image) and a.captions == b.captions and np.array_equal(a.masks, b.masks)
    c = render_scene(4, "train", 17)
    assert not np.array_equal(a.image, c.image)
    s1, s2 = BuiltinTrainStream(4, seed=1), BuiltinTrainStream(4, seed=1)
    (x1, c1, k1, n1), (x2, c2, k2, n2) = s1.batch(5), s2.batch(5)
    assert (x1 == x2).all() and c1 == c2 and k1 == k2 == [f"train/{i:06d}" for i in range(20, 24)]
    assert n1 == n2 == {}  # the shape of a real-data batch: (images, captions, keys, bad-sample counts)


def test_masks_are_exact_and_where_the_object_was_drawn():
    for i in range(40):
        sc = render_scene(0, "val", i)
        assert 1 <= len(sc.objects) <= 3 and sc.masks.shape == (len(sc.objects), 64, 64)
        assert not (sc.masks.sum(0) > 1).any()  # objects never overlap
        for obj, mask in zip(sc.objects, sc.masks):
            assert mask.sum() > 10
            ys, xs = np.nonzero(mask)
            cx, cy = obj["center"]
            assert abs(xs.mean() + 0.5 - cx) < obj["radius"] * 0.4 and abs(ys.mean() + 0.5 - cy) < obj["radius"] * 0.4
            # every mask pixel carries the object's colour (up to the +-15 jitter), and only those
            colour = np.array(COLORS[obj["color"]])
            assert np.abs(sc.image[mask].astype(int) - colour).max() <= 16
            ring = np.zeros_like(mask)
            ring[max(0, ys.min() - 1):ys.max() + 2, max(0, xs.min() - 1):xs.max() + 2] = True
            outside = ring & ~mask & ~sc.masks.any(0)
            assert (np.abs(sc.image[outside].astype(int) - colour).max(axis=1) > 16).all()


def test_captions_name_objects_at_their_token_positions():
    tok = WordTokenizer(vocabulary())
    seen_relations = set()
    for i in range(60):
        sc = render_scene(0, "train", i)
        for caption, words, groundings in zip(sc.captions, sc.words, sc.groundings):
            assert split_words(caption) == words
            tokens = tok.tokens(caption, 24)
            assert "[UNK]" not in tokens
            assert len(groundings) == 2 * len(sc.objects)
            for g in groundings:
                obj = sc.objects[g.object_index]
                assert tokens[g.token_index] == g.word == obj[g.kind]
            seen_relations |= {"left", "right", "above", "below"} & set(words)
            for w in ("left", "right"):  # relations agree with the geometry
                if w in words:
                    names = [g for g in groundings if g.kind == "shape"]
                    a, b = (sc.objects[g.object_index]["center"][0] for g in names)
                    assert (a < b) == (w == "left")
    assert seen_relations == {"left", "right", "above", "below"}


def test_variety_covers_shapes_colours_sizes():
    objs = [o for i in range(200) for o in render_scene(0, "train", i).objects]
    assert {o["shape"] for o in objs} == set(SHAPES) and {o["color"] for o in objs} == set(COLORS)
    assert {o["size"] for o in objs} == set(SIZES) and len(SHAPES) >= 6 and len(COLORS) >= 6


def test_train_and_val_are_disjoint():
    digest = lambda sc: hashlib.sha1(sc.image.tobytes()).hexdigest()
    train = {digest(render_scene(0, "train", i)) for i in range(300)}
    val = {digest(render_scene(0, "val", i)) for i in range(300)}
    assert len(train) == 300 and len(val) == 300 and not train & val
    with pytest.raises(ValueError):
        render_scene(0, "test", 0)


def test_val_pairs_and_shape_masks():
    images, captions, scenes = builtin_val_pairs(5, image_size=32)
    assert images.shape == (5, 3, 32, 32) and len(captions) == 5 and captions[0] == scenes[0].captions[0]
    yy, xx = np.mgrid[:33, :33] + 0.5
    for shape in SHAPES:
        m = shape_mask(shape, xx, yy, 16.5, 16.5, 10)
        assert m[16, 16] and not m[0, 0]  # filled at the centre, empty in the corner
