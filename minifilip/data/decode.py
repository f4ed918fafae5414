"""Turning one raw web sample (image bytes + caption bytes) into an RGB image and a caption, or a reason not to.

Web-scraped data is dirty: CC3M downloads contain truncated JPEGs, CMYK and 16-bit files, palette PNGs with
transparency, empty captions and the odd byte string that is not UTF-8. A loader that crashes on the first of
these wastes a night of GPU time, and one that silently drops them hides a broken download. So every sample
goes through `decode_sample`, which either returns a clean (PIL RGB image, caption) or raises `BadSample`
with a short reason; the caller skips it and counts the reason. Samples we can repair (odd colour modes,
tiny images) are kept and counted too, as "converted".

Reasons (keys of the counters shown in the progress bar and metrics.jsonl):
    bad:       decode_error, truncated_tar, unreadable_shard, no_image, no_caption, empty_caption, bad_utf8, too_large
    converted: mode_<MODE> (e.g. mode_CMYK, mode_L, mode_RGBA, mode_P, mode_I;16), upscaled
"""
from __future__ import annotations

import io
import json
import os
import random
from collections import Counter

import numpy as np
from PIL import Image

# The one list of image file extensions (lower case, no dot) for tar members, img2dataset folders and ImageFolder
# trees; when a sample has several, the first one listed wins.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
CAPTION_EXT = "txt"
# Pixel limit checked from the header, before the pixels are decoded: a 20000x20000 "image" would take 1.2 GB
# of RAM in a worker. 89.5M is PIL's own decompression-bomb threshold; CC3M originals are far below it.
DEFAULT_MAX_PIXELS = 89_478_485

BAD_REASONS = ("decode_error", "truncated_tar", "unreadable_shard", "no_image", "no_caption", "empty_caption",
               "bad_utf8", "too_large")


class BadSample(Exception):
    """A sample to skip; `reason` is one of BAD_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def split_counts(counts: dict) -> tuple[dict, dict]:
    """{reason: n} -> (bad reasons, converted reasons)."""
    bad = {k: v for k, v in counts.items() if k in BAD_REASONS}
    return bad, {k: v for k, v in counts.items() if k not in BAD_REASONS}


def decode_captions(blobs: list[bytes]) -> list[str]:
    """All usable captions of a sample. Each blob is one `.txt` member (KEY.txt, KEY.1.txt, ...); a blob holding
    a JSON list of strings counts as several captions (e.g. the paper's back-translated variants)."""
    if not blobs:
        raise BadSample("no_caption")
    captions, undecodable = [], 0
    for blob in blobs:
        try:
            text = blob.decode("utf-8")
        except UnicodeDecodeError:
            undecodable += 1
            continue
        text = text.strip()
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = None
            if isinstance(parsed, list) and all(isinstance(x, str) for x in parsed):
                captions += [" ".join(x.split()) for x in parsed]
                continue
        captions.append(" ".join(text.split()))  # newlines and runs of spaces -> one space
    captions = [c for c in captions if c]
    if not captions:
        raise BadSample("bad_utf8" if undecodable else "empty_caption")
    return captions


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparent pixels become white (their RGB values are often garbage)."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (or 32-bit int) grey: PIL's convert would clip everything above 255 to white; rescale instead
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr * (255.0 / top) + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        img = Image.fromarray(((arr - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def decode_image(data: bytes | str | os.PathLike, min_side: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS,
                 counts: Counter | None = None, draft_side: int = 0) -> Image.Image:
    """Encoded image (bytes or a file path) -> PIL RGB image, or raise BadSample.

    min_side: images whose shorter side is below it are kept (the resize upscales them) but counted "upscaled".
    draft_side: if > 0, a large JPEG is decoded directly at a reduced scale (1/2, 1/4, 1/8) as long as both sides
    stay >= draft_side: the DCT does the downscaling for free, several times faster than decode-then-resize.
    """
    counts = counts if counts is not None else Counter()
    try:
        img = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
    except Image.DecompressionBombError as e:
        raise BadSample("too_large", str(e)) from None
    except FileNotFoundError as e:
        raise BadSample("no_image", str(e)) from None
    except Exception as e:  # UnidentifiedImageError, OSError, ...: not an image we can read
        raise BadSample("decode_error", f"{type(e).__name__}: {e}") from None
    w, h = img.size
    if w * h > max_pixels:  # header only so far: nothing has been decoded yet
        raise BadSample("too_large", f"{w}x{h}")
    if w < 1 or h < 1:
        raise BadSample("decode_error", f"{w}x{h}")
    if min(w, h) < min_side:
        counts["upscaled"] += 1
    if draft_side and img.format == "JPEG":
        img.draft(None, (draft_side, draft_side))
    try:
        img.load()  # the actual decode; a truncated or corrupt JPEG fails here (LOAD_TRUNCATED_IMAGES is off)
    except Image.DecompressionBombError as e:
        raise BadSample("too_large", str(e)) from None
    except Exception as e:
        raise BadSample("decode_error", f"{type(e).__name__}: {e}") from None
    if img.mode != "RGB":
        counts[f"mode_{img.mode}"] += 1
        try:
            img = _to_rgb(img)
        except Exception as e:
            raise BadSample("decode_error", f"cannot convert {img.mode}: {e}") from None
    return img


def decode_sample(image: bytes | str | None, caption_blobs: list[bytes], rng: random.Random | None,
                  min_side: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS, counts: Counter | None = None,
                  draft_side: int = 0) -> tuple[Image.Image, str]:
    """(RGB image, one caption) of a raw sample, or raise BadSample. With several captions, `rng` picks one per
    call (a new choice on every visit); rng=None always takes the first (deterministic evaluation).
    Captions are checked first: that is cheap, the image decode is not."""
    if image is None:
        raise BadSample("no_image")
    captions = decode_captions(caption_blobs)
    caption = captions[0] if rng is None or len(captions) == 1 else rng.choice(captions)
    return decode_image(image, min_side, max_pixels, counts, draft_side), caption
