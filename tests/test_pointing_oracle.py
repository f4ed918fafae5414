"""pointing_game end to end on built-in scenes, with a stand-in model whose every answer is known in advance.

The stand-in embeds patch k of a scene, for each object o on it, as coverage(o, k) * (one-hot of o's colour word
+ one-hot of o's shape word), and a text token as the one-hot of its id. A colour word therefore points at the
patch its object covers most. Shape words are deliberately crossed in scenes with two or more objects (object o's
patches carry the shape word of the next object), so there they point at another object: known misses that are
still "on some object". The expected hits, chance levels and counts come from a plain loop over the scenes'
groundings and pixel masks.
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minifilip import WordTokenizer
from minifilip.data.builtin import images_to_tensor
from minifilip.data.grounded import render_scene, vocabulary
from minifilip.pointing import pointing_game

S, P = 64, 8  # image side and patch side: an 8 x 8 grid of patches


def coverage_by_loop(mask: np.ndarray) -> list[float]:
    """Fraction of each patch's pixels inside `mask`, patches row by row."""
    g = S // P
    return [float(mask[r * P:(r + 1) * P, c * P:(c + 1) * P].mean()) for r in range(g) for c in range(g)]


def carrier(scene, obj: int, kind: str) -> int:
    """The object whose patches carry object `obj`'s word of this kind (shapes crossed on multi-object scenes)."""
    n = len(scene.objects)
    return obj if kind == "color" or n == 1 else (obj - 1) % n


class KnownPointer(torch.nn.Module):
    """Stand-in for a trained model (see the module docstring); finds each image's scene by its pixels."""

    def __init__(self, scenes, tokenizer, context_length):
        super().__init__()
        self.config = SimpleNamespace(patch_size=P, context_length=context_length, image_size=S)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # pointing_game reads the device off the parameters
        self.vocab = len(tokenizer)
        self.images = images_to_tensor([sc.image for sc in scenes])  # (n, 3, S, S)
        patches = torch.zeros(len(scenes), (S // P) ** 2, self.vocab)  # (n, N, V)
        for s, sc in enumerate(scenes):
            n = len(sc.objects)
            for o, obj in enumerate(sc.objects):
                shape_owner = sc.objects[(o + 1) % n] if n > 1 else obj  # crossed shapes
                cov = torch.tensor(coverage_by_loop(sc.masks[o]))
                patches[s, :, tokenizer.stoi[obj["color"]]] += cov
                patches[s, :, tokenizer.stoi[shape_owner["shape"]]] += cov
        self.patches = patches

    def encode_image(self, images, granularity=None):
        assert granularity == "tokens"
        rows = [next(s for s in range(len(self.images)) if torch.equal(self.images[s], img)) for img in images]
        tokens = self.patches[rows]  # (B, N, V)
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool)

    def encode_text(self, ids, granularity=None):
        assert granularity == "tokens"
        return F.one_hot(ids, self.vocab).float(), ids != 0  # (B, L, V)


def expected_results(scenes, tokenizer, context_length) -> dict:
    """Hits, chance and 'on any object' per grounded word, by a loop over captions, groundings and pixel masks."""
    rows = []
    for sc in scenes:
        union = sc.masks.any(axis=0)
        for c, groundings in enumerate(sc.groundings):
            for g in groundings:
                if g.token_index > context_length - 2:  # [EOS] takes the last position; later words are cut
                    continue
                assert tokenizer.encode(sc.captions[c], context_length)[0, g.token_index] == tokenizer.stoi[g.word]
                cov = coverage_by_loop(sc.masks[carrier(sc, g.object_index, g.kind)])
                k = cov.index(max(cov))  # the first patch the word's embedding matches best
                named = coverage_by_loop(sc.masks[g.object_index])
                rows.append(dict(hit=named[k] > 0, chance=sum(x > 0 for x in named) / len(named),
                                 any=coverage_by_loop(union)[k] > 0, kind=g.kind, multi=len(sc.objects) > 1))
    mean = lambda key, sel: sum(r[key] for r in sel) / len(sel)  # noqa: E731
    out = {"pointing_acc": mean("hit", rows), "pointing_chance": mean("chance", rows), "pointing_n": len(rows),
           "pointing_on_any_object": mean("any", rows)}
    for name, sel in (("color", [r for r in rows if r["kind"] == "color"]),
                      ("shape", [r for r in rows if r["kind"] == "shape"]), ("multi", [r for r in rows if r["multi"]])):
        out[f"pointing_acc_{name}"], out[f"pointing_chance_{name}"] = mean("hit", sel), mean("chance", sel)
    return out


@pytest.mark.parametrize("context_length", [24, 7])  # 7: long captions lose their last grounded words
def test_pointing_game_scores_known_hits_and_misses(context_length):
    scenes = [render_scene(0, "val", i, S) for i in range(10)]
    tok = WordTokenizer(vocabulary())
    model = KnownPointer(scenes, tok, context_length)
    got = pointing_game(model, tok, scenes, batch_size=4)  # 3 batches: the image index restarts per batch
    want = expected_results(scenes, tok, context_length)
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-6), key  # float32 means
    # the case is discriminating: colour words always hit, crossed shape words miss, every word lands on an object
    assert want["pointing_acc_color"] == 1.0 and want["pointing_acc_multi"] < 0.75
    assert want["pointing_on_any_object"] == 1.0 and 0 < want["pointing_chance"] < 0.5
    if context_length == 7:
        assert want["pointing_n"] < expected_results(scenes, tok, 24)["pointing_n"]  # some words were cut
