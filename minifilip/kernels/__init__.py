"""Optional fused kernels. Importing this package never fails: `TRITON_AVAILABLE` says whether Triton loaded."""
try:  # Triton ships with the CUDA torch wheels; CPU-only installs may lack it.
    from . import cmli_triton  # noqa: F401
    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the install
    cmli_triton = None
    TRITON_AVAILABLE = False
