"""WordTokenizer: a small, transparent word-level tokenizer.

Lower-cases, splits into words and punctuation marks, and maps each to an id. Every caption becomes
[BOS] w1 w2 ... wn [EOS] [PAD] ... so that "a photo of a balloon." is the paper's 8 tokens
([BOS] a photo of a balloon . [EOS]) with "balloon" at index 5.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Iterable

import torch

PAD, BOS, EOS, UNK = "[PAD]", "[BOS]", "[EOS]", "[UNK]"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

# a word (letters/digits, optionally with an apostrophe part like "dog's") or one punctuation character
_WORD_RE = re.compile(r"[^\W_]+(?:'[^\W_]+)?|[^\w\s]|_")


def split_words(text: str) -> list[str]:
    """Lower-case and split a caption into word and punctuation tokens."""
    return _WORD_RE.findall(text.lower())


class _class_only(classmethod):
    """A classmethod that refuses to be called on an instance: `tok.fit(captions)` would build a new tokenizer
    and throw it away, leaving `tok` empty without a word, so it raises instead."""

    def __get__(self, instance, owner=None):
        if instance is not None:
            raise TypeError(f"{self.__func__.__name__} builds a new tokenizer; call it on the class: "
                            f"tok = WordTokenizer.{self.__func__.__name__}(...)")
        return super().__get__(instance, owner)


class WordTokenizer:
    """Word-level vocabulary with [PAD]=0, [BOS]=1, [EOS]=2, [UNK]=3."""

    def __init__(self, words: Iterable[str] = ()):
        self.itos: list[str] = list(SPECIAL_TOKENS)
        for w in words:
            if w not in SPECIAL_TOKENS:
                self.itos.append(w)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("tokenizer vocabulary has duplicate words")

    def __len__(self) -> int:
        return len(self.itos)

    @_class_only
    def fit(cls, captions: Iterable[str], max_size: int = 50_000, min_count: int = 1) -> "WordTokenizer":
        """Build a vocabulary from captions: the most frequent words seen at least `min_count` times,
        at most `max_size` entries in total (special tokens included). Ties break alphabetically."""
        if max_size <= len(SPECIAL_TOKENS):
            raise ValueError(f"max_size must exceed {len(SPECIAL_TOKENS)} (the special tokens), got {max_size}")
        counts = Counter()
        for caption in captions:
            counts.update(split_words(caption))
        ranked = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(ranked[: max_size - len(SPECIAL_TOKENS)])

    def encode(self, texts: str | list[str], context_length: int) -> torch.Tensor:
        """(B, context_length) LongTensor of [BOS] ids [EOS] then [PAD]=0. Over-long captions are cut,
        keeping [EOS] as the last token. A single string gives B=1."""
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 3:
            raise ValueError(f"context_length must be at least 3, got {context_length}")
        out = torch.full((len(texts), context_length), PAD_ID, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.stoi.get(w, UNK_ID) for w in split_words(text)][: context_length - 2]
            ids = [BOS_ID, *ids, EOS_ID]
            out[row, : len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids, skip_special: bool = True) -> str:
        """Ids (a 1-D tensor or list) back to text; punctuation re-attached to the preceding word."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        words = [self.itos[i] if 0 <= i < len(self.itos) else UNK for i in ids]
        if skip_special:
            words = [w for w in words if w not in (PAD, BOS, EOS)]
        text = " ".join(words)
        return re.sub(r" ([^\w\s\[])", r"\1", text)

    def tokens(self, text: str, context_length: int) -> list[str]:
        """The token strings of one caption as the model sees them (no padding); for plots."""
        ids = self.encode(text, context_length)[0]
        return [self.itos[i] for i in ids.tolist() if i != PAD_ID]

    # --- persistence: plain JSON, also embeddable in a weights_only checkpoint ---
    def to_dict(self) -> dict:
        return {"type": "WordTokenizer", "itos": list(self.itos)}

    @classmethod
    def from_dict(cls, d: dict) -> "WordTokenizer":
        itos = d.get("itos") if isinstance(d, dict) else None
        if not itos or itos[: len(SPECIAL_TOKENS)] != SPECIAL_TOKENS:
            raise ValueError("not a WordTokenizer vocabulary (missing or reordered special tokens)")
        return cls(itos[len(SPECIAL_TOKENS):])

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, ensure_ascii=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "WordTokenizer":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))
