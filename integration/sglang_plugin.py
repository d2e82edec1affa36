"""SGLang plugin: adds the attention backend ``--attention-backend flashmla_ops``.

SGLang finds this module through the entry point declared in pyproject.toml::

    [project.entry-points."sglang.srt.plugins"]
    flashmla_ops = "flashmla_ops.integration.sglang_plugin:register"

and its ``load_plugins()`` calls :func:`register` early in every SGLang process (the launcher before argv is
parsed, ``Engine.__init__``, each scheduler / TP worker, the detokenizer). Schedulers are started with
``spawn`` and re-import SGLang, so registering from the parent process alone would not reach them: the
entry point is the mechanism. ``SGLANG_PLUGINS=flashmla_ops`` (comma-separated whitelist) restricts which
plugins SGLang loads.

What :func:`register` does (each step on its own; a step that fails is logged and the others still run):

1. ``argparse_choices``: adds ``flashmla_ops`` to ``ATTENTION_BACKEND_CHOICES`` (``--attention-backend``,
   ``--prefill-attention-backend``, ``--decode-attention-backend``);
2. ``chunked_prefix_cache``: adds it to ``CHUNKED_PREFIX_CACHE_SUPPORTED_ATTENTION_BACKENDS`` (prefill is
   the FlashInfer MLA path inherited from SGLang's ``FlashMLABackend``, as for the builtin ``flashmla``);
3. ``attention_backend_factory``: ``register_attention_backend("flashmla_ops")(create_backend)``;
4. ``deepseek_handler``: ``AttentionBackendRegistry.register("flashmla_ops", handle_attention_flashmla)``,
   so DeepSeek models choose their MLA / MHA forward methods exactly as for the builtin ``flashmla``
   (unknown names silently fall back to the ``triton`` handler). Importing SGLang's handler module queries
   the CUDA device at import time (0.5.23: ``trtllm_mla_backend`` -> ``get_jit_cuda_arch``), which would
   create a CUDA context in the launcher and detokenizer processes. So this step registers at once only
   when that module is already imported, and otherwise defers to :func:`create_backend`, which runs in the
   scheduler process before the model's first forward (the only place the handler is looked up);
5. ``page_size_hook``: an AFTER hook (SGLang's ``HookRegistry``) on
   ``sglang.srt.arg_groups.overrides._mla_backend_page_constraints`` that sets ``page_size = 64`` when
   ``flashmla_ops`` is the attention, decode or prefill backend, the way SGLang does for ``flashmla``. So
   ``--page-size 64`` is implied. If the hook cannot be installed, the factory still rejects any other page
   size with :class:`FlashMLAOpsSGLangError`.

:func:`register` is cheap and idempotent: it imports only SGLang's argument / plugin modules and the attention
registry (none of which touch CUDA) and never ``flashmla_ops`` itself or the backend class, which is built
lazily by :func:`create_backend`. The same code serves SGLang 0.5.17 (the newest release pinned to torch
2.11) and 0.5.23: every symbol used is imported from a location present in both.

Limitations (documented, not hooked): speculative decoding (EAGLE/MTP) needs
``--speculative-draft-attention-backend flashmla`` (SGLang's draft-backend tables are closed dictionaries;
the target model's verify step does run on flashmla_ops); decode context parallelism (DCP) and an FP8 KV
cache are rejected when the backend is created.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from ._common import (
    BACKEND_NAME,
    PAGE_SIZE,
    FlashMLAOpsSGLangError,
    check_runner,
)

__all__ = [
    "BACKEND_NAME",
    "PAGE_SIZE",
    "PAGE_SIZE_HOOK_TARGET",
    "FlashMLAOpsSGLangError",
    "check_runner",
    "create_backend",
    "register",
]

logger = logging.getLogger(__name__)

#: The SGLang server-args pass that snaps the page size of the MLA backends (0.5.17 ... 0.5.23).
PAGE_SIZE_HOOK_TARGET = "sglang.srt.arg_groups.overrides._mla_backend_page_constraints"

_HANDLER_MODULE = "sglang.srt.models.deepseek_common.attention_backend_handler"
_BACKEND_ROLES = ("attention_backend", "decode_attention_backend", "prefill_attention_backend")


# ----------------------------------------------------------------------------------------------------------
# register()
# ----------------------------------------------------------------------------------------------------------


def register() -> dict[str, str]:
    """Register the ``flashmla_ops`` attention backend with SGLang (the ``sglang.srt.plugins`` entry point).

    Idempotent: calling it again changes nothing. Never raises: each registration step is attempted on its
    own, and a step whose SGLang module cannot be imported (e.g. a partial install) is logged as a warning
    naming the step and the error, without stopping the others.

    Returns:
        ``{step: status}`` for the steps ``argparse_choices``, ``chunked_prefix_cache``,
        ``attention_backend_factory``, ``deepseek_handler`` and ``page_size_hook``; a status is
        ``"registered"``, ``"already registered"``, ``"deferred: ..."`` or ``"failed: <error>"``.
    """
    steps = (
        ("argparse_choices", _register_argparse_choice),
        ("chunked_prefix_cache", _register_chunked_prefix_cache),
        ("attention_backend_factory", _register_factory),
        ("deepseek_handler", lambda: _register_deepseek_handler(import_module=False)),
        ("page_size_hook", _register_page_size_hook),
    )
    status: dict[str, str] = {}
    for step, fn in steps:
        try:
            status[step] = fn()
        except Exception as e:  # one missing optional SGLang piece must not stop the other steps
            status[step] = f"failed: {type(e).__name__}: {e}"
            logger.warning(
                "flashmla_ops SGLang plugin: step %r failed (%s: %s); the other steps are unaffected",
                step,
                type(e).__name__,
                e,
                exc_info=logger.isEnabledFor(logging.DEBUG),
            )
    logger.info("flashmla_ops SGLang plugin: %s", ", ".join(f"{k}={v}" for k, v in status.items()))
    return status


def _register_argparse_choice() -> str:
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    if BACKEND_NAME in ATTENTION_BACKEND_CHOICES:
        return "already registered"
    add_attention_backend_choices([BACKEND_NAME])
    return "registered"


def _register_chunked_prefix_cache() -> str:
    from sglang.srt.server_args import (
        CHUNKED_PREFIX_CACHE_SUPPORTED_ATTENTION_BACKENDS,
        add_chunked_prefix_cache_attention_backend,
    )

    if BACKEND_NAME in CHUNKED_PREFIX_CACHE_SUPPORTED_ATTENTION_BACKENDS:
        return "already registered"
    add_chunked_prefix_cache_attention_backend(BACKEND_NAME)
    return "registered"


def _register_factory() -> str:
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS, register_attention_backend

    existing = ATTENTION_BACKENDS.get(BACKEND_NAME)
    if existing is not None:
        if _is_ours(existing, create_backend):
            return "already registered"
        raise RuntimeError(
            f"another factory is already registered under the attention backend name {BACKEND_NAME!r}: "
            f"{getattr(existing, '__module__', '?')}.{getattr(existing, '__qualname__', existing)}"
        )
    register_attention_backend(BACKEND_NAME)(create_backend)
    return "registered"


def _register_deepseek_handler(import_module: bool) -> str:
    """Map ``flashmla_ops`` to SGLang's ``handle_attention_flashmla`` in ``AttentionBackendRegistry``.

    With ``import_module=False`` (from :func:`register`) only if the handler module is already imported;
    importing it initialises CUDA (see the module docstring), so it is otherwise left to the factory.
    """
    if not import_module and sys.modules.get(_HANDLER_MODULE) is None:
        return "deferred: registered when the backend is created (importing the handler initialises CUDA)"
    from sglang.srt.models.deepseek_common.attention_backend_handler import (
        AttentionBackendRegistry,
        handle_attention_flashmla,
    )

    if AttentionBackendRegistry.get_handler(BACKEND_NAME) is handle_attention_flashmla:
        return "already registered"
    AttentionBackendRegistry.register(BACKEND_NAME, handle_attention_flashmla)
    return "registered"


def _page_size_hook(result: Any, view: Any, *args: Any, **kwargs: Any) -> dict | None:
    """AFTER hook of ``_mla_backend_page_constraints(view) -> {field: value}``: imply ``--page-size 64``."""
    if BACKEND_NAME not in {getattr(view, role, None) for role in _BACKEND_ROLES}:
        return None  # keep SGLang's result
    declared = dict(result) if isinstance(result, dict) else {}
    current = declared.get("page_size", getattr(view, "page_size", None))
    if current == PAGE_SIZE:
        return None
    logger.warning(
        "The %s attention backend only supports a page_size of %d; changing page_size from %s to %d.",
        BACKEND_NAME,
        PAGE_SIZE,
        current,
        PAGE_SIZE,
    )
    declared["page_size"] = PAGE_SIZE
    return declared


def _register_page_size_hook() -> str:
    from sglang.srt.plugins import hook_registry
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    hooks = getattr(HookRegistry, "_hooks", {})
    if any(_is_ours(hook, _page_size_hook) for _type, hook, *_src in hooks.get(PAGE_SIZE_HOOK_TARGET, ())):
        return "already registered"
    patched_before = PAGE_SIZE_HOOK_TARGET in getattr(HookRegistry, "_patched", ())
    HookRegistry.register(PAGE_SIZE_HOOK_TARGET, _page_size_hook, HookType.AFTER)
    if patched_before:
        # apply_hooks() skips targets it has patched already: another plugin hooked this function earlier
        # and its hooks are applied. Ours will not be; the factory's page-size check remains.
        raise RuntimeError(
            f"{PAGE_SIZE_HOOK_TARGET} was already patched by another plugin; pass --page-size {PAGE_SIZE}"
        )
    source = getattr(hook_registry, "_current_plugin_source", None)
    if source is None or source.get() is None:
        # Called directly rather than by load_plugins(), which applies all hooks right after the plugins
        # ran: apply now, so that the hook is live when this function returns.
        HookRegistry.apply_hooks()
    return "registered"


def _is_ours(obj: Any, fn: Any) -> bool:
    """``obj is fn``, also across an ``importlib.reload`` of this module (same module and qualname)."""
    return obj is fn or (
        getattr(obj, "__module__", None) == fn.__module__
        and getattr(obj, "__qualname__", None) == fn.__qualname__
    )


# ----------------------------------------------------------------------------------------------------------
# The factory (runs in SGLang's scheduler process, ModelRunner.init_attention_backends)
# ----------------------------------------------------------------------------------------------------------


def create_backend(runner: Any) -> Any:
    """SGLang attention-backend factory for ``flashmla_ops``: ``fn(model_runner) -> AttentionBackend``.

    Validates the configuration (:func:`check_runner`), registers the DeepSeek forward-method handler if
    :func:`register` deferred it, then builds (once per process) and instantiates the backend class, a
    subclass of SGLang's ``FlashMLABackend`` whose kernel calls go to flashmla_ops
    (``flashmla_ops.integration.sglang_backend``).

    Raises:
        FlashMLAOpsSGLangError: the configuration is not supported (see :func:`check_runner`; also decode
            context parallelism).
    """
    check_runner(runner)
    try:
        _register_deepseek_handler(import_module=True)
    except Exception as e:
        logger.warning(
            "flashmla_ops: could not register the DeepSeek attention handler (%s: %s); DeepSeek models "
            "would fall back to SGLang's triton forward-method choices",
            type(e).__name__,
            e,
        )
    from .sglang_backend import get_backend_class

    return get_backend_class()(runner)
