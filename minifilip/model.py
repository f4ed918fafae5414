"""FILIP: a dual-stream model trained with token-wise cross-modal late interaction.

    model = FILIP(FILIPConfig.preset("tiny", vocab_size=len(tokenizer)))
    img, img_mask = model.encode_image(images)      # (B, N, D) unit vectors, CLS excluded
    txt, txt_mask = model.encode_text(ids)          # (B, L, D) unit vectors, padding masked out
    loss = model.contrastive_loss(img, img_mask, txt, txt_mask)

With `config.loss = "clip"` the same towers train CLIP-style: `encode_image` then returns the [CLS] embedding
and `encode_text` the [EOS] embedding (one token each), and the score is their cosine. That makes the two
objectives comparable at equal compute, and lets gradient caching treat them alike.
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
        # learn log(1/tau) so the temperature stays positive; 1/tau starts at 1/0.07
        self.logit_scale = nn.Parameter(torch.tensor(config.init_logit_scale))
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
        granularity = granularity or ("global" if self.config.loss == "clip" else "tokens")
        if granularity not in ("tokens", "global"):
            raise ValueError(f"granularity must be 'tokens' or 'global', got {granularity!r}")
        return granularity

    def encode_image(self, images: torch.Tensor, granularity: str | None = None):
        """images (B, 3, H, W) -> (tokens (B, N, D) unit vectors, mask (B, N) bool).

        granularity "tokens": the N patch embeddings (CLS excluded); "global": the CLS embedding (N = 1).
        Default: "tokens" for the FILIP loss, "global" for the CLIP loss.
        """
        size = self.config.image_size
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[2] != size or images.shape[3] != size:
            raise ValueError(f"images must have shape (B, 3, {size}, {size}), got {tuple(images.shape)}")
        x = self.visual(images)  # (B, 1 + N, D)
        x = x[:, :1] if self._granularity(granularity) == "global" else x[:, 1:]
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
        `config.text_special_tokens`); "global": the last non-padding token, normally [EOS] (L = 1).
        """
        if ids.dim() != 2 or ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"ids must be a 2-D integer tensor (B, L), got {tuple(ids.shape)} {ids.dtype}")
        if ids.shape[1] > self.config.context_length:
            raise ValueError(f"captions have {ids.shape[1]} tokens; the model's context_length is "
                             f"{self.config.context_length}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.config.vocab_size}); is the tokenizer the model's?")
        x = self.text(ids)  # (B, L, D)
        if self._granularity(granularity) == "global":
            last = ((ids != PAD_ID).sum(dim=1) - 1).clamp(min=0)  # (B,) index of [EOS]
            x = x[torch.arange(x.shape[0], device=x.device), last][:, None]  # (B, 1, D)
            return _unit(x), torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return _unit(x), self.text_mask(ids)

    # ------------------------------------------------------------------ scores and loss
    @property
    def temperature_scale(self) -> torch.Tensor:
        """1 / temperature, clamped to config.max_logit_scale."""
        return self.logit_scale.clamp(max=math.log(self.config.max_logit_scale)).exp()

    def scores(self, image_tokens, image_mask, text_tokens, text_mask, impl: str | None = None):
        """(s_i2t, s_t2i), both (n_images, n_texts), for already-encoded inputs of either granularity."""
        if image_tokens.shape[1] == 1 and text_tokens.shape[1] == 1:  # global vectors: plain cosine
            cos = image_tokens[:, 0].float() @ text_tokens[:, 0].float().t()  # (I, T)
            return cos, cos
        return cmli.late_interaction(image_tokens, image_mask, text_tokens, text_mask,
                                     impl=impl or self.config.cmli_impl)

    def contrastive_loss(self, image_tokens, image_mask, text_tokens, text_mask) -> torch.Tensor:
        """Symmetric InfoNCE over the batch, on already-encoded (B, N, D) / (B, M, D) tokens."""
        if image_tokens.shape[0] != text_tokens.shape[0]:
            raise ValueError(f"contrastive_loss needs matched pairs: {image_tokens.shape[0]} images vs "
                             f"{text_tokens.shape[0]} texts")
        if self.config.loss == "clip" and (image_tokens.shape[1] != 1 or text_tokens.shape[1] != 1):
            raise ValueError("the CLIP loss takes one global token per side; encode with granularity='global'")
        ratio = self.config.token_keep_ratio
        if self.config.loss == "filip" and ratio < 1.0:
            image_tokens, image_mask, text_tokens, text_mask = cmli.select_tokens(
                image_tokens, image_mask, text_tokens, text_mask, ratio,
                text_ratio=ratio if self.config.token_keep_text else 1.0)
        s_i2t, s_t2i = self.scores(image_tokens, image_mask, text_tokens, text_mask)
        return info_nce(s_i2t, s_t2i, self.temperature_scale)

    def loss(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Training loss of a batch of matched (image, caption ids) pairs."""
        return self.contrastive_loss(*self.encode_image(images), *self.encode_text(ids))

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.loss(images, ids)

    @torch.no_grad()
    def pairwise_scores(self, image_tokens, image_mask, text_tokens, text_mask, block: int = 64):
        """(s_i2t, s_t2i) for every image against every text, in blocks of images to bound memory."""
        parts = [self.scores(image_tokens[i:i + block], image_mask[i:i + block], text_tokens, text_mask)
                 for i in range(0, image_tokens.shape[0], block)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    @torch.no_grad()
    def similarity(self, images: torch.Tensor, ids: torch.Tensor, direction: str = "mean") -> torch.Tensor:
        """Retrieval score (n_images, n_texts). For FILIP, "i2t" / "t2i" pick one late-interaction
        direction and "mean" averages both; for CLIP all three are the cosine."""
        s_i2t, s_t2i = self.pairwise_scores(*self.encode_image(images), *self.encode_text(ids))
        if direction not in ("mean", "i2t", "t2i"):
            raise ValueError(f"direction must be 'mean', 'i2t' or 't2i', got {direction!r}")
        return {"i2t": s_i2t, "t2i": s_t2i, "mean": 0.5 * (s_i2t + s_t2i)}[direction]
