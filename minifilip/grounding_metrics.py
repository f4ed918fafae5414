"""Grounding metrics on the built-in scenes: what token-wise late interaction buys, next to honest baselines.

The pointing game (pointing.py) asks whether a word's top patch lands on its object. This module adds:

    centre baseline   a pointer that always picks the patch at the image centre, scored by the pointing game's
                      own rule on the same words (Zhang et al. report it beside random; 47% on Flickr30k Entities)
    segmentation      zero-shot semantic segmentation (the SPARC protocol on the built-in scenes): every patch takes
                      the class word (one of the 6 colours, or of the 6 shapes) most similar to it; mean IoU over
                      classes against the ground-truth masks
    binding           on two-object scenes, the true caption against the same caption with the two objects'
                      colours swapped ("a red circle and a blue square" vs "a blue circle and a red square");
                      the share of scenes where the model prefers the true one (chance 0.5, ties count half)
    untrained_model   the network a run starts from (same architecture, same seed): the baseline that says how much
                      of a score the architecture gives for free

Segmentation protocol. A patch's ground truth is the class of the object covering at least half of its pixels;
patches not covered that much (background, object borders) are left out, so this measures *which* word a patch
belongs to, not whether it is background (the scenes have no "background" word). The class text is each model's own
text representation: the class word's token embedding (FILIP, CLIP+FILIP; averaged over the prompt templates), or
the prompt's global [EOS] embedding for a CLIP model (as SPARC does for CLIP). Patches are the image tokens in both
cases. Chance: the expected IoU of a labeller that picks one of the K classes uniformly at random.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .data.builtin import images_to_tensor
from .data.grounded import COLORS, SHAPES, join_words
from .pointing import patch_coverage
from .zeroshot import BUILTIN_TEMPLATES, encode_texts, fill

SEGMENTATION_CLASSES = {"color": list(COLORS), "shape": list(SHAPES)}
MIN_COVER = 0.5  # a patch belongs to an object when at least this share of its pixels are the object's


# ------------------------------------------------------------------------------------------------ baselines
def untrained_model(config, seed: int = 0):
    """FILIP(config) as train.py builds it before the first step (torch.manual_seed(seed) then FILIP(config)),
    without disturbing the caller's random state."""
    from .model import FILIP
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FILIP(config).eval()


def centre_patch(image_size: int, patch_size: int) -> int:
    """Index (row-major, like the patch tokens) of the patch holding the image's centre pixel."""
    grid = image_size // patch_size
    return (grid // 2) * grid + grid // 2


def centre_baseline(scenes, patch_size: int, context_length: int, captions: str = "all",
                    min_overlap: float = 0.0) -> dict:
    """The pointing game of a pointer that always picks the centre patch, over the words `pointing_game` scores
    (same scenes, captions, context cut-off and "inside" rule). Keys pointing_centre[_color|_shape|_multi]."""
    image_size = scenes[0].image.shape[0]
    centre = centre_patch(image_size, patch_size)
    hits, kinds, multi = [], [], []
    for sc in scenes:
        inside = patch_coverage(sc.masks, patch_size)[:, centre] > min_overlap  # (n_objects,)
        for c in range(len(sc.captions) if captions == "all" else 1):
            for g in sc.groundings[c]:
                if g.token_index >= context_length - 1:  # as pointing_game: cut off, no token to test
                    continue
                hits.append(bool(inside[g.object_index]))
                kinds.append(g.kind)
                multi.append(len(sc.objects) > 1)
    if not hits:
        raise ValueError("no grounded words to point at (are these built-in scenes?)")
    hits, kinds, multi = np.array(hits), np.array(kinds), np.array(multi)
    out = {"pointing_centre": float(hits.mean())}
    for name, sel in (("color", kinds == "color"), ("shape", kinds == "shape"), ("multi", multi)):
        if sel.any():
            out[f"pointing_centre_{name}"] = float(hits[sel].mean())
    return out


# ------------------------------------------------------------------------------------------------ segmentation
def patch_labels(scenes, attribute: str, patch_size: int) -> torch.Tensor:
    """(S, N) long ground truth: the class index of the object covering >= MIN_COVER of each patch, else -1."""
    names = SEGMENTATION_CLASSES[attribute]
    rows = []
    for sc in scenes:
        cover = patch_coverage(sc.masks, patch_size)  # (n_objects, N)
        best, obj = cover.max(dim=0)  # (N,) each patch's most-covering object
        cls = torch.tensor([names.index(o[attribute]) for o in sc.objects])[obj]  # (N,)
        rows.append(torch.where(best >= MIN_COVER, cls, torch.full_like(cls, -1)))
    return torch.stack(rows)


def mean_iou(pred: torch.Tensor, truth: torch.Tensor, num_classes: int) -> dict:
    """IoU per class accumulated over all labelled patches (truth >= 0), and its mean over the classes that occur.

    Also the chance level: the IoU a uniform random labeller gets in expectation, n_c / K / (n_c + n / K - n_c / K)
    for a class with n_c of the n labelled patches (ratio of expectations)."""
    valid = truth >= 0
    pred, truth = pred[valid], truth[valid]
    n = truth.numel()
    if n == 0:
        raise ValueError("no labelled patches: no object covers half a patch in these scenes")
    ious, chance = [], []
    for c in range(num_classes):
        p, t = pred == c, truth == c
        union = int((p | t).sum())
        if union == 0:
            continue
        ious.append(int((p & t).sum()) / union)
        n_c = int(t.sum())
        if n_c:
            chance.append((n_c / num_classes) / (n_c + n / num_classes - n_c / num_classes))
    return {"miou": float(np.mean(ious)), "chance": float(np.mean(chance)), "per_class": ious, "patches": n}


def word_position(tokenizer, text: str, word: str, context_length: int) -> int:
    """Position of `word` in the tokenised `text` ([BOS] = 0)."""
    tokens = tokenizer.tokens(text, context_length)
    if word not in tokens:
        raise ValueError(f"{word!r} is not a token of {text!r} (is it in the vocabulary?)")
    return tokens.index(word)


@torch.no_grad()
def class_embeddings(model, tokenizer, names: list[str], templates=BUILTIN_TEMPLATES, text_side: str = "word"):
    """(K, D) unit vectors, one per class, averaged over the prompt templates.

    text_side "word": the class word's token embedding in each prompt (late interaction's unit);
    "global": the prompt's [EOS] embedding (CLIP's unit)."""
    prompts = [fill(t, name) for name in names for t in templates]  # class-major, K * C
    if text_side == "global":
        vecs = encode_texts(model, tokenizer, prompts, granularity="global")[0][:, 0]  # (K*C, D)
    elif text_side == "word":
        tokens = encode_texts(model, tokenizer, prompts, granularity="tokens")[0]  # (K*C, L, D)
        ctx = model.config.context_length
        pos = [word_position(tokenizer, fill(t, n), n, ctx) for n in names for t in templates]  # same order
        vecs = tokens[torch.arange(len(prompts)), torch.tensor(pos)]  # (K*C, D)
    else:
        raise ValueError(f"text_side must be 'word' or 'global', got {text_side!r}")
    vecs = F.normalize(vecs.float(), dim=-1).view(len(names), len(templates), -1).mean(dim=1)  # (K, D)
    return F.normalize(vecs, dim=-1)


def default_text_side(model) -> str:
    """Each model's own text representation: the global [EOS] vector for a CLIP model, word tokens otherwise."""
    return "global" if model.config.loss == "clip" else "word"


@torch.no_grad()
def segmentation(model, tokenizer, scenes, attribute: str = "color", batch_size: int = 128,
                 text_side: str | None = None) -> dict:
    """Zero-shot segmentation mIoU of `scenes` into the 6 colours or the 6 shapes (see the module docstring)."""
    names = SEGMENTATION_CLASSES[attribute]
    model.eval()
    device = next(model.parameters()).device
    classes = class_embeddings(model, tokenizer, names, text_side=text_side or default_text_side(model))  # (K, D)
    preds = []
    for s0 in range(0, len(scenes), batch_size):
        images = images_to_tensor([sc.image for sc in scenes[s0:s0 + batch_size]]).to(device)
        patches = model.encode_image(images, "tokens")[0].float()  # (B, N, D)
        preds.append(torch.einsum("bnd,kd->bnk", patches, classes.to(device)).argmax(dim=-1).cpu())  # (B, N)
    r = mean_iou(torch.cat(preds), patch_labels(scenes, attribute, model.config.patch_size), len(names))
    return {f"segmentation_miou_{attribute}": r["miou"], f"segmentation_chance_{attribute}": r["chance"],
            f"segmentation_patches_{attribute}": r["patches"]}


# ------------------------------------------------------------------------------------------------ binding
def swap_colours(scene, caption: int = 0) -> tuple[str, str]:
    """(true caption, the same caption with the two objects' colour words swapped); articles follow the new
    colour ("a red" -> "an orange"), so both captions have the same tokens but for the swap."""
    colour_at = [g.token_index - 1 for g in scene.groundings[caption] if g.kind == "color"]  # word positions
    if len(colour_at) != 2:
        raise ValueError(f"binding needs two-object scenes, this caption names {len(colour_at)} colours")
    words = list(scene.words[caption])
    i, j = colour_at
    words[i], words[j] = words[j], words[i]
    for k in (i, j):
        if k > 0 and words[k - 1] in ("a", "an"):
            words[k - 1] = "an" if words[k][0] in "aeiou" else "a"
    return scene.captions[caption], join_words(words)


@torch.no_grad()
def binding(model, tokenizer, scenes, direction: str = "i2t", captions: str = "all", batch_size: int = 32) -> dict:
    """How often the model scores a two-object scene's true caption above its colour-swapped twin.

    Each model scores with its own similarity (model.scores: late interaction, or the CLS/EOS cosine for CLIP);
    direction "i2t" (the image ranks the two texts), "t2i" or "mean". Ties count as half a win."""
    if direction not in ("i2t", "t2i", "mean"):
        raise ValueError(f"direction must be 'i2t', 't2i' or 'mean', got {direction!r}")
    model.eval()
    device = next(model.parameters()).device
    two = [sc for sc in scenes if len(sc.objects) == 2]
    if not two:
        raise ValueError("binding needs scenes with two objects")
    per_scene = len(two[0].captions) if captions == "all" else 1
    wins = []
    for s0 in range(0, len(two), batch_size):
        batch = two[s0:s0 + batch_size]
        texts = [t for sc in batch for c in range(per_scene) for t in swap_colours(sc, c)]  # true, swapped, ...
        img = model.encode_image(images_to_tensor([sc.image for sc in batch]).to(device))  # its own granularity
        txt = model.encode_text(tokenizer.encode(texts, model.config.context_length).to(device))
        s_i2t, s_t2i = model.scores(*img, *txt)  # (b, 2 * per_scene * b): every image against every text
        s = {"i2t": s_i2t, "t2i": s_t2i, "mean": 0.5 * (s_i2t + s_t2i)}[direction]
        s = s.view(len(batch), len(batch), per_scene, 2)  # (image, scene of the text, caption, true/swapped)
        own = s[torch.arange(len(batch)), torch.arange(len(batch))]  # (b, per_scene, 2): each image's own texts
        wins.append(((own[..., 0] > own[..., 1]).float() + 0.5 * (own[..., 0] == own[..., 1]).float()).flatten())
    wins = torch.cat(wins).cpu()
    return {"binding_acc": float(wins.mean()), "binding_chance": 0.5, "binding_n": len(wins)}


__all__ = ["untrained_model", "centre_patch", "centre_baseline", "patch_labels", "mean_iou", "class_embeddings",
           "segmentation", "swap_colours", "binding", "SEGMENTATION_CLASSES", "MIN_COVER"]
