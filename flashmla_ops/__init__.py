"""flashmla_ops: DeepSeek MLA (multi-head latent attention) paged decode as ``torch.ops.flashmla`` custom ops.

Import order matters:

1. ``_schema`` defines the op schemas (``torch.library.Library("flashmla", "DEF")``);
2. ``_C``, the compiled CUDA extension, registers the CUDA kernels. It is optional: a build with
   ``FLASHMLA_ENABLE_CUDA=OFF`` (or without nvcc) has none, and the CUDA kernels are then stubs that raise
   ``NotImplementedError`` explaining how to rebuild. The FP8 ops (``_schema.FP8_OPS``) get a stub saying
   that their sm_90a kernels are not built in this version whenever ``_C`` registered no CUDA kernel for
   them, so a later extension that does takes over without a change here;
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

try:
    from . import meta  # noqa: E402, F401  (registrations: the fakes; installed from meta/ at the top level)
except ImportError as e:  # the source folder, not the installed package, is first on sys.path
    raise ImportError(
        "flashmla_ops: this is the source tree (its meta/ and integration/ join the package only when it is "
        "installed). Install it (`pip install .`), then import flashmla_ops from another directory."
    ) from e
from . import reference  # noqa: E402, F401  (registrations: the CPU kernels)
from ._validation import FlashMLAInputError  # noqa: E402
from .fp8 import dequantize_kv_cache, quantize_kv_cache  # noqa: E402
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
    "dequantize_kv_cache",
    "flash_mla_with_kvcache",
    "get_mla_metadata",
    "quantize_kv_cache",
    "workspace_size",
]


def cuda_extension_available() -> bool:
    """True if the compiled CUDA extension (``flashmla_ops._C``) was imported. Does not query a GPU."""
    return _C_IMPORT_ERROR is None


def _missing_cuda_message(op: str) -> str:
    return (
        f"flashmla: torch.ops.flashmla.{op} was called on CUDA tensors, but flashmla_ops was built without "
        f"its CUDA extension (flashmla_ops._C could not be imported: {_C_IMPORT_ERROR}). Rebuild it on a "
        "machine with the CUDA toolkit (nvcc >= 12.3) on the PATH: `pip install .` from the source tree, "
        "or, against your own torch, `pip install scikit-build-core 'cmake>=3.26' ninja` and "
        "`pip install --no-deps nvidia-cutlass==4.2.0.0`, then "
        "`FLASHMLA_ENABLE_CUDA=ON pip install --no-build-isolation .`"
    )


def _fp8_not_built_message(op: str) -> str:
    if _C_IMPORT_ERROR is None:
        why = "the compiled extension (flashmla_ops._C) registers no CUDA kernel for it"
    else:
        why = f"flashmla_ops was built without its CUDA extension (flashmla_ops._C: {_C_IMPORT_ERROR})"
    return (
        f"flashmla: FP8 KV-cache kernels for sm_90a are not built in this version; torch.ops.flashmla.{op} "
        f"was called on CUDA tensors and {why}. The FP8 ops run on CPU tensors (the reference "
        "implementation); on the GPU, decode a dequantised cache instead: "
        "flashmla_ops.dequantize_kv_cache(k_cache, k_scale).to(q.dtype) with is_fp8_kvcache=False"
    )


def _has_cuda_kernel(op: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"{_schema.NAMESPACE}::{op}", "CUDA")


def _register_cuda_stub(op: str, message: str) -> None:
    def _stub(*args: object, **kwargs: object) -> None:
        raise NotImplementedError(message)

    torch.library.register_kernel(f"{_schema.NAMESPACE}::{op}", "cuda", _stub)


def _register_missing_cuda_kernels() -> frozenset[str]:
    """A raising CUDA stub for each op the compiled extension (if loaded) registered no CUDA kernel for."""
    stubbed = []
    for op in _schema.SCHEMAS:
        if _has_cuda_kernel(op):
            continue
        if op in _schema.FP8_OPS:
            _register_cuda_stub(op, _fp8_not_built_message(op))
        elif _C_IMPORT_ERROR is not None:
            _register_cuda_stub(op, _missing_cuda_message(op))
        else:  # a loaded extension without a dense kernel: leave PyTorch's "no CUDA kernel" error
            continue
        stubbed.append(op)
    return frozenset(stubbed)


#: Ops whose CUDA kernel is a Python stub (the others have the compiled extension's kernel).
_CUDA_STUB_OPS = _register_missing_cuda_kernels()
