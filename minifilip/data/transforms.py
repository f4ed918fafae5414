"""Image transforms: the paper's training augmentation, a plain evaluation resize, and CLIP's normalisation.

FILIP trains with random resized crops plus AutoAugment (Sec. 4 of the paper); evaluation uses the usual
resize of the shorter side + center crop. Every source ends with CLIP's normalisation (the built-in dataset's
uint8 arrays through `images_to_tensor`, real photos through `normalize`), so a checkpoint is interchangeable
between sources.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torchvision import transforms as T

from .decode import BadSample, decode_image

# CLIP's normalisation constants, used for every source so checkpoints are interchangeable
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# smallest crop area as a fraction of the image: CLIP-style (0.9-1.0) keeps objects whole, ImageNet-style (0.08)
# often cuts away what the caption talks about; half the image is a middle ground for captioned photos
TRAIN_CROP_SCALE = (0.5, 1.0)


def normalize() -> T.Compose:
    """PIL RGB -> float (3, H, W) tensor, CLIP-normalised."""
    return T.Compose([T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


def images_to_tensor(images: np.ndarray | list[np.ndarray]) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W), CLIP-normalised (for arrays: the built-in scenes, loaded files)."""
    x = torch.from_numpy(np.ascontiguousarray(np.stack(images))).permute(0, 3, 1, 2).float() / 255.0
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def to_uint8_tensor(img) -> torch.Tensor:
    """PIL RGB -> uint8 (3, H, W) tensor, no arithmetic: the float conversion and normalisation are left to
    `normalize_uint8`, on the training device (a quarter of the bytes to move, and less work per loader worker)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W) view


def normalize_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) on any device -> float, CLIP-normalised: the same arithmetic as normalize() (x / 255,
    minus the mean, over the std, in fp32), so a batch normalised here equals one normalised in the loader."""
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return x.float().div(255).sub(mean).div(std)


def train_transform(image_size: int, autoaugment: bool = True, scale=TRAIN_CROP_SCALE,
                    uint8: bool = False) -> T.Compose:
    """RandomResizedCrop + (optionally) AutoAugment with the ImageNet policy + normalisation (uint8: a uint8
    tensor instead, to be normalised on the device with normalize_uint8)."""
    steps = [T.RandomResizedCrop(image_size, scale=scale, interpolation=T.InterpolationMode.BICUBIC)]
    if autoaugment:
        steps.append(T.AutoAugment(T.AutoAugmentPolicy.IMAGENET))
    return T.Compose(steps + [to_uint8_tensor if uint8 else normalize()])


def eval_transform(image_size: int) -> T.Compose:
    """Resize the shorter side to image_size, center crop, normalise: deterministic."""
    return T.Compose([resize_center_crop(image_size), normalize()])


def resize_center_crop(image_size: int) -> T.Compose:
    """The geometric part of eval_transform: shorter side to image_size (bicubic), then a center crop."""
    return T.Compose([T.Resize(image_size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(image_size)])


def load_image(path: str, image_size: int) -> np.ndarray:
    """One image file as evaluation sees it: decoded like training data (16-bit rescaled, transparency on
    white, CMYK/palette converted; see decode.decode_image), resized and center-cropped -> (S, S, 3) uint8."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no image at {path}")
    try:
        img = decode_image(path)
    except BadSample as e:  # one line, e.g. "too_large: 30000x30000" for a decompression bomb
        raise ValueError(f"cannot read image {path} ({e})") from None
    return np.asarray(resize_center_crop(image_size)(img), dtype=np.uint8)


def draft_side_for(image_size: int, train: bool) -> int:
    """How small a JPEG may be decoded (see decode_image's draft_side) without losing detail the crop needs:
    a random crop of area fraction scale[0] must still cover image_size pixels per side."""
    if not train:
        return image_size
    return int(image_size / TRAIN_CROP_SCALE[0] ** 0.5) + 1


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of normalize() for looking at a batch: (..., 3, H, W) -> values in [0, 1]."""
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(3, 1, 1)
    return (x * std + mean).clamp(0, 1)
