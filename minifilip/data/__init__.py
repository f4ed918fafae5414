"""Data for minifilip: the built-in grounded dataset and real image-text sources (tar shards, TSV/CSV, folders)."""
from .builtin import BuiltinTrainStream, builtin_val_pairs, find_val_scenes
from .grounded import Scene, render_scene
from .decode import BadSample, decode_image, decode_sample
from .lists import CsvDataset, FolderDataset, IndexStream
from .shards import ShardStream, expand_urls, shard_sizes
from .sources import (CsvOptions, check_source, eval_stream, iter_captions, load_pairs, make_loader, open_stream,
                      train_stream)
from .stream import SampleStream, collate, worker_init_fn
from .transforms import CLIP_MEAN, CLIP_STD, eval_transform, images_to_tensor, train_transform
from .writer import ShardWriter

__all__ = ["BuiltinTrainStream", "builtin_val_pairs", "find_val_scenes", "images_to_tensor", "CLIP_MEAN", "CLIP_STD",
           "Scene", "render_scene",
           "BadSample", "decode_image", "decode_sample", "CsvDataset", "FolderDataset", "IndexStream", "ShardStream",
           "expand_urls", "shard_sizes", "CsvOptions", "check_source", "eval_stream", "iter_captions", "load_pairs",
           "make_loader", "open_stream", "train_stream", "SampleStream", "collate", "worker_init_fn",
           "eval_transform", "train_transform", "ShardWriter"]
