"""flashmla_ops: DeepSeek MLA (multi-head latent attention) paged decode as ``torch.ops.flashmla`` custom ops.

Import order matters:

1. ``_schema`` defines the op schemas (``torch.library.Library("flashmla", "DEF")``);
2. ``_C``, the compiled CUDA extension, registers the CUDA kernels. It is optional: a build with
   ``FLASHMLA_ENABLE_CUDA=OFF`` (or without nvcc) has none, and the CUDA kernels are then stubs that raise
   ``NotImplementedError`` explaining how to rebuild;
3. ``meta`` registers the fake kernels (``FakeTensor``, ``meta`` device, ``torch.compile``);
4. ``reference`` registers the pure-PyTorch CPU kernels;
5. ``ops`` is the public API (a drop-in for FlashMLA's ``flash_mla`` Python API).

Importing the package never touches a GPU.
"""

from __future__ import annotations

import importlib

import torch

from . import _schema

_C_IMPORT_ERROR: str | None
try:
    # import_module (rather than `from . import _C`) keeps the error text plain: "No module named ...".
    importlib.import_module(f"{__name__}._C")
except ImportError as e:
    _C_IMPORT_ERROR = f"{type(e).__name__}: {e}"
else:
    _C_IMPORT_ERROR = None

from . import meta, reference  # noqa: E402, F401  (registrations: fakes, then CPU kernels)
from ._validation import FlashMLAInputError  # noqa: E402
from .ops import flash_mla_with_kvcache, get_mla_metadata, workspace_size  # noqa: E402

try:
    from importlib.metadata import PackageNotFoundError, version

    __version__ = version("flashmla_ops")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "FlashMLAInputError",
    "__version__",
    "cuda_extension_available",
    "flash_mla_with_kvcache",
    "get_mla_metadata",
    "workspace_size",
]


def cuda_extension_available() -> bool:
    """True if the compiled CUDA extension (``flashmla_ops._C``) was imported. Does not query a GPU."""
    return _C_IMPORT_ERROR is None


def _missing_cuda_message(op: str) -> str:
    return (
        f"flashmla: torch.ops.flashmla.{op} was called on CUDA tensors, but flashmla_ops was built without "
        f"its CUDA extension (flashmla_ops._C could not be imported: {_C_IMPORT_ERROR}). Rebuild it on a "
        "machine with the CUDA toolkit (nvcc) on the PATH: `pip install --no-deps nvidia-cutlass==4.2.0.0`, "
        "then `FLASHMLA_ENABLE_CUDA=ON pip install --no-build-isolation .`"
    )


def _register_missing_cuda_kernels() -> None:
    for op in _schema.SCHEMAS:

        def _missing(*args: object, _op: str = op, **kwargs: object) -> None:
            raise NotImplementedError(_missing_cuda_message(_op))

        torch.library.register_kernel(f"{_schema.NAMESPACE}::{op}", "cuda", _missing)


if _C_IMPORT_ERROR is not None:
    _register_missing_cuda_kernels()
