"""Checkpoints: state_dict + config + tokenizer in one file, written atomically.

The file holds only tensors and plain Python values, so it loads with `torch.load(..., weights_only=True)`:
no pickled code runs when you open a checkpoint someone sent you. Saving writes a temporary file in the same
folder, flushes it to disk, then renames it over the old one; a rename is atomic, so a run killed while
saving leaves the previous checkpoint intact, never half a file.
"""
from __future__ import annotations

import os
import pickle
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
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the permissions any other run file gets
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read the umask is to set it and put it back
    os.umask(mask)
    return mask


def save_checkpoint(path, model: FILIP, tokenizer: WordTokenizer, **extra) -> None:
    """Write {"model", "config", "tokenizer", **extra} atomically. extra: step, optimizer, args, ..."""
    state = {"model": model.state_dict(), "config": model.config.to_dict(), "tokenizer": tokenizer.to_dict()}
    atomic_torch_save({**state, **extra}, path)


def _load_failure(e: Exception) -> str:
    """Why torch.load failed, in a few words. torch's own message advises retrying with weights_only=False:
    wrong advice for a file from elsewhere, so it is dropped."""
    text = str(e)
    if isinstance(e, pickle.UnpicklingError) and "can still be loaded" in text:
        return "it holds pickled Python objects, which minifilip never loads: they could run code"
    if "WeightsUnpickler error:" in text:
        detail = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()
        return f"not a torch checkpoint: {detail[0] if detail else 'unreadable'}"
    lines = [line for line in text.strip().splitlines() if "weights_only" not in line]
    return f"{type(e).__name__}: {lines[0].strip()}" if lines else type(e).__name__


def load_checkpoint(path, map_location="cpu") -> dict:
    """The raw checkpoint dict, loaded with weights_only=True."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated, foreign or unsafe file
        raise ValueError(f"{path} is not a readable minifilip checkpoint ({_load_failure(e)})") from None
    if not isinstance(ckpt, dict) or not {"model", "config", "tokenizer"} <= set(ckpt):
        raise ValueError(f"{path} is not a minifilip checkpoint (needs model, config and tokenizer)")
    return ckpt


def checked_config(ckpt: dict, path) -> FILIPConfig:
    """The checkpoint's config, after checking that its weights fit it - before anything is allocated.

    The model is built on the meta device (shapes only, no memory), so a crafted file whose config asks for a
    50 GB model costs nothing; its state_dict must then have exactly the model's keys and shapes."""
    if not isinstance(ckpt["config"], dict) or not isinstance(ckpt["model"], dict):
        raise ValueError(f"{path} is not a minifilip checkpoint (config and model must be dicts)")
    try:
        config = FILIPConfig.from_dict(ckpt["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad config ({e})") from None
    with torch.device("meta"):
        expected = {k: v.shape for k, v in FILIP(config).state_dict().items()}
    weights = ckpt["model"]
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path}: the weights do not fit the checkpoint's config (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    for key, shape in expected.items():
        value = weights[key]
        if not isinstance(value, torch.Tensor) or value.shape != shape:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{path}: the weights do not fit the checkpoint's config ({key} is {got}, "
                             f"the config needs {tuple(shape)})")
    return config


def load_model(path, map_location="cpu") -> tuple[FILIP, WordTokenizer, dict]:
    """(model in eval mode, tokenizer, raw checkpoint dict) from a checkpoint file."""
    ckpt = load_checkpoint(path, map_location)
    model = FILIP(checked_config(ckpt, path))
    model.load_state_dict(ckpt["model"])
    return model.eval(), WordTokenizer.from_dict(ckpt["tokenizer"]), ckpt
