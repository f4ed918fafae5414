"""Checkpoints: state_dict + config + tokenizer in one file, written atomically.

The file holds only tensors and plain Python values, so it loads with `torch.load(..., weights_only=True)`:
no pickled code runs when you open a checkpoint someone sent you. Saving writes a temporary file in the same
folder, flushes it to disk, then renames it over the old one; a rename is atomic, so a run killed while
saving leaves the previous checkpoint intact, never half a file.
"""
from __future__ import annotations

import os
import tempfile

import torch

from .config import FILIPConfig
from .model import FILIP
from .tokenizer import WordTokenizer


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """torch.save to `path` via temp file + fsync + rename."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_checkpoint(path, model: FILIP, tokenizer: WordTokenizer, **extra) -> None:
    """Write {"model", "config", "tokenizer", **extra} atomically. extra: step, optimizer, args, ..."""
    state = {"model": model.state_dict(), "config": model.config.to_dict(), "tokenizer": tokenizer.to_dict()}
    atomic_torch_save({**state, **extra}, path)


def load_checkpoint(path, map_location="cpu") -> dict:
    """The raw checkpoint dict, loaded with weights_only=True."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated or foreign file
        raise ValueError(f"{path} is not a readable minifilip checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or not {"model", "config", "tokenizer"} <= set(ckpt):
        raise ValueError(f"{path} is not a minifilip checkpoint (needs model, config and tokenizer)")
    return ckpt


def load_model(path, map_location="cpu") -> tuple[FILIP, WordTokenizer, dict]:
    """(model in eval mode, tokenizer, raw checkpoint dict) from a checkpoint file."""
    ckpt = load_checkpoint(path, map_location)
    model = FILIP(FILIPConfig.from_dict(ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.eval(), WordTokenizer.from_dict(ckpt["tokenizer"]), ckpt
