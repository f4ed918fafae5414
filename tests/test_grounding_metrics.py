"""Grounding metrics against constructed cases whose answers are known: oracle stub models, hand-made scenes."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minifilip import FILIP, FILIPConfig
from minifilip import grounding_metrics as gm
from minifilip.data.builtin import builtin_val_pairs, images_to_tensor
from minifilip.data.grounded import COLORS, SHAPES, Grounding, Scene, vocabulary
from minifilip.tokenizer import WordTokenizer

TOKENIZER = WordTokenizer(vocabulary())
SCENES = builtin_val_pairs(60)[2]  # 60 val scenes: 1-3 objects each
COLOR_NAMES, N_SHAPES = list(COLORS), len(SHAPES)
# axes of the stub embedding space: 6 colours, 6 shapes, 36 (colour, shape) pairs, background, other words
D = 6 + 6 + 36 + 2
BG, OTHER = D - 2, D - 1


def axis_color(c): return COLOR_NAMES.index(c)
def axis_shape(s): return 6 + SHAPES.index(s)
def axis_pair(c, s): return 12 + 6 * COLOR_NAMES.index(c) + SHAPES.index(s)


class OracleModel(torch.nn.Module):
    """A stub with a FILIP's interface whose embeddings are built from the scene's ground truth.

    Patches: the object covering >= half a patch gives e_colour + e_shape ("bag") or e_(colour, shape) ("bind");
    other patches e_bg. Words: a colour word is e_colour ("bag") or, followed by its shape word, e_(colour, shape)
    ("bind"); a shape word e_shape or e_(preceding colour, shape); other words e_other. `permute` maps each colour
    word to the next colour's axis: a model that confuses every colour."""
    scores = FILIP.scores  # late interaction exactly as a FILIP scores

    def __init__(self, scenes, mode="bag", permute=False):
        super().__init__()
        self.config = FILIPConfig.preset("tiny", vocab_size=len(TOKENIZER))
        self.dummy = torch.nn.Parameter(torch.zeros(1))  # gives the metrics a device
        self.mode, self.permute = mode, permute
        self.lookup = {self._key(images_to_tensor([sc.image])[0]): sc for sc in scenes}

    @staticmethod
    def _key(image):
        return image.mul(1000).round().to(torch.int32).numpy().tobytes()

    def encode_image(self, images, granularity=None):
        out = torch.zeros(len(images), self.config.num_patches, D)
        for b, image in enumerate(images):
            sc = self.lookup[self._key(image)]
            cover, obj = gm.patch_coverage(sc.masks, self.config.patch_size).max(dim=0)  # (N,)
            for n in range(out.shape[1]):
                if cover[n] < gm.MIN_COVER:
                    out[b, n, BG] = 1.0
                    continue
                o = sc.objects[int(obj[n])]
                if self.mode == "bind":
                    out[b, n, axis_pair(o["color"], o["shape"])] = 1.0
                else:
                    out[b, n, axis_color(o["color"])] = out[b, n, axis_shape(o["shape"])] = 1.0
        return F.normalize(out, dim=-1), torch.ones(out.shape[:2], dtype=torch.bool)

    def _word(self, words, k):
        w = words[k]
        if self.permute and w in COLORS:
            w = COLOR_NAMES[(COLOR_NAMES.index(w) + 1) % 6]
        nxt, prev = (words[k + 1] if k + 1 < len(words) else ""), (words[k - 1] if k else "")
        v = torch.zeros(D)
        if self.mode == "bind" and w in COLORS and nxt in SHAPES:
            v[axis_pair(w, nxt)] = 1.0
        elif self.mode == "bind" and w in SHAPES and prev in COLORS:
            v[axis_pair(prev, w)] = 1.0
        elif w in COLORS:
            v[axis_color(w)] = 1.0
        elif w in SHAPES:
            v[axis_shape(w)] = 1.0
        else:
            v[OTHER] = 1.0
        return v

    def encode_text(self, ids, granularity=None):
        out = torch.zeros(*ids.shape, D)
        for t, row in enumerate(ids.tolist()):
            words = [TOKENIZER.itos[i] for i in row]
            for k in range(len(words)):
                out[t, k] = self._word(words, k)
        return out, ids > 3  # words only: no [PAD]/[BOS]/[EOS]/[UNK]


@pytest.mark.parametrize("attribute", ["color", "shape"])
def test_segmentation_of_an_oracle_is_perfect_and_of_a_confused_one_zero(attribute):
    r = gm.segmentation(OracleModel(SCENES), TOKENIZER, SCENES, attribute)
    assert r[f"segmentation_miou_{attribute}"] == 1.0
    assert 0.05 < r[f"segmentation_chance_{attribute}"] < 0.2 and r[f"segmentation_patches_{attribute}"] > 50
    if attribute == "color":
        confused = gm.segmentation(OracleModel(SCENES, permute=True), TOKENIZER, SCENES, "color")
        assert confused["segmentation_miou_color"] == 0.0


def test_mean_iou_known_values_and_chance_matches_random_labels():
    truth = torch.tensor([0, 0, 1, 1, -1, -1])
    pred = torch.tensor([0, 1, 1, 1, 0, 0])  # class 0: I=1, U=2; class 1: I=2, U=3; the -1 patches are ignored
    r = gm.mean_iou(pred, truth, 2)
    assert r["per_class"] == [0.5, 2 / 3] and abs(r["miou"] - (0.5 + 2 / 3) / 2) < 1e-12 and r["patches"] == 4
    g = torch.Generator().manual_seed(0)
    truth = torch.randint(0, 6, (20000,), generator=g) * (torch.rand(20000, generator=g) < 0.8)  # imbalanced
    rand = gm.mean_iou(torch.randint(0, 6, (20000,), generator=g), truth, 6)
    assert abs(rand["miou"] - rand["chance"]) < 0.01


def test_binding_prefers_true_caption_only_when_words_are_bound():
    bound = gm.binding(OracleModel(SCENES, "bind"), TOKENIZER, SCENES)
    bag = gm.binding(OracleModel(SCENES, "bag"), TOKENIZER, SCENES)  # same bag of words: every pair ties
    assert bound["binding_n"] == bag["binding_n"] == 3 * sum(len(sc.objects) == 2 for sc in SCENES) > 0
    assert bound["binding_acc"] == 1.0 and bag["binding_acc"] == 0.5 and bag["binding_chance"] == 0.5
    assert gm.binding(OracleModel(SCENES, "bind"), TOKENIZER, SCENES, direction="t2i")["binding_acc"] == 1.0


def test_swap_colours_swaps_only_the_colours_and_fixes_articles():
    sc = next(s for s in SCENES if len(s.objects) == 2)
    for c in range(len(sc.captions)):
        true, swapped = gm.swap_colours(sc, c)
        a, b = TOKENIZER.tokens(true, 24), TOKENIZER.tokens(swapped, 24)
        diff = [k for k in range(len(a)) if a[k] != b[k] and a[k] not in ("a", "an")]
        assert len(a) == len(b) and len(diff) == 2 and {a[k] for k in diff} == {b[k] for k in diff} <= set(COLORS)
    scene = Scene(image=sc.image, objects=sc.objects, masks=sc.masks, captions=["an orange star and a red cross."],
                  words=[["an", "orange", "star", "and", "a", "red", "cross", "."]],
                  groundings=[[Grounding(2, 0, "color", "orange"), Grounding(6, 1, "color", "red")]])
    assert gm.swap_colours(scene) == ("an orange star and a red cross.", "a red star and an orange cross.")


def test_centre_baseline_on_hand_made_scene():
    s, p = 16, 4  # 4x4 patches; the centre pixel (8, 8) lies in patch row 2, col 2 = index 10
    assert gm.centre_patch(s, p) == 10
    masks = np.zeros((2, s, s), bool)
    masks[0, 9:11, 9:11] = True  # object 0 covers part of the centre patch
    masks[1, 0:3, 0:3] = True  # object 1 in the top-left corner
    words = ["a", "red", "circle", "and", "a", "blue", "square", "."]
    g = [Grounding(2, 0, "color", "red"), Grounding(3, 0, "shape", "circle"),
         Grounding(6, 1, "color", "blue"), Grounding(7, 1, "shape", "square")]
    scene = Scene(image=np.zeros((s, s, 3), np.uint8), objects=[{}, {}], masks=masks, captions=["x"], words=[words],
                  groundings=[g])
    r = gm.centre_baseline([scene], p, context_length=24)
    assert r == {"pointing_centre": 0.5, "pointing_centre_color": 0.5, "pointing_centre_shape": 0.5,
                 "pointing_centre_multi": 0.5}
    assert gm.centre_baseline([scene], p, context_length=4)["pointing_centre"] == 1.0  # later words cut off


def test_untrained_model_is_the_training_init_and_keeps_the_random_state():
    cfg = FILIPConfig.preset("tiny", vocab_size=len(TOKENIZER), vision_layers=1, text_layers=1)
    torch.manual_seed(5)
    want = FILIP(cfg).state_dict()
    before = torch.get_rng_state()
    got = gm.untrained_model(cfg, seed=5).state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_class_embeddings_pick_the_class_word():
    emb = gm.class_embeddings(OracleModel(SCENES), TOKENIZER, ["orange", "red"])  # "an orange." / "a red."
    assert torch.allclose(emb[0], F.one_hot(torch.tensor(axis_color("orange")), D).float())
    assert torch.allclose(emb[1], F.one_hot(torch.tensor(axis_color("red")), D).float())
