"""The fast implementations behind `minifilip.cmli.late_interaction`.

- `cmli_chunked`: plain PyTorch, bounded memory, custom arg-max backward (the CPU default).
- `cmli_triton`: one fused Triton kernel per pass (the CUDA default). Optional: `load_triton()` imports it on first
  use and returns None where Triton is missing, so importing minifilip never imports Triton.
- `ranking_triton`: token selection's ranking (row and column maxima of the flat score matrix) in one Triton kernel,
  behind `cmli.token_max_similarity(impl=...)`; loaded the same way by `load_ranking_triton()`.
"""
from __future__ import annotations

import functools
import importlib


@functools.cache
def _load(name: str):
    """Import kernels.<name> on first use, or None when Triton cannot be imported (CPU-only installs may lack it)."""
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ImportError:  # pragma: no cover - depends on the install
        return None


def load_triton():
    """The `cmli_triton` module, or None when Triton cannot be imported."""
    return _load("cmli_triton")


def load_ranking_triton():
    """The `ranking_triton` module, or None when Triton cannot be imported."""
    return _load("ranking_triton")
