"""The ``flashmla_ops`` SGLang attention backend: SGLang's ``FlashMLABackend`` running flashmla_ops kernels.

Built lazily by :func:`get_backend_class` (called from the plugin's factory in SGLang's scheduler process),
never at import: importing this module needs only torch and flashmla_ops, not SGLang.

How the kernels are swapped
---------------------------
SGLang's ``FlashMLABackend`` (``sglang/srt/layers/attention/flashmla_backend.py``) calls FlashMLA through two
module globals, ``get_mla_metadata`` and ``flash_mla_with_kvcache``. Where they come from depends on the
version: ``from sgl_kernel.flash_mla import ...`` (the sglang-kernel wheel) up to 0.5.22, including 0.5.17;
``from sglang.kernels.ops.attention.flash_mla_interface import ...`` (a wrapper over the sgl-flash-mla wheel,
``import flash_mla``) in 0.5.23. Either way they end up as the same two names in the backend module.

The subclass built here keeps *all* of ``FlashMLABackend``'s code (eager metadata, CUDA-graph buffers and
capture / replay, MTP target-verify and draft-extend, the FlashInfer MLA prefill it inherits) and changes
only what those two names mean: every method of ``FlashMLABackend`` whose byte code loads one of them as a
global is copied with ``types.FunctionType(code, new_globals, ...)``, where ``new_globals`` is the backend
module's namespace with the two names bound to the adapters below. Nothing global is mutated, so the
builtin ``flashmla`` backend keeps SGLang's kernels. In 0.5.17 and 0.5.23 the re-bound methods are exactly
:data:`EXPECTED_REBOUND_METHODS`; the class build fails loudly (and the CPU tests fail) if SGLang moves a
kernel call elsewhere, e.g. into a module-level helper.

Why re-binding rather than explicit overrides: overriding would mean copying ~250 lines of SGLang internals
(the four methods) that differ between the two versions we support: ``k_cache.view`` vs ``paged_view``,
``out_cache_loc`` vs ``KVWriteLoc``, the ``kv_index_translator`` branch and the ``plan`` argument added in
0.5.23, the kv-indices kernel moving modules. Those copies would have to be kept in step with every SGLang
release, and could not be shared between the versions. Re-binding keeps SGLang's code verbatim, so each
version runs its own metadata / CUDA-graph logic with only the kernel entry points replaced, and the
byte-code check replaces a silent divergence with an error. The cost is a dependency on those two global
names, which the check guards. The copied methods see a snapshot of the backend module's namespace taken
when the class is built (in the scheduler, after SGLang's plugin hooks were applied).

CUDA-graph buffer compatibility (read from 0.5.17 and 0.5.23, the same in both)
-----------------------------------------------------------------------------
* ``init_cuda_graph_state`` preallocates ``cuda_graph_mla_metadata = empty((multi_processor_count, 8),
  int32)`` on the device of ``req_to_token`` and ``cuda_graph_num_splits = empty(max_bs + 1, int32)``.
* ``_apply_decode_target_verify_metadata`` (before capture and before every replay, outside the graph)
  calls ``get_mla_metadata(seq_lens.int32, q_head_mult * num_q_heads, 1)``, asserts
  ``metadata.shape[0] <= multi_processor_count``, copies the metadata into ``cuda_graph_mla_metadata[:n]``
  and ``num_splits`` into ``cuda_graph_num_splits[:bs + 1]``, and hands those views to the kernel; it warns
  if ``n`` differs from the previous call.
* flashmla_ops returns ``[num_sm_parts, 8]`` int32 with ``num_sm_parts = max(SMs // h_kv //
  ceil(s_q * h_q / h_kv / 64), 1)`` (SMs of ``cache_seqlens``' device, i.e. the same device), and
  ``[b + 1]`` int32. With ``h_kv = 1`` that is at most the SM count, so it fits the buffer; it depends only
  on the head count, ``s_q`` (1 for decode, the draft-token count for verify) and the GPU, never on the
  batch size or the sequence lengths, so a captured graph's view stays valid on every replay. Row width 8
  matches. This is the same formula as FlashMLA's legacy scheduler, so the shapes are exactly those the
  builtin backend produces. (Decode and target-verify graphs share the buffer with different ``n``; SGLang's
  warning then fires for the builtin backend as well.) The batch-invariant schedule of deterministic
  inference is the exception: see below.
* The block table passed to the kernel is ``cuda_graph_kv_indices[:bs, :max_seqlen_pad]``, a row-strided
  view of a ``[max_bs, (context_len + 64) // 64]`` buffer. ``max_seqlen_pad`` comes from the *capture*
  batch's CPU lengths (the fill value 1), so the graph bakes a view **one column wide**, and every replay
  then serves requests of many pages through it. FlashMLA's kernel indexes the table with the row stride and
  never looks at the view's width, so that works for the builtin backend. flashmla_ops bounds every request
  by ``block_table.size(1)`` (a request needing more pages gets NaN rows instead of an out-of-bounds read),
  so the adapter below widens such a view to its full rows (:func:`widen_block_table`: the row stride, cut
  to what the tensor's storage holds) before calling the kernel. It reads only strides and the storage
  size, never values, so it is capture-safe and costs no sync; it runs inside a custom op, so
  ``--enable-torch-compile`` traces the adapter without a graph break. Without the widening every request
  longer than 64 tokens decodes NaN under CUDA graphs (eager mode is right).
  ``k_cache`` is ``[slots // 64, 64, 1, 576]`` (a view, or ``as_strided`` in 0.5.23), also accepted.

Deterministic inference (``--enable-deterministic-inference``)
------------------------------------------------------------
The plugin lets SGLang accept the flag with this backend; :func:`batch_invariant_max_seqlen_k` then gives
the factory a bound, and the class built for it (:func:`build_backend_class` with ``max_seqlen_k``) binds
``get_mla_metadata`` in the copied methods to :func:`batch_invariant_get_mla_metadata`: flashmla_ops'
``batch_invariant=True`` schedule, so each request's attention output and LSE are bitwise the same whatever
else is in the batch (its size, the other requests, the CUDA-graph padding rows). The bound is the context
length plus the draft tokens of a verify step: a static host int, so planning stays free of host syncs and
capturable. It only sizes the split partials, never changes a result. Up to 8,192 tokens no request is
cut, and the metadata has the default's ``num_sm_parts`` rows; with a longer bound the row count grows with
the batch size (``b * chunks(bound) / 2``), so the class regrows SGLang's ``[SM count, 8]`` CUDA-graph
buffer for ``max_bs`` and keeps SGLang from reporting each batch-size change as a capture / replay
mismatch (:func:`_add_batch_invariant_methods`). Each captured graph keeps the rows of its own batch size:
replays refresh the same count. Prefill is outside flashmla_ops: SGLang's FlashInfer MLA path inherited
from ``FlashMLABackend`` (or the ``--prefill-attention-backend`` chosen) decides whether it is
batch-invariant.

FP8 KV cache (``--kv-cache-dtype fp8_e4m3``)
-------------------------------------------
SGLang's FlashMLA backend serves an e4m3 cache by quantising q to e4m3 as well
(``scaled_fp8_quant(q, k_scale)``) and calling FlashMLA's dense-FP8 kernel with ``descale_q`` /
``descale_k``. flashmla_ops keeps q in bf16 instead (more accurate; its FP8 kernel dequantises the cache
inside the kernel): in the copied methods ``scaled_fp8_quant`` is bound to :func:`keep_q_unquantised`,
which hands q back unchanged, so SGLang's own FP8 branch calls the adapter with a 16-bit q, the e4m3 pool
and ``descale_k`` (the layer's ``k_scale`` tensor, or ones), which the adapter passes on as flashmla_ops'
``k_scale``. No pool upcast, no copy; under CUDA graphs the scale is read on the device at every replay.

Not supported (clear errors): an e5m2 KV cache, the ``FlashMLASchedMeta`` API (``get_mla_metadata()``
without ``cache_seqlens``), sparse / top-k decode, decode context parallelism.
"""

from __future__ import annotations

import dis
import functools
import importlib
import logging
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any

import torch

import flashmla_ops

from ._common import BACKEND_NAME, FlashMLAOpsSGLangError, check_runner

__all__ = [
    "BACKEND_MODULE",
    "EXPECTED_REBOUND_METHODS",
    "KERNEL_GLOBALS",
    "KNOWN_KERNEL_MODULES",
    "batch_invariant_get_mla_metadata",
    "batch_invariant_max_seqlen_k",
    "build_backend_class",
    "deterministic_inference_enabled",
    "flash_mla_with_kvcache",
    "get_backend_class",
    "get_mla_metadata",
    "import_flashmla_backend_module",
    "keep_q_unquantised",
    "kernel_users",
    "widen_block_table",
]

logger = logging.getLogger(__name__)

#: SGLang's FlashMLA backend module (0.5.13 ... 0.5.23).
BACKEND_MODULE = "sglang.srt.layers.attention.flashmla_backend"
#: The module globals through which ``FlashMLABackend`` calls the FlashMLA kernels.
KERNEL_GLOBALS = ("get_mla_metadata", "flash_mla_with_kvcache")
#: Where those globals come from, per SGLang version.
KNOWN_KERNEL_MODULES = {
    "sgl_kernel.flash_mla": "SGLang <= 0.5.22 (sglang-kernel wheel)",
    "sglang.kernels.ops.attention.flash_mla_interface": "SGLang 0.5.23 (sgl-flash-mla wheel)",
}
#: The ``FlashMLABackend`` methods that call the kernels in SGLang 0.5.17 and 0.5.23 (checked by the tests).
EXPECTED_REBOUND_METHODS = frozenset(
    {"init_forward_metadata", "_apply_decode_target_verify_metadata", "forward_decode", "forward_extend"}
)
# ImportError.name of a missing builtin FlashMLA kernel package -> the interface module to stand in for.
_KERNEL_PACKAGE_STANDINS = {
    "flash_mla": "sglang.kernels.ops.attention.flash_mla_interface",  # 0.5.23 without sgl-flash-mla
    "sgl_kernel.flash_mla": "sgl_kernel.flash_mla",  # <= 0.5.22 with an sglang-kernel lacking it
}

_FP8_Q_MESSAGE = (
    f"flashmla_ops: the {BACKEND_NAME} backend was handed an FP8 query; flashmla_ops decodes an FP8 KV cache "
    "with a bfloat16 / float16 query (SGLang's q quantisation is bypassed in the backend's methods). This "
    "SGLang version quantises q somewhere the backend does not cover: use --attention-backend flashmla for "
    "FP8 here."
)
_E5M2_MESSAGE = (
    f"flashmla_ops: the {BACKEND_NAME} backend serves FP8 KV caches in e4m3 (--kv-cache-dtype fp8_e4m3), "
    "not {dtype}"
)


# ----------------------------------------------------------------------------------------------------------
# Kernel adapters: SGLang's FlashMLA call signatures -> flashmla_ops
# ----------------------------------------------------------------------------------------------------------


def get_mla_metadata(
    cache_seqlens: torch.Tensor | None = None,
    num_q_tokens_per_head_k: int | None = None,
    num_heads_k: int | None = None,
    num_heads_q: int | None = None,
    is_fp8_kvcache: bool = False,
    topk: int | None = None,
    *,
    batch_invariant: bool = False,
    max_seqlen_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``get_mla_metadata`` as ``FlashMLABackend`` calls it, computed by flashmla_ops.

    ``batch_invariant`` / ``max_seqlen_k`` are flashmla_ops' (SGLang never passes them): the deterministic
    backend binds them with :func:`batch_invariant_get_mla_metadata`.

    Returns ``(tile_scheduler_metadata int32 [num_sm_parts, 8], num_splits int32 [b + 1])``.
    """
    if cache_seqlens is None or num_q_tokens_per_head_k is None or num_heads_k is None:
        raise NotImplementedError(
            "flashmla_ops: get_mla_metadata needs cache_seqlens, num_q_tokens_per_head_k and num_heads_k "
            "(the FlashMLASchedMeta form, get_mla_metadata() without arguments, is not supported)"
        )
    # The FP8 kernels use the same schedule as the 16-bit ones.
    return flashmla_ops.get_mla_metadata(
        cache_seqlens,
        num_q_tokens_per_head_k,
        num_heads_k,
        num_heads_q,
        is_fp8_kvcache,
        topk,
        batch_invariant=batch_invariant,
        max_seqlen_k=max_seqlen_k,
    )


def batch_invariant_get_mla_metadata(max_seqlen_k: int) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """The ``get_mla_metadata`` of the deterministic backend: :func:`get_mla_metadata` with
    ``batch_invariant=True`` and the static bound ``max_seqlen_k`` (a host int fixed when the backend is
    built, so planning a step reads no lengths on the host and a captured CUDA graph replays the same part
    count for its batch size). The bound only sizes the split partials; each request's result depends on its
    own length alone, never on the bound or the batch. The returned function carries ``max_seqlen_k``.
    """
    if isinstance(max_seqlen_k, bool) or not isinstance(max_seqlen_k, int) or max_seqlen_k < 1:
        raise ValueError(f"flashmla_ops: max_seqlen_k must be a positive int, got {max_seqlen_k!r}")

    adapter = functools.partial(get_mla_metadata, batch_invariant=True, max_seqlen_k=max_seqlen_k)
    adapter.max_seqlen_k = max_seqlen_k  # type: ignore[attr-defined]
    return adapter


def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor,
    num_splits: torch.Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    descale_q: torch.Tensor | None = None,
    descale_k: torch.Tensor | None = None,
    is_fp8_kvcache: bool = False,
    indices: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``flash_mla_with_kvcache`` as ``FlashMLABackend`` calls it, run by flashmla_ops.

    Dense bf16/fp16, or an FP8 e4m3 cache (``is_fp8_kvcache``, ``descale_k`` or a 1-byte ``k_cache``) with a
    16-bit q: ``descale_k`` (float32 ``[1]``, default ones) is the cache's ``k_scale``. ``descale_q`` is
    ignored: q reaches here unquantised (:func:`keep_q_unquantised`).

    Returns ``(out [b, s_q, h_q, 512], lse float32 [b, h_q, s_q])`` (natural-log LSE, like FlashMLA).

    Raises:
        NotImplementedError: an FP8 q, an e5m2 cache, or sparse (``indices``) decode.
    """
    if q.element_size() == 1:
        raise NotImplementedError(_FP8_Q_MESSAGE)
    if indices is not None:
        raise NotImplementedError("flashmla_ops: sparse (top-k, indices=) decode is not supported")
    k_scale = None
    if is_fp8_kvcache or descale_k is not None or k_cache.element_size() == 1:
        if k_cache.dtype == torch.uint8:  # a pool stored as bytes
            k_cache = k_cache.view(torch.float8_e4m3fn)
        if k_cache.dtype != torch.float8_e4m3fn:
            raise NotImplementedError(_E5M2_MESSAGE.format(dtype=k_cache.dtype))
        k_scale = descale_k if descale_k is not None else torch.ones(1, device=q.device)
    args = (q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits)
    if torch.compiler.is_compiling():  # traced: the widening must sit inside an opaque op (see below)
        return _decode_widened(*args, softmax_scale, causal, k_scale)
    return _decode_widened_eager(*args, softmax_scale, causal, k_scale)  # eager: no custom-op dispatch


# The widening reads the block table's storage size, which torch.compile cannot trace (a graph break under
# SGLang's --enable-torch-compile). Inside a custom op it runs on the real tensors at run time instead: the
# op is opaque to the compiler, which keeps its inputs' strides (so the narrow view still shows its row
# stride), and its fake implementation needs only shapes.
def _decode(*args: Any, k_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """flashmla_ops' decode as the adapter calls it (``args``: ``q`` … ``causal`` of
    ``flash_mla_with_kvcache``): an FP8 cache exactly when ``k_scale`` is given."""
    return flashmla_ops.flash_mla_with_kvcache(*args, is_fp8_kvcache=k_scale is not None, k_scale=k_scale)


def _decode_widened_eager(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    tile_scheduler_metadata: torch.Tensor,
    num_splits: torch.Tensor,
    softmax_scale: float | None,
    causal: bool,
    k_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    table = widen_block_table(block_table)
    args = (q, k_cache, table, cache_seqlens, head_dim_v, tile_scheduler_metadata, num_splits, softmax_scale)
    return _decode(*args, causal, k_scale=k_scale)


_decode_widened = torch.library.custom_op("flashmla_ops_sglang::decode_widened", mutates_args=())(
    _decode_widened_eager
)


@_decode_widened.register_fake
def _(*args: Any, k_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    # The output shapes do not depend on the block table's width: flashmla_ops' own fake (and checks) decide.
    # k_scale (the op's 10th argument, absent when None) must reach flash_mla_with_kvcache by keyword:
    # positionally it would land in is_fp8_kvcache, which a traced FP8 call cannot turn into a bool.
    return _decode(*args[:9], k_scale=args[9] if len(args) > 9 else k_scale)


def keep_q_unquantised(
    x: torch.Tensor, scale: Any = None, *args: Any, **kwargs: Any
) -> tuple[torch.Tensor, Any]:
    """Stands in for SGLang's ``scaled_fp8_quant(q, scale)`` in the backend's copied methods, whose only use
    of it is quantising q before an FP8 decode: returns ``(q, scale)`` unchanged, so flashmla_ops decodes
    the FP8 cache with the 16-bit q (see the module docstring)."""
    return x, scale


#: Globals of the copied methods replaced besides the kernels, where the backend module has them.
_METHOD_STANDINS: dict[str, Callable[..., Any]] = {"scaled_fp8_quant": keep_q_unquantised}


def widen_block_table(block_table: torch.Tensor) -> torch.Tensor:
    """``block_table`` widened to its full rows: ``[b, w]`` with ``w`` = the row stride, or fewer columns
    where the tensor's storage ends sooner. Returned unchanged unless it is a 2-D int view with a contiguous
    last dimension and a row stride larger than its width.

    SGLang's FlashMLA backend hands the kernel a view whose width was fixed when a CUDA graph was captured
    (one column, see the module docstring) while the real lengths need more; FlashMLA reads past the width
    through the row stride. Widening the view gives flashmla_ops the same pages, and its bound check then
    only refuses entries that lie outside the buffer. Reads strides and the storage size, never values, so
    it is safe under CUDA-graph capture. ``torch.compile`` cannot trace the storage-size query, so under
    compilation the adapter calls it inside the opaque custom op ``flashmla_ops_sglang::decode_widened``
    (no graph break); eager calls skip the custom-op dispatch. The cost of matching FlashMLA: a request that
    needs more pages than the view is wide reads what follows in the buffer's row, as FlashMLA does, instead
    of getting NaN rows.
    """
    if block_table.dim() != 2 or block_table.stride(1) != 1 or block_table.numel() == 0:
        return block_table
    b, cols = block_table.shape
    row_stride = block_table.stride(0)
    if row_stride <= cols:
        return block_table
    storage_elems = block_table.untyped_storage().nbytes() // block_table.element_size()
    last_row_room = storage_elems - block_table.storage_offset() - (b - 1) * row_stride
    width = min(row_stride, last_row_room)
    if width <= cols:
        return block_table
    return block_table.as_strided((b, width), (row_stride, 1))


_KERNELS: dict[str, Callable[..., Any]] = {
    "get_mla_metadata": get_mla_metadata,
    "flash_mla_with_kvcache": flash_mla_with_kvcache,
}


# ----------------------------------------------------------------------------------------------------------
# Deterministic inference (--enable-deterministic-inference): the batch-invariant schedule
# ----------------------------------------------------------------------------------------------------------


def _runtime_setting(bag: str, *path: str) -> Any:
    """A setting of SGLang's published runtime context (``get_<bag>()``), or None.

    Only where SGLang has imported its runtime context already (always so in a scheduler, whose model runner
    uses it): importing SGLang from here would be a side effect of merely asking.
    """
    module = sys.modules.get("sglang.srt.runtime_context")
    try:
        value = getattr(module, f"get_{bag}")()
        for name in path:
            value = getattr(value, name)
        return value
    except Exception:  # no such bag or setting in this version, or the context is not published yet
        return None


def deterministic_inference_enabled(runner: Any) -> bool:
    """Whether SGLang runs with deterministic inference (``--enable-deterministic-inference``, or a setting
    that implies it such as ``--rl-on-policy-target``).

    Read from ``runner.server_args`` (where SGLang 0.5.17's backends read it) and from the published runtime
    context's ``exec.deterministic`` bag (where 0.5.23's backends read it); either being true is enough.
    """
    if getattr(getattr(runner, "server_args", None), "enable_deterministic_inference", False):
        return True
    return bool(_runtime_setting("exec", "deterministic", "enable_deterministic_inference"))


def _num_draft_tokens(runner: Any) -> int:
    """Draft tokens a speculative verify / draft-extend step appends to each request (0 without): from
    ``runner.server_args`` and from the runtime context's ``spec`` bag, which FlashMLABackend reads."""
    counts = (
        getattr(getattr(runner, "server_args", None), "speculative_num_draft_tokens", None),
        _runtime_setting("spec", "speculative_num_draft_tokens"),
    )
    return max((c for c in counts if isinstance(c, int) and not isinstance(c, bool)), default=0)


def batch_invariant_max_seqlen_k(runner: Any) -> int | None:
    """The ``max_seqlen_k`` of the deterministic backend for ``runner``; None when deterministic inference is
    off (the backend then uses flashmla_ops' default schedule).

    The longest KV length any step can plan: the model's context length (``runner.model_config.context_len``,
    from which ``FlashMLABackend`` also sizes its block tables) plus the draft tokens that a speculative
    verify or draft-extend step appends. It must hold for every request: a longer one would find no room for
    its split partials (NaN rows). A static host int, fixed for the server's life.

    Raises:
        FlashMLAOpsSGLangError: deterministic inference is on and the runner has no context length.
    """
    if not deterministic_inference_enabled(runner):
        return None
    context_len = getattr(getattr(runner, "model_config", None), "context_len", None)
    if isinstance(context_len, bool) or not isinstance(context_len, int) or context_len < 1:
        raise FlashMLAOpsSGLangError(
            f"flashmla_ops: the {BACKEND_NAME} backend bounds the KV length of its batch-invariant decode "
            f"(--enable-deterministic-inference) by the model's context length, but "
            f"model_config.context_len is {context_len!r}"
        )
    return context_len + _num_draft_tokens(runner)


# ----------------------------------------------------------------------------------------------------------
# Importing SGLang's FlashMLABackend
# ----------------------------------------------------------------------------------------------------------


def _standin_module(name: str, error: ImportError) -> types.ModuleType:
    """A placeholder for a missing builtin FlashMLA interface module; calling its kernels raises."""
    module = types.ModuleType(
        name, f"flashmla_ops stand-in: the builtin FlashMLA kernels are missing ({error})"
    )

    def _missing(*args: object, **kwargs: object) -> None:
        raise RuntimeError(
            f"SGLang's builtin FlashMLA kernels are not installed ({error}); the {BACKEND_NAME} backend does "
            f"not need them, but the builtin 'flashmla' backend does. Install SGLang's kernel dependencies "
            f"or use --attention-backend {BACKEND_NAME}."
        )

    for kernel in KERNEL_GLOBALS:
        fn = types.FunctionType(_missing.__code__, _missing.__globals__, kernel, None, _missing.__closure__)
        fn.__module__, fn.__qualname__ = name, kernel
        setattr(module, kernel, fn)
    module.__flashmla_ops_standin__ = True
    return module


def import_flashmla_backend_module() -> types.ModuleType:
    """Import SGLang's ``flashmla_backend`` module.

    The module imports the builtin FlashMLA kernels at its top (``sgl_kernel.flash_mla`` up to 0.5.22,
    ``flash_mla`` from the sgl-flash-mla wheel in 0.5.23), which the flashmla_ops backend never calls. If
    exactly that package is missing, a stand-in interface module whose kernels raise is put in
    ``sys.modules`` (with a warning) and the import is retried, so flashmla_ops works without it. Any other
    import error propagates.
    """
    try:
        return importlib.import_module(BACKEND_MODULE)
    except ImportError as e:
        standin = _KERNEL_PACKAGE_STANDINS.get(getattr(e, "name", None) or "")
        if standin is None or standin in sys.modules:
            raise
        logger.warning(
            "flashmla_ops: SGLang's builtin FlashMLA kernels are not importable (%s); using a stand-in for "
            "%s so that the %s backend can be built (the builtin 'flashmla' backend will not work)",
            e,
            standin,
            BACKEND_NAME,
        )
        sys.modules[standin] = _standin_module(standin, e)
        return importlib.import_module(BACKEND_MODULE)


# ----------------------------------------------------------------------------------------------------------
# Re-binding
# ----------------------------------------------------------------------------------------------------------


def _loaded_globals(code: types.CodeType, names: frozenset[str]) -> set[str]:
    """The ``names`` that ``code`` (or a function / comprehension nested in it) loads as globals."""
    found = {
        ins.argval
        for ins in dis.get_instructions(code)
        if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME") and ins.argval in names
    }
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            found |= _loaded_globals(const, names)
    return found


def _functions_of(value: Any) -> list[types.FunctionType]:
    """The plain functions behind a class attribute (method, static/class method, property)."""
    if isinstance(value, types.FunctionType):
        return [value]
    if isinstance(value, (staticmethod, classmethod)):
        return _functions_of(value.__func__)
    if isinstance(value, property):
        return [f for f in (value.fget, value.fset, value.fdel) if isinstance(f, types.FunctionType)]
    return []


def kernel_users(cls: type, names: tuple[str, ...] = KERNEL_GLOBALS) -> dict[str, frozenset[str]]:
    """``{attribute: kernel globals it loads}`` for the attributes defined in ``cls`` itself."""
    wanted = frozenset(names)
    users = {}
    for attr, value in vars(cls).items():
        loaded: set[str] = set()
        for fn in _functions_of(value):
            loaded |= _loaded_globals(fn.__code__, wanted)
        if loaded:
            users[attr] = frozenset(loaded)
    return users


def _copy_with_globals(fn: types.FunctionType, namespace: dict[str, Any]) -> types.FunctionType:
    new = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = dict(fn.__kwdefaults__) if fn.__kwdefaults__ else None
    new.__qualname__ = fn.__qualname__
    new.__module__ = fn.__module__
    new.__doc__ = fn.__doc__
    new.__annotations__ = dict(fn.__annotations__)
    new.__dict__.update(fn.__dict__)
    new.__flashmla_ops_rebound_from__ = fn
    return new


def _check_module_helpers(base: type, module: types.ModuleType, names: frozenset[str]) -> None:
    """Fail if a module-level function of ``base``'s module calls a kernel (re-binding would miss it)."""
    for attr, value in vars(module).items():
        if (
            isinstance(value, types.FunctionType)
            and value.__module__ == module.__name__
            and value.__globals__ is vars(module)
            and _loaded_globals(value.__code__, names)
        ):
            raise RuntimeError(
                f"flashmla_ops: {module.__name__}.{attr} calls {sorted(names)} outside {base.__name__}; this "
                "SGLang version is not supported by the flashmla_ops backend (re-binding would miss it)"
            )


def build_backend_class(
    base: type,
    *,
    kernels: Mapping[str, Callable[..., Any]] | None = None,
    max_seqlen_k: int | None = None,
    _extra_globals: Mapping[str, Any] | None = None,
) -> type:
    """Build the ``flashmla_ops`` backend class: ``base`` (SGLang's ``FlashMLABackend``), kernels swapped.

    Arguments:
        base: the class to derive from; its methods that load one of :data:`KERNEL_GLOBALS` are copied with
            those globals bound to ``kernels``.
        kernels: ``{global name: replacement}``; default: this module's adapters (flashmla_ops), with
            ``get_mla_metadata`` planning batch-invariant decodes when ``max_seqlen_k`` is given.
        max_seqlen_k: build the deterministic backend (``--enable-deterministic-inference``): every decode,
            verify and draft-extend step is planned by flashmla_ops' batch-invariant schedule bounded by this
            KV length (:func:`batch_invariant_max_seqlen_k`), and the CUDA-graph metadata buffer is sized
            for it (see :func:`_add_batch_invariant_methods`). The class's ``batch_invariant_max_seqlen_k``
            holds it (None: the default schedule).
        _extra_globals: more globals to bind in the copied methods (tests use it to run SGLang's Triton
            block-table kernel on CPU); they do not add methods to the copied set.

    Raises:
        RuntimeError: ``base`` does not call the kernels where expected (an unsupported SGLang version).
    """
    if kernels is None:
        kernels = dict(_KERNELS)
        if max_seqlen_k is not None:
            kernels["get_mla_metadata"] = batch_invariant_get_mla_metadata(max_seqlen_k)
    kernels = dict(kernels)
    names = frozenset(kernels)
    module = sys.modules[base.__module__]
    users = kernel_users(base, tuple(names))
    covered = frozenset().union(*users.values()) if users else frozenset()
    if covered != names or "forward_decode" not in users:
        raise RuntimeError(
            f"flashmla_ops: {base.__module__}.{base.__qualname__} does not call {sorted(names)} from its "
            f"methods as expected (found {dict(sorted(users.items()))}); this SGLang version is not "
            "supported by the flashmla_ops backend"
        )
    _check_module_helpers(base, module, names)

    for name in sorted(names):
        origin = getattr(vars(module).get(name), "__module__", None)
        if origin is not None and origin not in KNOWN_KERNEL_MODULES:
            logger.info(
                "flashmla_ops: replacing %s.%s from %s (unknown origin)", module.__name__, name, origin
            )

    namespace = dict(vars(module))  # a snapshot of the backend module's globals ...
    namespace.update(_extra_globals or {})
    namespace.update({k: v for k, v in _METHOD_STANDINS.items() if k in namespace})
    namespace.update(kernels)  # ... with the kernel entry points re-bound
    rebound: dict[str, Any] = {}
    for attr in users:
        value = vars(base)[attr]
        if isinstance(value, types.FunctionType):
            rebound[attr] = _copy_with_globals(value, namespace)
        else:
            raise RuntimeError(
                f"flashmla_ops: {base.__qualname__}.{attr} ({type(value).__name__}) calls a kernel; only "
                "plain methods can be re-bound"
            )

    class FlashMLAOpsBackend(base):  # type: ignore[misc, valid-type]
        """SGLang's FlashMLA backend with its decode / verify kernels served by flashmla_ops."""

        #: KV-length bound of the batch-invariant schedule (deterministic inference), or None.
        batch_invariant_max_seqlen_k: int | None = max_seqlen_k

        def __init__(self, model_runner: Any, *args: Any, **kwargs: Any) -> None:
            check_runner(model_runner)
            super().__init__(model_runner, *args, **kwargs)
            kv_dtype = getattr(self, "data_type", None)
            if getattr(self, "is_fp8_kvcache", False) and kv_dtype not in (None, torch.float8_e4m3fn):
                raise FlashMLAOpsSGLangError(_E5M2_MESSAGE.format(dtype=kv_dtype))
            dcp = getattr(self, "dcp_world_size", 1) or 1
            if dcp > 1:
                raise FlashMLAOpsSGLangError(
                    f"--attention-backend {BACKEND_NAME} does not support decode context parallelism "
                    f"(--dcp-size {dcp}): SGLang chooses the LSE base for merging DCP partial results by "
                    "backend name (forward_mla.is_mla_dcp_lse_base_on_e), and does not list flashmla_ops"
                )
            if self.batch_invariant_max_seqlen_k is not None:
                self._check_batch_invariant_bound()

    FlashMLAOpsBackend.__module__ = __name__
    FlashMLAOpsBackend.__qualname__ = FlashMLAOpsBackend.__name__
    for attr, fn in rebound.items():
        setattr(FlashMLAOpsBackend, attr, fn)
    FlashMLAOpsBackend.rebound_methods = frozenset(rebound)
    if max_seqlen_k is not None:
        _add_batch_invariant_methods(FlashMLAOpsBackend, base)
    return FlashMLAOpsBackend


def _add_batch_invariant_methods(cls: type, base: type) -> None:
    """The deterministic backend's additions to ``cls`` (built from ``base``), all around SGLang's code:

    * ``init_cuda_graph_state``: SGLang preallocates the CUDA-graph metadata as ``[SM count, 8]`` and copies
      each step's metadata into its first rows (asserting that they fit). The batch-invariant schedule can
      need more rows: ``batch_size * chunks(max_seqlen_k) / 2`` when the bound is long enough to cut a
      request (more than 8,192 tokens). After SGLang's allocation, the buffer is regrown to the most rows any
      captured batch size (at most ``max_bs``) needs, for every query-row count the backend plans with.
    * ``_apply_decode_target_verify_metadata`` (the capture / replay metadata refresh): that row count then
      follows the batch size, so a replay of another batch size than the previous step's changes it by
      design; SGLang would log a capture / replay mismatch warning at every such step. The previous view is
      forgotten first; each captured graph keeps the rows of its own batch size, which its replays refresh.
    * ``_check_batch_invariant_bound`` (from ``__init__``): the bound covers SGLang's own context length plus
      draft tokens, and the largest batch the request pool admits fits flashmla_ops' part limit.
    """

    def batch_invariant_metadata_rows(self: Any, batch_size: int) -> int:
        """Rows of the batch-invariant metadata of ``batch_size`` requests (the largest over the backend's
        query-row counts: decode, and verify / draft-extend with their draft tokens)."""
        heads = self.num_q_heads
        draft = getattr(self, "num_draft_tokens", None) or 0
        device = self.req_to_token.device
        q_rows = {heads} | ({draft * heads} if draft else set())
        return max(
            flashmla_ops.ops.metadata_parts(device, batch_size, q, 1, self.batch_invariant_max_seqlen_k)[0]
            for q in q_rows
        )

    def _check_batch_invariant_bound(self: Any) -> None:
        bound = self.batch_invariant_max_seqlen_k
        longest = (getattr(self, "max_context_len", None) or 0) + (
            getattr(self, "num_draft_tokens", None) or 0
        )
        if longest > bound:
            raise FlashMLAOpsSGLangError(
                f"flashmla_ops: the {BACKEND_NAME} backend was built for KV lengths up to {bound} (batch-"
                f"invariant decode) but SGLang's backend serves up to {longest} (max_context_len plus draft "
                "tokens); the two were read from different places of this SGLang version"
            )
        req_to_token = getattr(self, "req_to_token", None)
        if req_to_token is None or getattr(self, "num_q_heads", None) is None:
            return
        try:
            self.batch_invariant_metadata_rows(req_to_token.shape[0])
        except flashmla_ops.FlashMLAInputError as e:
            raise FlashMLAOpsSGLangError(
                f"--attention-backend {BACKEND_NAME} with --enable-deterministic-inference: a batch of "
                f"{req_to_token.shape[0]} requests (the request pool) of up to {bound} tokens is beyond the "
                f"batch-invariant schedule ({e}); lower --max-running-requests or --context-length"
            ) from e

    def init_cuda_graph_state(self: Any, max_bs: int, *args: Any, **kwargs: Any) -> None:
        base_init = super(cls, self).init_cuda_graph_state
        base_init(max_bs, *args, **kwargs)
        buffer = self.cuda_graph_mla_metadata
        rows = self.batch_invariant_metadata_rows(max_bs)
        if buffer is not None and rows > buffer.shape[0]:
            self.cuda_graph_mla_metadata = buffer.new_empty((rows, buffer.shape[1]))

    cls.batch_invariant_metadata_rows = batch_invariant_metadata_rows
    cls._check_batch_invariant_bound = _check_batch_invariant_bound
    if hasattr(base, "init_cuda_graph_state"):
        init_cuda_graph_state.__qualname__ = f"{cls.__qualname__}.init_cuda_graph_state"
        cls.init_cuda_graph_state = init_cuda_graph_state
    refresh = vars(cls).get("_apply_decode_target_verify_metadata")
    if refresh is not None:

        @functools.wraps(refresh)
        def _apply_decode_target_verify_metadata(self: Any, *args: Any, **kwargs: Any) -> Any:
            self.cuda_graph_mla_metadata_view = None
            return refresh(self, *args, **kwargs)

        cls._apply_decode_target_verify_metadata = _apply_decode_target_verify_metadata


@functools.cache
def get_backend_class(max_seqlen_k: int | None = None) -> type:
    """The ``flashmla_ops`` backend class for the installed SGLang (built on first use, then cached): the
    default schedule, or with ``max_seqlen_k`` the deterministic backend's batch-invariant one."""
    module = import_flashmla_backend_module()
    cls = build_backend_class(module.FlashMLABackend, max_seqlen_k=max_seqlen_k)
    schedule = "default" if max_seqlen_k is None else f"batch-invariant (max_seqlen_k={max_seqlen_k})"
    logger.info(
        "flashmla_ops: built %s from %s.FlashMLABackend, kernels re-bound in %s; decode schedule: %s",
        cls.__qualname__,
        module.__name__,
        ", ".join(sorted(cls.rebound_methods)),
        schedule,
    )
    return cls
