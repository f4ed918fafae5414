"""FILIP: a dual-stream model trained with token-wise cross-modal late interaction.

    model = FILIP(FILIPConfig.preset("tiny", vocab_size=len(tokenizer)))
    img, img_mask = model.encode_image(images)      # (B, N, D) unit vectors, CLS excluded
    txt, txt_mask = model.encode_text(ids)          # (B, L, D) unit vectors, padding masked out
    loss = model.contrastive_loss(img, img_mask, txt, txt_mask)

With `config.loss = "clip"` the same towers train CLIP-style: `encode_image` then returns the [CLS] embedding
and `encode_text` the [EOS] embedding (one token each), and the score is their cosine. That makes the two
objectives comparable at equal compute, and lets gradient caching treat them alike.

With `config.loss = "clip+filip"` (SPARC's "sum of the losses") the loss is clip_weight * CLIP + filip_weight *
FILIP. The encoders then return granularity "both": the global vector at position 0, *masked out*, followed by the
tokens. Every late-interaction consumer (retrieval, zero-shot, gradient caching) therefore sees exactly FILIP's
tokens and scores; only `contrastive_loss` reads position 0 for the global term. Evaluation of a clip+filip model
thus scores token-wise, like FILIP; `granularity="global"` gives its CLS/EOS cosine instead.

Scoring has one path: `scores` (one block of images against every text), `pairwise_scores` (all images, in
blocks) and `pick_direction` are plain functions of encoded tensors, so zero-shot and evaluation code can score
without a model; the FILIP methods of the same names call them with the model's `cmli_impl`.

Temperature, one quantity under three names:
    temperature          tau: logits = scores / tau (config.init_temperature = 0.07, config.min_temperature = 0.01)
    logit_scale          log(1 / tau), the learned parameter (CLIP's name and state_dict key; the log keeps tau > 0)
    inverse_temperature  1 / tau = exp(logit_scale): what info_nce multiplies by; training keeps tau >= min_temperature
                         by clamping logit_scale in place after each optimizer step (clamp_logit_scale_)
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import cmli
from .config import FILIPConfig
from .encoders import TextEncoder, VisionEncoder
from .loss import info_nce
from .tokenizer import BOS_ID, EOS_ID, PAD_ID


def _unit(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise the last dim in fp32, keep the input dtype (half-precision features, as in the paper)."""
    return F.normalize(x.float(), dim=-1).to(x.dtype)


class FILIP(nn.Module):
    """Image tower + text tower + learnable temperature. See the module docstring."""

    def __init__(self, config: FILIPConfig):
        super().__init__()
        self.config = config
        self.visual = VisionEncoder(config)
        self.text = TextEncoder(config)
        # learn log(1/tau) so the temperature stays positive; tau starts at config.init_temperature
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)

    # ------------------------------------------------------------------ encoders
    def _granularity(self, granularity: str | None) -> str:
        granularity = granularity or {"clip": "global", "filip": "tokens", "clip+filip": "both"}[self.config.loss]
        if granularity not in ("tokens", "global", "both"):
            raise ValueError(f"granularity must be 'tokens', 'global' or 'both', got {granularity!r}")
        return granularity

    def encode_image(self, images: torch.Tensor, granularity: str | None = None):
        """images (B, 3, H, W) -> (tokens (B, N, D) unit vectors, mask (B, N) bool).

        granularity "tokens": the N patch embeddings (CLS excluded); "global": the CLS embedding (N = 1).
        "both": CLS then the patches (N + 1), with the CLS masked out (see the module docstring).
        Default: "tokens" for the FILIP loss, "global" for the CLIP loss, "both" for "clip+filip".
        """
        size = self.config.image_size
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != size or images.shape[3] != size:
            raise ValueError(f"images must have shape (B, 3, {size}, {size}), got {tuple(images.shape)}")
        x = self.visual(images)  # (B, 1 + N, D), CLS first
        granularity = self._granularity(granularity)
        if granularity == "both":
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
            mask[:, 0] = False  # the CLS takes no part in late interaction
            return _unit(x), mask
        x = x[:, :1] if granularity == "global" else x[:, 1:]
        return _unit(x), torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)

    def text_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: the tokens that take part in late interaction (never padding)."""
        mask = ids != PAD_ID
        if not self.config.text_special_tokens:
            mask &= (ids != BOS_ID) & (ids != EOS_ID)
        return mask

    def encode_text(self, ids: torch.Tensor, granularity: str | None = None):
        """ids (B, L) token ids -> (tokens (B, L, D) unit vectors, mask (B, L) bool).

        granularity "tokens": every position, masked to the words (plus [BOS]/[EOS] when
        `config.text_special_tokens`); "global": the last non-padding token, normally [EOS] (L = 1);
        "both": that global vector (masked out) followed by the tokens (1 + L).
        """
        if ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"ids must be a 2-D integer tensor (B, L), got {tuple(ids.shape)} {ids.dtype}")
        if ids.shape[1] > self.config.context_length:
            raise ValueError(f"captions have {ids.shape[1]} tokens; the model's context_length is "
                             f"{self.config.context_length}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}); is the tokenizer the model's?")
        x = self.text(ids)  # (B, L, D)
        granularity = self._granularity(granularity)
        if granularity == "tokens":
            return _unit(x), self.text_mask(ids)
        last = ((ids != PAD_ID).sum(dim=1) - 1).clamp(min=0)  # (B,) index of [EOS]
        g = x[torch.arange(x.shape[0], device=x.device), last][:, None]  # (B, 1, D)
        if granularity == "global":
            return _unit(g), torch.ones(g.shape[:2], dtype=torch.bool, device=g.device)
        hidden = torch.zeros_like(ids[:, :1], dtype=torch.bool)  # (B, 1): the global vector is masked out
        return _unit(torch.cat([g, x], dim=1)), torch.cat([hidden, self.text_mask(ids)], dim=1)  # (B, 1 + L, D)

    # ------------------------------------------------------------------ scores and loss
    @property
    def inverse_temperature(self) -> torch.Tensor:
        """1 / temperature = exp(logit_scale). Not clamped here: a clamp in the forward pass has zero gradient
        above its bound, so a scale that reached it could never come down; training clamps the parameter in
        place after each optimizer step instead (`clamp_logit_scale_`, as CLIP and open_clip do)."""
        return self.logit_scale.exp()

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Keep the temperature >= config.min_temperature: clamp the parameter in place (after optimizer.step)."""
        self.logit_scale.clamp_(max=math.log(1.0 / self.config.min_temperature))

    def scores(self, image_tokens, image_mask, text_tokens, text_mask, impl: str | None = None):
        """(s_i2t, s_t2i), both (n_images, n_texts), for already-encoded inputs of either granularity."""
        return scores(image_tokens, image_mask, text_tokens, text_mask, impl=impl or self.config.cmli_impl)

    def contrastive_loss(self, image_tokens, image_mask, text_tokens, text_mask) -> torch.Tensor:
        """Symmetric InfoNCE over the batch, on already-encoded (B, N, D) / (B, M, D) tokens
        (for "clip+filip": granularity "both", (B, 1 + N, D) / (B, 1 + M, D))."""
        cfg = self.config
        if image_tokens.shape[0] != text_tokens.shape[0]:
            raise ValueError(f"contrastive_loss needs matched pairs: {image_tokens.shape[0]} images vs "
                             f"{text_tokens.shape[0]} texts")
        if cfg.loss == "clip" and (image_tokens.shape[1] != 1 or text_tokens.shape[1] != 1):
            raise ValueError("the CLIP loss takes one global token per side; encode with granularity='global'")
        if cfg.loss == "filip":
            return self._token_loss(image_tokens, image_mask, text_tokens, text_mask)
        if cfg.loss == "clip":
            return info_nce(*self.scores(image_tokens, image_mask, text_tokens, text_mask), self.inverse_temperature)
        if image_tokens.shape[1] != cfg.num_patches + 1:
            raise ValueError("the clip+filip loss takes the global vector plus the tokens; encode with "
                             "granularity='both'")
        # One temperature for both terms: both scores are (averages of) cosines in [-1, 1], so one scale fits
        # both, and the checkpoint keeps its single logit_scale (one clamp, one number to log). With a weight of
        # 0 the other term is exactly the pure loss, temperature gradient included.
        total = 0.0
        if cfg.clip_weight:
            cos = image_tokens[:, 0].float() @ text_tokens[:, 0].float().t()  # (B, B) CLS/EOS cosine, as "clip"
            total = total + cfg.clip_weight * info_nce(cos, cos, self.inverse_temperature)
        if cfg.filip_weight:
            total = total + cfg.filip_weight * self._token_loss(image_tokens[:, 1:], image_mask[:, 1:],
                                                                text_tokens[:, 1:], text_mask[:, 1:])
        return total

    def _token_loss(self, image_tokens, image_mask, text_tokens, text_mask) -> torch.Tensor:
        """FILIP's InfoNCE on late-interaction scores, after token selection when token_keep_ratio < 1."""
        ratio = self.config.token_keep_ratio
        if ratio < 1.0:
            image_tokens, image_mask, text_tokens, text_mask = cmli.select_tokens(
                image_tokens, image_mask, text_tokens, text_mask, ratio,
                text_ratio=ratio if self.config.token_keep_text else 1.0)
        s_i2t, s_t2i = self.scores(image_tokens, image_mask, text_tokens, text_mask)
        return info_nce(s_i2t, s_t2i, self.inverse_temperature)

    def loss(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Training loss of a batch of matched (image, caption ids) pairs."""
        return self.contrastive_loss(*self.encode_image(images), *self.encode_text(ids))

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.loss(images, ids)

    @torch.no_grad()
    def pairwise_scores(self, image_tokens, image_mask, text_tokens, text_mask, block: int = 64):
        """(s_i2t, s_t2i) for every image against every text, in blocks of images to bound memory."""
        return pairwise_scores(image_tokens, image_mask, text_tokens, text_mask, impl=self.config.cmli_impl,
                               block=block)

    @torch.no_grad()
    def similarity(self, images: torch.Tensor, ids: torch.Tensor, direction: str = "mean") -> torch.Tensor:
        """Retrieval score (n_images, n_texts). For FILIP, "i2t" / "t2i" pick one late-interaction
        direction and "mean" averages both; for CLIP all three are the cosine."""
        check_direction(direction)
        return pick_direction(*self.pairwise_scores(*self.encode_image(images), *self.encode_text(ids)), direction)


# ---------------------------------------------------------------------- scoring encoded tokens, no model needed
def scores(image_tokens, image_mask, text_tokens, text_mask, impl: str = "auto"):
    """(s_i2t, s_t2i), both (n_images, n_texts): the cosine when both sides are one global token each (CLIP),
    else token-wise late interaction (FILIP, `cmli.late_interaction` with implementation `impl`)."""
    if image_tokens.shape[1] == 1 and text_tokens.shape[1] == 1:  # global vectors: plain cosine
        cos = image_tokens[:, 0].float() @ text_tokens[:, 0].float().t()  # (I, T)
        return cos, cos
    return cmli.late_interaction(image_tokens, image_mask, text_tokens, text_mask, impl=impl)


@torch.no_grad()
def pairwise_scores(image_tokens, image_mask, text_tokens, text_mask, impl: str = "auto", block: int = 64):
    """`scores` for every image against every text, in blocks of `block` images to bound memory."""
    parts = [scores(image_tokens[i:i + block], image_mask[i:i + block], text_tokens, text_mask, impl=impl)
             for i in range(0, image_tokens.shape[0], block)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


DIRECTIONS = ("i2t", "t2i", "mean")


def check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'i2t', 't2i' or 'mean', got {direction!r}")


def pick_direction(s_i2t: torch.Tensor, s_t2i: torch.Tensor, direction: str) -> torch.Tensor:
    """One score matrix: "i2t" (images rank texts by s_i2t), "t2i", or the "mean" of both."""
    check_direction(direction)
    return {"i2t": s_i2t, "t2i": s_t2i, "mean": 0.5 * (s_i2t + s_t2i)}[direction]
