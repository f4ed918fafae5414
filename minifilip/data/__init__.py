"""Data for minifilip: the built-in grounded dataset and (later) real image-text sources."""
from .builtin import BuiltinTrainStream, builtin_val_pairs, images_to_tensor, CLIP_MEAN, CLIP_STD
from .grounded import Scene, render_scene

__all__ = ["BuiltinTrainStream", "builtin_val_pairs", "images_to_tensor", "CLIP_MEAN", "CLIP_STD",
           "Scene", "render_scene"]
