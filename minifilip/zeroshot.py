"""Zero-shot classification with prompt ensembles, the FILIP way.

A class is turned into text with C templates ("a photo of a {}.", "there is a {}.", ...). FILIP scores an image
against a class by averaging the late-interaction *similarities* over the templates:

    s(image, class) = 1/C * sum_c s(image, template_c(class))              (ensemble="similarity", the paper's)

CLIP instead averages the text *embeddings* and scores once. Token-level texts of different lengths cannot be
averaged position by position, so for the comparison we pool each template's valid tokens to one unit vector,
average those over the templates and renormalise: one "class token" per class (ensemble="embedding"). For a
CLIP model (one global token per text) that is exactly CLIP's own prompt ensembling.

Sources: the built-in data's single-object val scenes (label = the object's shape, or its colour) and any
ImageFolder-style directory (one sub-folder per class, its name is the class name; "_" reads as a space).

Axis letters in the einops patterns: i images, k classes, c templates (prompts per class), d embedding dim.
"""
from __future__ import annotations

import os
import re
import sys

import torch
import torch.nn.functional as F
from einops import rearrange

from .data.builtin import find_val_scenes
from .data.decode import IMAGE_EXTS
from .data.grounded import COLORS, SHAPES
from .data.transforms import images_to_tensor
from .model import pairwise_scores, pick_direction
from .tokenizer import UNK_ID, split_words

# A few of CLIP's ImageNet templates (Radford et al. 2021), for real photos.
CLIP_TEMPLATES = [
    "a photo of a {}.", "a bad photo of a {}.", "a photo of the large {}.", "a photo of the small {}.",
    "a cropped photo of a {}.", "a bright photo of a {}.", "a close-up photo of a {}.", "itap of a {}.",
    "a drawing of a {}.", "a rendering of a {}.", "art of the {}.", "a photo of my {}.",
]
# FILIP's prefix/suffix style: the class name wrapped in short natural phrases.
FILIP_TEMPLATES = ["a photo of a {}.", "a {} in the picture.", "there is a {}.", "an image of a {}.",
                   "a picture of a {}.", "the {} in the scene."]
# For the built-in shapes data: only words its captions use, so nothing becomes [UNK].
BUILTIN_TEMPLATES = ["a {}.", "a photo of a {}.", "there is a {}.", "an image of a {}."]
TEMPLATE_SETS = {"builtin": BUILTIN_TEMPLATES, "filip": FILIP_TEMPLATES, "clip": CLIP_TEMPLATES}
BUILTIN_TASKS = {"shape": SHAPES, "color": list(COLORS)}


def fill(template: str, name: str) -> str:
    """template.format(name), with the article "a" right before the name turned into "an" before a vowel
    ("a photo of a {}." + "orange" -> "a photo of an orange."), as the built-in captions write it."""
    text = template.format(name)
    if name[:1].lower() in "aeiou":
        text = re.sub(r"\b([Aa]) (?=" + re.escape(name) + r")", r"\1n ", text)
    return text


def unknown_words(tokenizer, texts: list[str]) -> list[str]:
    """Words of `texts` the tokenizer maps to [UNK] (sorted, unique)."""
    return sorted({w for t in texts for w in split_words(t) if tokenizer.stoi.get(w, UNK_ID) == UNK_ID})


def ensemble_scores(image_tokens, image_mask, text_tokens, text_mask, n_templates: int,
                    ensemble: str = "similarity", direction: str = "i2t", impl: str = "auto") -> torch.Tensor:
    """Class scores (I, K) from encoded images and K * C encoded prompts, class-major (class k's C templates are
    rows k*C ... k*C + C - 1 of text_tokens (K*C, L, D), text_mask (K*C, L)).

    ensemble="similarity": mean over templates of the similarity (FILIP). "embedding": score each image against
    one averaged class embedding (CLIP-style; see the module docstring for the token-level pooling).
    Scored like the model scores (model.pairwise_scores, late-interaction implementation `impl`).
    """
    if text_tokens.shape[0] % n_templates:
        raise ValueError(f"{text_tokens.shape[0]} prompts are not a whole number of {n_templates} templates")
    if ensemble == "similarity":
        s_i2t, s_t2i = pairwise_scores(image_tokens, image_mask, text_tokens, text_mask, impl)  # (I, K*C) each
        s = pick_direction(s_i2t, s_t2i, direction)
        return rearrange(s, "i (k c) -> i k c", c=n_templates).mean(dim=2)  # average the similarities
    if ensemble == "embedding":
        m = text_mask[..., None].to(text_tokens.dtype)  # (K*C, L, 1)
        pooled = F.normalize((text_tokens * m).sum(1).float() / m.sum(1).float(), dim=-1)  # (K*C, D) one per prompt
        cls = F.normalize(rearrange(pooled, "(k c) d -> k c d", c=n_templates).mean(1), dim=-1)  # (K, D)
        cls = cls[:, None].to(text_tokens.dtype)  # (K, 1, D): a one-token "text" per class
        ones = torch.ones(cls.shape[:2], dtype=torch.bool, device=cls.device)
        return pick_direction(*pairwise_scores(image_tokens, image_mask, cls, ones, impl), direction)
    raise ValueError(f"ensemble must be 'similarity' or 'embedding', got {ensemble!r}")


@torch.no_grad()
def encode_images(model, images: torch.Tensor, batch_size: int = 256, granularity: str | None = None):
    """Encode (B, 3, S, S) images in batches -> (tokens (B, N, D), mask (B, N)) on the model's device."""
    device = next(model.parameters()).device
    parts = [model.encode_image(images[i:i + batch_size].to(device), granularity)
             for i in range(0, len(images), batch_size)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


@torch.no_grad()
def encode_texts(model, tokenizer, texts: list[str], batch_size: int = 256, granularity: str | None = None):
    """Tokenise and encode captions in batches -> (tokens (T, L, D), mask (T, L))."""
    if any(not split_words(t) for t in texts):
        raise ValueError("empty caption: a text needs at least one word")
    device = next(model.parameters()).device
    ids = tokenizer.encode(texts, model.config.context_length)
    parts = [model.encode_text(ids[i:i + batch_size].to(device), granularity)
             for i in range(0, len(ids), batch_size)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


@torch.no_grad()
def zero_shot(model, tokenizer, images: torch.Tensor, labels: torch.Tensor, class_names: list[str],
              templates: list[str], ensemble: str = "similarity", direction: str = "i2t",
              batch_size: int = 256, warn=True) -> dict:
    """Top-1 accuracy of zero-shot classification of `images` into `class_names` with a prompt ensemble."""
    model.eval()
    prompts = [fill(t, name) for name in class_names for t in templates]  # class-major, K * C
    unknown = unknown_words(tokenizer, prompts)
    if unknown and warn:
        print(f"warning: prompt words not in the vocabulary become [UNK]: {', '.join(unknown[:20])}", file=sys.stderr)
    img = encode_images(model, images, batch_size)
    txt = encode_texts(model, tokenizer, prompts, batch_size)
    s = ensemble_scores(*img, *txt, n_templates=len(templates), ensemble=ensemble, direction=direction,
                        impl=model.config.cmli_impl)  # (I, K)
    pred = s.argmax(dim=1).cpu()
    return {"acc": float((pred == labels).float().mean()), "n": len(labels), "classes": len(class_names),
            "chance": 1.0 / len(class_names), "templates": len(templates), "unknown_words": unknown}


def builtin_zeroshot_data(task: str, n: int = 300, image_size: int = 64, seed: int = 0):
    """The first n single-object val scenes: (images (n, 3, S, S), labels (n,), class names).
    task "shape": label = the object's shape; "color": its colour."""
    if task not in BUILTIN_TASKS:
        raise ValueError(f"task must be one of {list(BUILTIN_TASKS)}, got {task!r}")
    names = BUILTIN_TASKS[task]
    scenes = [sc for _i, sc in find_val_scenes(lambda sc: len(sc.objects) == 1, n, image_size, seed)]
    labels = torch.tensor([names.index(sc.objects[0][task]) for sc in scenes])
    return images_to_tensor([sc.image for sc in scenes]), labels, list(names)


IMAGE_EXTENSIONS = tuple("." + ext for ext in IMAGE_EXTS)  # the data loaders' list, with the dot


def image_folder(root: str, image_size: int, limit_per_class: int | None = None):
    """ImageFolder layout root/<class>/<image>: (images (n, 3, S, S), labels (n,), class names)."""
    from .data.transforms import load_image  # decoded like training data, clear error on unreadable files
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no image folder at {root}")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise ValueError(f"{root} has no class sub-folders")
    images, labels = [], []
    for k, c in enumerate(classes):
        files = sorted(f for f in os.listdir(os.path.join(root, c)) if f.lower().endswith(IMAGE_EXTENSIONS))
        for f in files[:limit_per_class]:
            images.append(load_image(os.path.join(root, c, f), image_size))
            labels.append(k)
    if not images:
        raise ValueError(f"{root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return images_to_tensor(images), torch.tensor(labels), [c.replace("_", " ") for c in classes]
