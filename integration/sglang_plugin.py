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
   size with :class:`FlashMLAOpsSGLangError`;
6. ``deterministic_choices``: adds it to ``DETERMINISTIC_ATTENTION_BACKEND_CHOICES``
   (``add_deterministic_attention_backend_choices``), so that ``--enable-deterministic-inference`` accepts
   ``--attention-backend flashmla_ops``. The backend then plans every decode with flashmla_ops'
   batch-invariant schedule (:func:`create_backend`);
7. ``deterministic_mla_models``: adds it to ``RADIX_SUPPORTED_DETERMINISTIC_ATTENTION_BACKEND``
   (``add_radix_supported_deterministic_attention_backend_choices``): for DeepSeek-family (absorbed-MLA)
   models, the only ones flashmla_ops serves, SGLang admits only the backends of that list to deterministic
   inference. SGLang also keeps the radix cache on for them, which step 8 undoes: this step is therefore
   taken after step 8, and not at all if step 8 failed (SGLang then refuses the combination);
8. ``deterministic_radix_cache``: under deterministic inference with flashmla_ops serving prefill, turns the
   radix cache off, as SGLang does for the backends it does not list as radix-safe: the prefill is SGLang's
   FlashInfer MLA path, whose extend after a prefix-cache hit runs another kernel than a cold prefill, so a
   cached prompt would not reproduce its cold results. SGLang 0.5.23: a wrapper of the resolution step
   ``handle_deterministic_inference`` (``register_resolution_hook``); 0.5.17: an AFTER hook on
   ``ServerArgs._handle_deterministic_inference``. Where neither exists, pass ``--disable-radix-cache``.

Steps 6 to 8 use hooks that SGLang 0.5.17 and 0.5.23 both offer; a SGLang without one reports that step as
failed (the others, and the backend without deterministic inference, still work).

:func:`register` is cheap and idempotent: it imports only SGLang's argument / plugin modules and the attention
registry (none of which touch CUDA) and never ``flashmla_ops`` itself or the backend class, which is built
lazily by :func:`create_backend`. The same code serves SGLang 0.5.17 (the newest release pinned to torch
2.11) and 0.5.23: every symbol used is imported from a location present in both, except the hook point of
step 8, which is chosen by what the installed version has.

Limitations (documented, not hooked): speculative decoding (EAGLE/MTP) needs
``--speculative-draft-attention-backend flashmla`` (SGLang's draft-backend tables are closed dictionaries;
the target model's verify step does run on flashmla_ops); decode context parallelism (DCP) and an FP8 e5m2
KV cache are rejected when the backend is created.
"""

from __future__ import annotations

import importlib
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
    "DETERMINISTIC_HOOK_TARGET",
    "DETERMINISTIC_RESOLUTION_STEP",
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
        ``attention_backend_factory``, ``deepseek_handler``, ``page_size_hook``, ``deterministic_choices``,
        ``deterministic_radix_cache`` and ``deterministic_mla_models``; a status is ``"registered"``,
        ``"already registered"``, ``"deferred: ..."`` or ``"failed: <error>"``.
    """
    steps = (
        ("argparse_choices", _register_argparse_choice),
        ("chunked_prefix_cache", _register_chunked_prefix_cache),
        ("attention_backend_factory", _register_factory),
        ("deepseek_handler", lambda: _register_deepseek_handler(import_module=False)),
        ("page_size_hook", _register_page_size_hook),
        ("deterministic_choices", _register_deterministic_choices),
        ("deterministic_radix_cache", _register_deterministic_radix_cache),
        # Only once the radix cache step is in place: this list also keeps SGLang's radix cache on.
        ("deterministic_mla_models", lambda: _register_deterministic_mla_models(status)),
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
    return _register_after_hook(
        PAGE_SIZE_HOOK_TARGET, _page_size_hook, f"pass --page-size {PAGE_SIZE}; the factory checks it"
    )


def _register_after_hook(target: str, hook: Any, fallback: str) -> str:
    """Register ``hook`` as an AFTER hook of ``target`` in SGLang's ``HookRegistry`` (once)."""
    from sglang.srt.plugins import hook_registry
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    hooks = getattr(HookRegistry, "_hooks", {})
    if any(_is_ours(h, hook) for _type, h, *_src in hooks.get(target, ())):
        return "already registered"
    patched_before = target in getattr(HookRegistry, "_patched", ())
    HookRegistry.register(target, hook, HookType.AFTER)
    if patched_before:
        # apply_hooks() skips targets it has patched already: another plugin hooked this function earlier
        # and its hooks are applied. Ours will not be.
        raise RuntimeError(f"{target} was already patched by another plugin; {fallback}")
    source = getattr(hook_registry, "_current_plugin_source", None)
    if source is None or source.get() is None:
        # Called directly rather than by load_plugins(), which applies all hooks right after the plugins
        # ran: apply now, so that the hook is live when this function returns.
        HookRegistry.apply_hooks()
    return "registered"


# ---- deterministic inference (--enable-deterministic-inference) -------------------------------------------
# SGLang validates the attention backend against two lists that plugins may extend (0.5.17 and 0.5.23):
# DETERMINISTIC_ATTENTION_BACKEND_CHOICES for every model, and for DeepSeek-family (absorbed-MLA) models,
# the only ones flashmla_ops serves, RADIX_SUPPORTED_DETERMINISTIC_ATTENTION_BACKEND as well. Being on the
# second list also makes SGLang keep the radix cache, which flashmla_ops cannot honour (see
# _prefix_cache_breaks_determinism): the third step turns it off again.
_DETERMINISTIC_CHOICES = (
    "add_deterministic_attention_backend_choices",
    "DETERMINISTIC_ATTENTION_BACKEND_CHOICES",
)
_DETERMINISTIC_MLA_CHOICES = (
    "add_radix_supported_deterministic_attention_backend_choices",
    "RADIX_SUPPORTED_DETERMINISTIC_ATTENTION_BACKEND",
)
#: SGLang 0.5.23's resolution step of --enable-deterministic-inference (a plugin-overridable step).
DETERMINISTIC_RESOLUTION_STEP = "handle_deterministic_inference"
#: SGLang 0.5.17's equivalent, a ServerArgs method run from __post_init__.
DETERMINISTIC_HOOK_TARGET = "sglang.srt.server_args.ServerArgs._handle_deterministic_inference"


def _add_choice(adder: str, choices: str, consequence: str) -> str:
    server_args = importlib.import_module("sglang.srt.server_args")
    add, current = getattr(server_args, adder, None), getattr(server_args, choices, None)
    if add is None or current is None:
        raise RuntimeError(f"this SGLang has no sglang.srt.server_args.{adder}: {consequence}")
    if BACKEND_NAME in current:
        return "already registered"
    add([BACKEND_NAME])
    return "registered"


def _register_deterministic_choices() -> str:
    return _add_choice(
        *_DETERMINISTIC_CHOICES,
        f"--enable-deterministic-inference rejects --attention-backend {BACKEND_NAME}",
    )


def _register_deterministic_mla_models(status: dict[str, str]) -> str:
    radix = status.get("deterministic_radix_cache", "")
    if radix.startswith("failed"):
        # Listed without the radix step, a DeepSeek model would run deterministic inference with the radix
        # cache on and a prefill that does not reproduce after a cache hit: better refused by SGLang.
        raise RuntimeError(f"not registered because the radix cache step failed ({radix})")
    return _add_choice(
        *_DETERMINISTIC_MLA_CHOICES,
        f"--enable-deterministic-inference rejects --attention-backend {BACKEND_NAME} for DeepSeek models",
    )


def _prefix_cache_breaks_determinism(view: Any) -> bool:
    """Deterministic inference, the radix cache on, and flashmla_ops serving prefill.

    flashmla_ops' prefill is SGLang's FlashInfer MLA path (inherited from ``FlashMLABackend``), which takes
    a different kernel for an extend after a prefix-cache hit than for a cold prefill, so a cached prompt
    would not reproduce its cold results bit for bit. SGLang turns the radix cache off for such backends
    (those not on its radix list). With flashmla_ops only decoding (``--prefill-attention-backend`` another
    backend), the decode reads the same cache values either way, and the cache stays on.
    """
    if not getattr(view, "enable_deterministic_inference", False) or getattr(
        view, "disable_radix_cache", True
    ):
        return False
    prefill = getattr(view, "prefill_attention_backend", None) or getattr(view, "attention_backend", None)
    return prefill == BACKEND_NAME


_RADIX_CACHE_WARNING = (
    f"Deterministic inference with the {BACKEND_NAME} attention backend: disabling the radix cache (its "
    "prefill after a prefix-cache hit runs another kernel than a cold prefill)."
)


def _deterministic_radix_cache_step(server_args: Any, previous: Any) -> None:
    """SGLang 0.5.23: wraps the ``handle_deterministic_inference`` resolution step."""
    previous(server_args)
    from sglang.srt.arg_groups.overrides import declare_resolution, resolved_view

    if _prefix_cache_breaks_determinism(resolved_view(server_args)):
        logger.warning(_RADIX_CACHE_WARNING)
        declare_resolution(
            server_args, f"{BACKEND_NAME}:{DETERMINISTIC_RESOLUTION_STEP}", disable_radix_cache=True
        )


def _deterministic_radix_cache_hook(result: Any, server_args: Any, *args: Any, **kwargs: Any) -> None:
    """SGLang 0.5.17: AFTER hook of ``ServerArgs._handle_deterministic_inference``, which itself sets
    ``disable_radix_cache`` on the instance for the backends it does not trust with the cache."""
    from sglang.srt.arg_groups.overrides import resolved_view

    if _prefix_cache_breaks_determinism(resolved_view(server_args)):
        logger.warning(_RADIX_CACHE_WARNING)
        server_args.disable_radix_cache = True
    return None


def _register_deterministic_radix_cache() -> str:
    fallback = "pass --disable-radix-cache with --enable-deterministic-inference"
    try:
        resolution_hooks = importlib.import_module("sglang.srt.arg_groups.resolution_hooks")
    except ImportError:
        resolution_hooks = None
    register_step = getattr(resolution_hooks, "register_resolution_hook", None)
    if register_step is not None:  # 0.5.23
        wrappers = getattr(resolution_hooks, "_HOOKS", {}).get(DETERMINISTIC_RESOLUTION_STEP, ())
        if any(_is_ours(w, _deterministic_radix_cache_step) for w in wrappers):
            return "already registered"
        register_step(DETERMINISTIC_RESOLUTION_STEP)(_deterministic_radix_cache_step)
        return "registered"
    server_args = importlib.import_module("sglang.srt.server_args")
    if hasattr(getattr(server_args, "ServerArgs", None), "_handle_deterministic_inference"):  # 0.5.17
        return _register_after_hook(DETERMINISTIC_HOOK_TARGET, _deterministic_radix_cache_hook, fallback)
    raise RuntimeError(f"this SGLang has neither {DETERMINISTIC_RESOLUTION_STEP} hook point; {fallback}")


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
    :func:`register` deferred it, then builds (once per process and schedule) and instantiates the backend
    class, a subclass of SGLang's ``FlashMLABackend`` whose kernel calls go to flashmla_ops
    (``flashmla_ops.integration.sglang_backend``). Under deterministic inference
    (``--enable-deterministic-inference``) that class plans every decode with flashmla_ops'
    batch-invariant schedule, bounded by the runner's context length plus its draft tokens
    (``sglang_backend.batch_invariant_max_seqlen_k``): a request's output then does not depend on the rest
    of its batch.

    Raises:
        FlashMLAOpsSGLangError: the configuration is not supported (see :func:`check_runner`; also decode
            context parallelism, and under deterministic inference a request pool too large for the
            batch-invariant schedule at this context length).
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
    from .sglang_backend import batch_invariant_max_seqlen_k, get_backend_class

    # Deterministic inference: flashmla_ops' batch-invariant schedule, bounded by the runner's context length.
    return get_backend_class(batch_invariant_max_seqlen_k(runner))(runner)
