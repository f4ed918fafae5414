"""FILIPConfig: every size and switch of a FILIP model, with named presets.

    cfg = FILIPConfig.preset("tiny")                      # CPU tutorial size
    cfg = FILIPConfig.preset("small", loss="clip")        # any field can be overridden
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


LOSSES = ("filip", "clip", "clip+filip")


@dataclass
class FILIPConfig:
    # --- image tower (ViT) ---
    image_size: int = 64          # input resolution (square), pixels
    patch_size: int = 8           # side of one patch; image_size // patch_size patches per side
    vision_width: int = 128       # transformer width of the image tower
    vision_layers: int = 4        # number of transformer blocks
    vision_heads: int = 4         # attention heads (vision_width must divide evenly)
    # --- text tower (causal, decoder-only transformer) ---
    vocab_size: int = 1024        # set from the tokenizer; [PAD]=0, [BOS]=1, [EOS]=2, [UNK]=3
    context_length: int = 24      # max tokens per caption, [BOS] and [EOS] included
    text_width: int = 128         # transformer width of the text tower
    text_layers: int = 4          # number of transformer blocks
    text_heads: int = 4           # attention heads
    text_causal: bool = True      # FILIP's causal text tower; False = bidirectional (a diagnosis, not the paper's)
    # --- shared ---
    mlp_ratio: float = 4.0        # hidden size of the MLP = mlp_ratio * width
    dropout: float = 0.0          # dropout on attention weights and residual branches (both towers)
    embed_dim: int = 256          # shared image-text space each patch / token is projected to (paper: 256)
    # --- objective ---
    loss: str = "filip"           # "filip": token-wise late interaction; "clip": image CLS vs text EOS cosine;
                                  # "clip+filip": clip_weight * CLIP loss + filip_weight * FILIP loss (SPARC's mix)
    clip_weight: float = 1.0      # weight of the global CLS/EOS InfoNCE term when loss="clip+filip"
    filip_weight: float = 1.0     # weight of the token-wise InfoNCE term when loss="clip+filip"
    text_special_tokens: bool = False  # let [BOS]/[EOS] take part in late interaction (False: words only)
    init_temperature: float = 0.07     # initial softmax temperature tau (learned as logit_scale = log(1/tau))
    min_temperature: float = 0.01      # tau is clamped to >= this (1/tau <= 100) so training cannot blow up
    token_keep_ratio: float = 1.0      # paper's token selection: keep this fraction of tokens (1.0 = off)
    token_keep_text: bool = True       # select text tokens too (the paper's); False: patches only (an ablation)
    cmli_impl: str = "auto"            # late-interaction implementation ("auto", "reference", ...)

    def __post_init__(self):
        positive = ["image_size", "patch_size", "vision_width", "vision_layers", "vision_heads", "vocab_size",
                    "context_length", "text_width", "text_layers", "text_heads", "embed_dim"]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"FILIPConfig.{name} must be a positive integer, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"FILIPConfig.image_size ({self.image_size}) must be divisible by "
                             f"patch_size ({self.patch_size})")
        for tower in ("vision", "text"):
            width, heads = getattr(self, f"{tower}_width"), getattr(self, f"{tower}_heads")
            if width % heads:
                raise ValueError(f"FILIPConfig.{tower}_width ({width}) must be divisible by {tower}_heads ({heads})")
        if self.vocab_size < 5:
            raise ValueError(f"FILIPConfig.vocab_size ({self.vocab_size}) must be at least 5 (4 special tokens + 1)")
        if self.context_length < 3:
            raise ValueError(f"FILIPConfig.context_length ({self.context_length}) must be at least 3 "
                             "([BOS], one word, [EOS])")
        if self.loss not in LOSSES:
            raise ValueError(f"FILIPConfig.loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        for name in ("clip_weight", "filip_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value < math.inf:
                raise ValueError(f"FILIPConfig.{name} must be a finite number >= 0, got {value!r}")
        if self.loss == "clip+filip" and self.clip_weight == 0 and self.filip_weight == 0:
            raise ValueError("FILIPConfig: clip_weight and filip_weight cannot both be 0 (nothing to train)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"FILIPConfig.dropout must be in [0, 1), got {self.dropout}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"FILIPConfig.mlp_ratio must be positive, got {self.mlp_ratio}")
        if not 0.0 < self.min_temperature <= self.init_temperature < 1.0:
            raise ValueError(f"FILIPConfig needs 0 < min_temperature <= init_temperature < 1; "
                             f"got {self.min_temperature} and {self.init_temperature}")
        if not 0.0 < self.token_keep_ratio <= 1.0:
            raise ValueError(f"FILIPConfig.token_keep_ratio must be in (0, 1], got {self.token_keep_ratio}")

    @classmethod
    def parse_overrides(cls, items: list[str] | None, reserved: dict[str, str] | None = None) -> dict:
        """["KEY=VALUE", ...] (train_small.py --set) -> {field: typed value}; a one-line ValueError on any bad item.

        Values are read by the field's type: int, float, bool (true/false/1/0/yes/no) or str. `reserved` maps
        fields that must be set another way to that way (e.g. {"loss": "--loss"}).
        """
        types = {f.name: f.type for f in dataclasses.fields(cls)}
        out = {}
        for item in items or []:
            key, sep, text = item.partition("=")
            key = key.strip()
            if not sep or not key:
                raise ValueError(f"--set takes KEY=VALUE, got {item!r}")
            if key not in types:
                raise ValueError(f"--set: unknown FILIPConfig field {key!r}; known: {', '.join(sorted(types))}")
            if reserved and key in reserved:
                raise ValueError(f"--set {key}: use {reserved[key]} instead")
            out[key] = _parse_value(key, types[key], text.strip())
        return out

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FILIPConfig":
        d = dict(d)
        if "max_logit_scale" in d:  # checkpoints before the temperature vocabulary stored the clamp on 1/tau
            d.setdefault("min_temperature", 1.0 / d.pop("max_logit_scale"))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown FILIPConfig field(s): {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides) -> "FILIPConfig":
        """A named size ("tiny", "small", "base"), with any field overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        fields = {**PRESETS[name], **overrides}
        return cls.from_dict(fields)


def _parse_value(key: str, type_name: str, text: str):
    """A --set value as the field's type (dataclass field types are strings here: `from __future__ import annotations`)."""
    try:
        if type_name == "bool":
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        return {"int": int, "float": float}.get(type_name, str)(text)
    except ValueError:
        raise ValueError(f"--set {key}: {text!r} is not a valid {type_name}") from None


PRESETS: dict[str, dict] = {
    # CPU tutorial size: 64 px, 8x8 patches -> 64 patches, ~1.7M parameters; trains in minutes on a laptop.
    "tiny": dict(image_size=64, patch_size=8, vision_width=128, vision_layers=4, vision_heads=4,
                 context_length=24, text_width=128, text_layers=4, text_heads=4, embed_dim=256),
    # One-GPU CC3M size: ViT-S/16 at 224 px (196 patches) and a 6-layer width-384 text tower.
    "small": dict(image_size=224, patch_size=16, vision_width=384, vision_layers=12, vision_heads=6,
                  context_length=32, text_width=384, text_layers=6, text_heads=6, embed_dim=256, vocab_size=32000),
    # The paper's FILIP-base: ViT-B/32 image tower, 12-layer width-512 text tower, context 77, shared dim 256.
    "base": dict(image_size=224, patch_size=32, vision_width=768, vision_layers=12, vision_heads=12,
                 context_length=77, text_width=512, text_layers=12, text_heads=8, embed_dim=256, vocab_size=49408),
}
