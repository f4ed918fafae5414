"""The pointing game: does a word's most similar image patch land on the object the word names?

FILIP's claim is that token-wise late interaction teaches the model *where* each word is. The built-in grounded
data knows the truth: for every caption, which token (a colour or shape word) names which object, and that
object's exact pixel mask. For each such (word, object) pair we take the word's token embedding, find the image
patch with the highest cosine similarity to it, and score a hit when that patch is "inside" the object.

"Inside" (one definition, used for hits and chance alike): the patch overlaps the object's mask, i.e. more than
`min_overlap` of the patch's pixels are object pixels (default 0: at least one pixel). The chance level is what
a pointer picking a uniformly random patch would score: the fraction of patches that count as inside, averaged
over the same groundings. Accuracy is only meaningful next to it.

    hits = pointing_hits(patch_tokens, word_tokens, masks, patch_size=8)   # testable without a model
    result = pointing_game(model, tokenizer, scenes)                        # on a trained checkpoint
"""
from __future__ import annotations

import numpy as np
import torch
from einops import reduce

from .data.transforms import images_to_tensor


def patch_coverage(masks: torch.Tensor | np.ndarray, patch_size: int) -> torch.Tensor:
    """masks (G, S, S) bool pixel masks -> (G, N) fraction of each patch's pixels inside the mask.
    Axis letters: g groundings, h / w patch rows / columns, p / q pixels within a patch.

    Patches are numbered row by row, like the ViT's patch tokens (N = (S / patch_size) ** 2).
    """
    masks = torch.as_tensor(np.asarray(masks)).float()
    return reduce(masks, "g (h p) (w q) -> g (h w)", "mean", p=patch_size, q=patch_size)


def pointing_hits(patch_tokens: torch.Tensor, word_tokens: torch.Tensor, masks, patch_size: int,
                  min_overlap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One pointing trial per row: word g points at argmax_k <patch_tokens[g, k], word_tokens[g]>.

    patch_tokens (G, N, D) (the patches of the image word g belongs to), word_tokens (G, D),
    masks (G, S, S) bool (the object word g names). Returns (hit (G,) bool, chance (G,) float): whether the
    chosen patch is inside the object, and the fraction of the image's patches that are.
    """
    inside = patch_coverage(masks, patch_size) > min_overlap  # (G, N) which patches count as the object
    if inside.shape[1] != patch_tokens.shape[1]:
        raise ValueError(f"masks give {inside.shape[1]} patches but there are {patch_tokens.shape[1]} patch tokens")
    sim = torch.einsum("gnd,gd->gn", patch_tokens.float(), word_tokens.float())  # (G, N) cosine per patch
    best = sim.argmax(dim=1)  # (G,) the patch the word points at
    hit = inside.gather(1, best[:, None].cpu())[:, 0]
    return hit, inside.float().mean(dim=1)


@torch.no_grad()
def pointing_game(model, tokenizer, scenes, captions: str = "all", batch_size: int = 128,
                  min_overlap: float = 0.0) -> dict:
    """Pointing game over built-in `scenes` (from render_scene / builtin_val_pairs) with a model's token embeddings.

    Both towers are read at granularity "tokens", whatever the training loss: for a CLIP-trained model the patch
    and word tokens were never trained to align, which is the comparison we want. captions: "all" uses every
    phrasing of each scene, "first" only the first. Returns accuracy and chance level overall, per word kind
    (color / shape) and on scenes with two or more objects (multi), where pointing at the salient blob is not enough.
    """
    model.eval()
    cfg = model.config
    device = next(model.parameters()).device
    rows = {"hit": [], "chance": [], "any": [], "kind": [], "multi": []}
    for s0 in range(0, len(scenes), batch_size):
        batch = scenes[s0:s0 + batch_size]
        patches, _ = model.encode_image(images_to_tensor([sc.image for sc in batch]).to(device), "tokens")  # (B,N,D)
        picks = [(b, c) for b, sc in enumerate(batch) for c in range(len(sc.captions) if captions == "all" else 1)]
        ids = tokenizer.encode([batch[b].captions[c] for b, c in picks], cfg.context_length).to(device)
        words, _ = model.encode_text(ids, "tokens")  # (P, L, D)
        img_idx, word_vecs, masks, union, kinds, multi = [], [], [], [], [], []
        for p, (b, c) in enumerate(picks):
            for g in batch[b].groundings[c]:
                if g.token_index >= cfg.context_length - 1:  # cut off by the context length: no token to test
                    continue
                img_idx.append(b)
                word_vecs.append(words[p, g.token_index])
                masks.append(batch[b].masks[g.object_index])
                union.append(batch[b].masks.any(axis=0))
                kinds.append(g.kind)
                multi.append(len(batch[b].objects) > 1)
        if not img_idx:
            continue
        img_tokens, word_vecs = patches[torch.tensor(img_idx, device=device)], torch.stack(word_vecs)
        hit, chance = pointing_hits(img_tokens, word_vecs, np.stack(masks), cfg.patch_size, min_overlap)
        on_any, _ = pointing_hits(img_tokens, word_vecs, np.stack(union), cfg.patch_size, min_overlap)
        rows["hit"].append(hit.float())
        rows["chance"].append(chance)
        rows["any"].append(on_any.float())
        rows["kind"] += kinds
        rows["multi"] += multi
    if not rows["kind"]:
        raise ValueError("no grounded words to point at (are these built-in scenes?)")
    hit, chance, on_any = torch.cat(rows["hit"]), torch.cat(rows["chance"]), torch.cat(rows["any"])
    out = {"pointing_acc": float(hit.mean()), "pointing_chance": float(chance.mean()), "pointing_n": len(hit),
           # how often the top patch is on *some* object: a salient-blob detector scores high here without
           # knowing which word is which, so compare it with the accuracy on multi-object scenes
           "pointing_on_any_object": float(on_any.mean())}
    groups = {"color": np.array(rows["kind"]) == "color", "shape": np.array(rows["kind"]) == "shape",
              "multi": np.array(rows["multi"])}
    for name, sel in groups.items():
        sel = torch.from_numpy(sel)
        if sel.any():
            out[f"pointing_acc_{name}"] = float(hit[sel].mean())
            out[f"pointing_chance_{name}"] = float(chance[sel].mean())
    return out


def inside_rule(min_overlap: float = 0.0) -> str:
    """The definition of "inside" used with `min_overlap`, in words (for reports next to the numbers)."""
    amount = "at least one pixel" if min_overlap == 0 else f"more than {min_overlap:.0%} of its pixels"
    return (f"a word's top patch counts as inside its object when the patch overlaps the object's pixel mask "
            f"({amount}); chance = fraction of patches that overlap, averaged over the same words")


INSIDE_RULE = inside_rule()  # the rule at pointing_game's default min_overlap

__all__ = ["patch_coverage", "pointing_hits", "pointing_game", "inside_rule", "INSIDE_RULE"]
