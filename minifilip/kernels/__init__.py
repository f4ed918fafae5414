"""The fast implementations behind `minifilip.cmli.late_interaction`.

- `cmli_chunked`: plain PyTorch, bounded memory, custom arg-max backward (the CPU default).
- `cmli_triton`: one fused Triton kernel per pass (the CUDA default). Optional: `load_triton()` imports it on first
  use and returns None where Triton is missing, so importing minifilip never imports Triton.
"""
from __future__ import annotations

import functools


@functools.cache
def load_triton():
    """The `cmli_triton` module, or None when Triton cannot be imported (CPU-only installs may lack it)."""
    try:
        from . import cmli_triton
    except ImportError:  # pragma: no cover - depends on the install
        return None
    return cmli_triton
