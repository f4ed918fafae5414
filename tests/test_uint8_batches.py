"""Real-data batches travel as uint8 and are normalised on the device: the same numbers as normalising in the
loader (equivalence against the plain reference, fresh random inputs)."""
import numpy as np
import torch
from PIL import Image

from minifilip.data.sources import train_stream
from minifilip.data.transforms import normalize, normalize_uint8, to_uint8_tensor

from test_data_shards import clean_shards


def test_normalize_uint8_equals_the_loader_normalisation():
    rng = np.random.default_rng(7)
    imgs = [Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)) for _ in range(5)]
    reference = torch.stack([normalize()(im) for im in imgs])  # (B, 3, H, W) float, as the loader made it before
    x = torch.stack([to_uint8_tensor(im) for im in imgs])
    assert x.dtype == torch.uint8 and x.shape == (5, 3, 24, 20)
    got = normalize_uint8(x)
    rel = (got - reference).norm() / reference.norm()
    assert got.dtype == torch.float32 and rel < 1e-6, float(rel)


def test_uint8_stream_gives_the_same_crops_as_the_float_stream(tmp_path):
    spec = clean_shards(tmp_path, n_shards=2, per_shard=3)
    floats = [x for x, *_ in train_stream(spec, 16, seed=2, shuffle_buffer=0, epochs=1)]
    bytes_ = [x for x, *_ in train_stream(spec, 16, seed=2, shuffle_buffer=0, epochs=1, uint8=True)]
    assert bytes_[0].dtype == torch.uint8 and len(floats) == len(bytes_) == 6
    got, ref = normalize_uint8(torch.stack(bytes_)), torch.stack(floats)
    assert float((got - ref).norm() / ref.norm()) < 1e-6
