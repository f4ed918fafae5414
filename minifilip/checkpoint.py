"""Checkpoints: state_dict + config + tokenizer in one file, written atomically.

The file holds only tensors and plain Python values, so it loads with `torch.load(..., weights_only=True)`:
no pickled code runs when you open a checkpoint someone sent you. Saving writes a temporary file in the same
folder, flushes it to disk, then renames it over the old one; a rename is atomic, so a run killed while
saving leaves the previous checkpoint intact, never half a file.
"""
from __future__ import annotations

import os
import re
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


def load_checkpoint(path, map_location="cpu") -> dict:
    """The raw checkpoint dict, loaded with weights_only=True."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated or foreign file, or one with pickled code in it
        raise _load_error(path, e) from e
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


# torch's own weights_only message spans lines and suggests weights_only=False; these lines of it are boilerplate
_TORCH_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _load_error(path, e: Exception) -> ValueError:
    """One line on why torch.load refused `path`: the pickled callable it would have run, or the read error."""
    text = str(e)
    refused = re.search(r"GLOBAL ([\w.]+)", text)  # weights_only met a pickled class or function
    if refused:
        return ValueError(f"{path} is not a minifilip checkpoint: it holds a pickled Python object "
                          f"({refused.group(1)}), and loading it could run code, so it was not loaded")
    lines = [line.strip() for line in text.splitlines()  # torch's "retry with weights_only=False" is wrong advice here
             if line.strip() and not line.startswith(_TORCH_BOILERPLATE) and "weights_only" not in line]
    reason = lines[0] if lines else "unknown error"
    return ValueError(f"{path} is not a readable minifilip checkpoint ({type(e).__name__}: {reason})")


def load_model(path, map_location="cpu") -> tuple[FILIP, WordTokenizer, dict]:
    """(model in eval mode, tokenizer, raw checkpoint dict) from a checkpoint file."""
    ckpt = load_checkpoint(path, map_location)
    model = FILIP(checked_config(ckpt, path))
    model.load_state_dict(ckpt["model"])
    return model.eval(), WordTokenizer.from_dict(ckpt["tokenizer"]), ckpt
