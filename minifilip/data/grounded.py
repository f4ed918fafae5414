"""The built-in grounded dataset: procedurally drawn shapes with captions and exact word masks.

Each scene holds 1-3 non-overlapping objects (6 shapes x 6 colours x 2 sizes) on a varied background.
Every scene comes with several captions ("a small red circle left of a blue square.") and, for each caption,
which token names which object: the colour word and the shape word of every object are tied to that
object's pixel mask. Nothing is downloaded or stored: scene `i` of a split is drawn from a random
generator seeded by (seed, split, i), so the same seed always gives the same pixels and words, and the
train and validation splits come from different streams.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

SHAPES = ["circle", "square", "triangle", "diamond", "cross", "star"]
COLORS = {  # name -> RGB; saturated so they stand out from the grey-ish backgrounds
    "red": (220, 35, 35), "green": (35, 165, 55), "blue": (40, 75, 225),
    "yellow": (240, 215, 35), "purple": (145, 55, 195), "orange": (250, 135, 20),
}
SIZES = {"small": 0.10, "large": 0.18}  # object radius as a fraction of the image side
SPLITS = {"train": 0, "val": 1}
CAPTIONS_PER_SCENE = 3
# How a caption names an object. "color-first" (the default): "a small red circle"; "shape-first": "a small circle
# in red" (the causal text tower cannot carry the colour into the shape word); "shape-only": "a small circle" (no
# colour words at all); "mixed": colour-first or shape-first, drawn per object mention. Any of them + "+background":
# the caption also names the background's texture ("... on a checkered background."), so the background patches
# have a word of their own to match in FILIP's image->text direction instead of the objects' colour words.
OBJECT_STYLES = ("color-first", "shape-first", "shape-only", "mixed")
CAPTION_STYLES = OBJECT_STYLES + tuple(f"{style}+background" for style in OBJECT_STYLES)
BACKGROUNDS = ("plain", "shaded", "noisy", "checkered")  # the texture word of each background style


@dataclass
class Grounding:
    """Token `token_index` (position in the tokenised caption, [BOS] = 0) names object `object_index`."""
    token_index: int
    object_index: int
    kind: str  # "color" or "shape"
    word: str


@dataclass
class Scene:
    """One image with its captions and ground truth."""
    image: np.ndarray                 # (S, S, 3) uint8
    objects: list[dict]               # shape, color, size, center (x, y) in pixels, radius in pixels
    masks: np.ndarray                 # (n_objects, S, S) bool, the exact pixels each object was drawn on
    captions: list[str]               # CAPTIONS_PER_SCENE phrasings of the same scene
    words: list[list[str]] = field(default_factory=list)        # per caption, its word tokens
    groundings: list[list[Grounding]] = field(default_factory=list)  # per caption


def shape_mask(shape: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean mask of a shape centred at (cx, cy) with radius r on pixel-centre grids xx, yy."""
    dx, dy = (xx - cx) / r, (yy - cy) / r  # unit-radius coordinates
    if shape == "circle":
        return dx ** 2 + dy ** 2 <= 1.0
    if shape == "square":
        return (np.abs(dx) <= 0.85) & (np.abs(dy) <= 0.85)
    if shape == "triangle":  # apex up, base at dy = 0.8
        return (dy >= -1.0) & (dy <= 0.8) & (np.abs(dx) <= (dy + 1.0) / 1.8)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.0
    if shape == "cross":
        arm = 0.36
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= 1.0)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= 1.0))
    if shape == "star":  # five points: the allowed radius swings between 0.45 and 1
        rho, theta = np.hypot(dx, dy), np.arctan2(dy, dx) + np.pi / 2
        return rho <= 0.45 + 0.55 * np.abs(np.cos(2.5 * theta)) ** 3
    raise ValueError(f"unknown shape {shape!r}")


def split_style(caption_style: str) -> tuple[str, bool]:
    """"shape-first+background" -> ("shape-first", True): how objects are named, and whether the background is."""
    if caption_style not in CAPTION_STYLES:
        raise ValueError(f"caption style must be one of {CAPTION_STYLES}, got {caption_style!r}")
    objects, _, background = caption_style.partition("+")
    return objects, background == "background"


def _background(rng: np.random.Generator, s: int) -> tuple[np.ndarray, str]:
    """A low-saturation background: flat, gradient, noise or checker. (S, S, 3) float and its texture word."""
    base = rng.uniform(60, 190) + rng.uniform(-12, 12, size=3)  # grey with a faint tint
    style = rng.integers(4)
    ramp = np.linspace(-1, 1, s)
    if style == 0:
        img = np.broadcast_to(base, (s, s, 3)).copy()
    elif style == 1:  # gradient, vertical or horizontal
        g = ramp[:, None] if rng.random() < 0.5 else ramp[None, :]
        img = base + rng.uniform(15, 40) * np.broadcast_to(g, (s, s))[..., None]
    elif style == 2:
        img = base + rng.normal(0, 12, size=(s, s, 1))
    else:
        cell = int(rng.integers(4, 12))
        yy, xx = np.mgrid[:s, :s]
        img = base + 14 * (((yy // cell) + (xx // cell)) % 2)[..., None]
    return img, BACKGROUNDS[style]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(obj: dict, with_size: bool, style: str = "color-first") -> tuple[list[str], dict[str, int]]:
    """The words naming one object, and the position of its colour / shape word within them."""
    size = [obj["size"]] if with_size else []
    if style == "color-first":
        words = size + [obj["color"], obj["shape"]]
    elif style == "shape-first":
        words = size + [obj["shape"], "in", obj["color"]]
    elif style == "shape-only":
        words = size + [obj["shape"]]
    else:
        raise ValueError(f"caption style must be one of {CAPTION_STYLES}, got {style!r}")
    words = [_article(words[0]), *words]
    return words, {kind: words.index(obj[kind]) for kind in ("color", "shape") if obj[kind] in words}


def _caption(rng: np.random.Generator, objects: list[dict], style: str = "color-first",
             background: str | None = None) -> tuple[list[str], list[Grounding]]:
    """Words of one caption plus which word indices name which object; `background` (a texture word) adds
    "on a <texture> background" at the end, drawing nothing from rng (the object words stay the same)."""
    order = list(rng.permutation(len(objects)))
    with_size = [bool(rng.random() < 0.5) for _ in objects]
    # "mixed": one extra draw per object, only in that style, so the default captions stay as they were
    styles = [("shape-first" if rng.random() < 0.5 else "color-first") if style == "mixed" else style
              for _ in objects]
    pieces: list[list[str] | int] = []  # a list of words, or an object index standing for its phrase
    if len(objects) == 1:
        prefix = [[], ["a", "photo", "of"], ["there", "is"], ["an", "image", "of"]][rng.integers(4)]
        pieces = [prefix, order[0]]
    elif len(objects) == 2:
        a, b = order
        (ax, ay), (bx, by) = objects[a]["center"], objects[b]["center"]
        if rng.random() < 0.3:
            pieces = [a, ["and"], b]
        elif abs(ax - bx) >= abs(ay - by):
            pieces = [a, ["left" if ax < bx else "right", "of"], b]
        else:
            pieces = [a, ["above" if ay < by else "below"], b]
    else:
        a, b, c = order
        pieces = [a, [","], b, ["and"], c]
    words, groundings = [], []
    for piece in pieces:
        if isinstance(piece, list):
            words += piece
            continue
        phrase, where = _phrase(objects[piece], with_size[piece], styles[piece])
        start = len(words)
        words += phrase
        for kind in ("color", "shape"):  # +1: token positions count the leading [BOS]
            if kind in where:
                groundings.append(Grounding(start + where[kind] + 1, int(piece), kind, phrase[where[kind]]))
    if background is not None:
        words += ["on", _article(background), background, "background"]
    words.append(".")
    return words, groundings


def join_words(words: list[str]) -> str:
    """Words back to a caption string, punctuation attached to the previous word."""
    text = ""
    for w in words:
        text += w if (w in ".," or not text) else " " + w
    return text


def render_scene(seed: int, split: str, index: int, image_size: int = 64, caption_style: str = "color-first") -> Scene:
    """Scene `index` of `split` ("train" or "val"): deterministic in (seed, split, index, image_size).
    The pixels do not depend on `caption_style` (see CAPTION_STYLES), only the captions do."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    object_style, name_background = split_style(caption_style)
    rng = np.random.default_rng([seed, SPLITS[split], index])
    s = image_size
    img, texture = _background(rng, s)
    yy, xx = np.mgrid[:s, :s] + 0.5  # pixel centres
    n_objects = int(rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25]))
    objects, masks = [], []
    for _ in range(n_objects):
        for _attempt in range(50):  # rejection-sample a free spot; objects never overlap
            size = str(rng.choice(list(SIZES)))
            r = SIZES[size] * s
            cx, cy = rng.uniform(r + 1, s - r - 1, size=2)
            if all(np.hypot(cx - o["center"][0], cy - o["center"][1]) > r + o["radius"] + 2 for o in objects):
                break
        else:
            continue  # no room left: the scene keeps fewer objects
        # colour and shape differ between objects of one scene, so every word names exactly one object
        shape = str(rng.choice([x for x in SHAPES if x not in {o["shape"] for o in objects}]))
        color = str(rng.choice([x for x in COLORS if x not in {o["color"] for o in objects}]))
        mask = shape_mask(shape, xx, yy, cx, cy, r)
        img[mask] = np.array(COLORS[color]) + rng.uniform(-15, 15, size=3)
        objects.append(dict(shape=shape, color=color, size=size, center=(float(cx), float(cy)), radius=float(r)))
        masks.append(mask)
    captions, words, groundings = [], [], []
    for _ in range(CAPTIONS_PER_SCENE):
        w, g = _caption(rng, objects, object_style, texture if name_background else None)
        captions.append(join_words(w))
        words.append(w)
        groundings.append(g)
    image = np.clip(img, 0, 255).astype(np.uint8)
    return Scene(image=image, objects=objects, masks=np.stack(masks), captions=captions, words=words,
                 groundings=groundings)


def vocabulary(caption_style: str = "color-first") -> list[str]:
    """Every word a built-in caption of this style can use (for fitting a tokenizer without rendering).
    The default style's list is unchanged, so its tokenizer (and a default run) stays what it was."""
    object_style, name_background = split_style(caption_style)
    words = {"a", "an", "photo", "of", "there", "is", "image", "and", "left", "right", "above", "below", ",", "."}
    words |= {"in"} if object_style in ("shape-first", "mixed") else set()
    words |= {"on", "background", *BACKGROUNDS} if name_background else set()
    return sorted(words | set(SHAPES) | set(COLORS) | set(SIZES))
