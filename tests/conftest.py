import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout (pytest.ini puts it on sys.path)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh but reproducible random inputs per test (the seed depends on the test's name)."""
    torch.manual_seed(abs(hash(request.node.nodeid)) % (2 ** 31))
    yield


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))
