"""The two towers of FILIP: a ViT image encoder and a causal (decoder-only) text encoder.

Both share one pre-LN transformer `Block`, attend through `scaled_dot_product_attention`, and end with a
per-token linear projection to the shared `embed_dim` space. L2 normalisation happens in `FILIP`.

Axis names in the einops patterns: b batch, t sequence positions, h heads, d head dim, c colour channels,
rows / cols patches per image side, p1 / p2 pixels within a patch, width the transformer width.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat

from .config import FILIPConfig
from .tokenizer import PAD_ID


class Attention(nn.Module):
    """Multi-head self-attention; `causal=True` lets each token see only itself and earlier tokens."""

    def __init__(self, width: int, heads: int, dropout: float, causal: bool):
        super().__init__()
        self.heads, self.causal, self.dropout = heads, causal, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:  # x: (B, T, C)
        """key_mask (B, T) bool, optional: the keys every query may attend to (False = padding)."""
        q, k, v = rearrange(self.qkv(x), "b t (three h d) -> three b h t d", three=3, h=self.heads)  # (B, h, T, d)
        attn_mask = None if key_mask is None else rearrange(key_mask, "b t -> b 1 1 t")
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=self.causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(rearrange(y, "b h t d -> b t (h d)"))  # (B, T, C)


class Block(nn.Module):
    """Pre-LN transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float, causal: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, dropout, causal)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:  # (B, T, C)
        x = x + self.drop(self.attn(self.ln_1(x), key_mask))
        return x + self.drop(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    """A stack of `Block`s followed by a final LayerNorm."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, dropout: float, causal: bool):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, dropout, causal) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, key_mask)
        return self.ln_final(x)


class VisionEncoder(nn.Module):
    """ViT: patchify, project, prepend a learned [CLS], add learned positions, transform, project per token.

    forward(images (B, 3, H, W)) -> (B, 1 + N, embed_dim), token 0 is [CLS]; not normalised.
    """

    def __init__(self, cfg: FILIPConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        self.patch_embed = nn.Linear(3 * cfg.patch_size ** 2, cfg.vision_width)
        self.cls = nn.Parameter(torch.randn(cfg.vision_width) * 0.02)
        self.pos = nn.Parameter(torch.randn(1 + cfg.num_patches, cfg.vision_width) * 0.02)
        self.ln_pre = nn.LayerNorm(cfg.vision_width)
        self.drop = nn.Dropout(cfg.dropout)
        self.transformer = Transformer(cfg.vision_width, cfg.vision_layers, cfg.vision_heads, cfg.mlp_ratio,
                                       cfg.dropout, causal=False)
        self.proj = nn.Linear(cfg.vision_width, cfg.embed_dim, bias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        patches = rearrange(images, "b c (rows p1) (cols p2) -> b (rows cols) (p1 p2 c)", p1=p, p2=p)  # (B, N, 3*p*p)
        x = self.patch_embed(patches)  # (B, N, C)
        cls = repeat(self.cls, "width -> b 1 width", b=x.shape[0])
        x = torch.cat([cls, x], dim=1) + self.pos  # (B, 1 + N, C)
        x = self.transformer(self.drop(self.ln_pre(x)))
        return self.proj(x)  # (B, 1 + N, D)


class TextEncoder(nn.Module):
    """Causal text transformer: token + position embeddings, causal blocks, per-token projection.

    forward(ids (B, L)) -> (B, L, embed_dim); not normalised. Padding sits after [EOS], so a causal mask
    alone keeps every real token from seeing it. With `config.text_causal=False` (a diagnosis, not FILIP's tower)
    every token sees the whole caption and a key mask hides the padding instead.
    """

    def __init__(self, cfg: FILIPConfig):
        super().__init__()
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.pos = nn.Parameter(torch.randn(cfg.context_length, cfg.text_width) * 0.01)
        self.drop = nn.Dropout(cfg.dropout)
        self.causal = cfg.text_causal
        self.transformer = Transformer(cfg.text_width, cfg.text_layers, cfg.text_heads, cfg.mlp_ratio,
                                       cfg.dropout, causal=cfg.text_causal)
        self.proj = nn.Linear(cfg.text_width, cfg.embed_dim, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embed(ids) + self.pos[: ids.shape[1]]  # (B, L, C)
        key_mask = None if self.causal else ids != PAD_ID  # (B, L); causal: padding is never seen anyway
        return self.proj(self.transformer(self.drop(x), key_mask))  # (B, L, D)
