import os
import zlib

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout (pytest.ini puts it on sys.path)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh but reproducible random inputs per test: the seed depends on the test's name only.

    crc32, not hash(): Python salts str hashes per process, so hash() would change the inputs on every run and a
    rare failure could never be replayed.
    """
    torch.manual_seed(stable_seed(request.node.nodeid))
    yield


@pytest.fixture
def one_thread():
    """Torch on one thread for this test: a tiny step on a busy 2-core box is faster that way."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def stable_seed(nodeid: str) -> int:
    """The torch seed of one test: the same on every run, machine and Python process."""
    return zlib.crc32(nodeid.encode("utf-8")) % (2 ** 31)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))
