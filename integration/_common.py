"""What the SGLang plugin (:mod:`.sglang_plugin`) and the backend (:mod:`.sglang_backend`) share: the
backend's name, the cache geometry the kernels serve, and the configuration check. Both modules import it;
neither imports the other at module level (the plugin loads the backend lazily, inside SGLang's process).
Needs neither SGLang nor a GPU.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BACKEND_NAME",
    "KV_LORA_RANK",
    "PAGE_SIZE",
    "QK_ROPE_HEAD_DIM",
    "FlashMLAOpsSGLangError",
    "check_runner",
]

#: The value of ``--attention-backend`` (and of the prefill / decode variants) that selects this backend.
BACKEND_NAME = "flashmla_ops"
#: The only KV-cache page size (tokens per page) the flashmla_ops kernels support.
PAGE_SIZE = 64
#: Latent ("NoPE") and RoPE widths of the absorbed MLA cache the kernels support (576 = 512 + 64).
KV_LORA_RANK = 512
QK_ROPE_HEAD_DIM = 64


class FlashMLAOpsSGLangError(ValueError):
    """SGLang asked the ``flashmla_ops`` attention backend for a configuration it cannot serve.

    Raised when the backend is created (in SGLang's scheduler process, so ``launch_server`` reports it
    and exits) for: a model that is not MLA, a page size other than 64, a KV cache that is neither 16-bit nor
    float8_e4m3fn (``--kv-cache-dtype fp8_e5m2``, float32),
    MLA dimensions other than kv_lora_rank 512 / qk_rope_head_dim 64, and decode context parallelism.
    """


def check_runner(runner: Any) -> None:
    """Raise :class:`FlashMLAOpsSGLangError` if ``runner`` (a SGLang ``ModelRunner``) cannot use flashmla_ops.

    Checked, in this order: ``runner.use_mla_backend`` (the model must be MLA), ``runner.page_size == 64``,
    ``runner.kv_cache_dtype`` (bfloat16, float16 or float8_e4m3fn) and, when
    ``runner.model_config`` has them, ``kv_lora_rank == 512`` and ``qk_rope_head_dim == 64``.
    Reads attributes only; never touches a device.
    """
    if not getattr(runner, "use_mla_backend", False):
        raise FlashMLAOpsSGLangError(
            f"--attention-backend {BACKEND_NAME} serves MLA models only (DeepSeek-V2/V3-style multi-head "
            "latent attention); this model does not use MLA (ModelRunner.use_mla_backend is False). "
            "Choose another attention backend for it, e.g. flashinfer, fa3 or triton."
        )
    page_size = getattr(runner, "page_size", None)
    if page_size != PAGE_SIZE:
        raise FlashMLAOpsSGLangError(
            f"--attention-backend {BACKEND_NAME} needs a KV-cache page size of {PAGE_SIZE}, got "
            f"page_size={page_size}: launch with --page-size {PAGE_SIZE}. (The plugin normally implies it; "
            "this happens when its page-size hook could not be installed, see the plugin's log.)"
        )
    kv_dtype = getattr(runner, "kv_cache_dtype", None)
    if kv_dtype is not None:
        import torch  # SGLang has imported it already; deferred only to keep this module light

        if kv_dtype not in (torch.bfloat16, torch.float16, torch.float8_e4m3fn):
            raise FlashMLAOpsSGLangError(
                f"--attention-backend {BACKEND_NAME} does not support a {kv_dtype} KV cache (kv_cache_dtype="
                f"{kv_dtype}): it serves bfloat16 / float16 caches (--kv-cache-dtype auto) and FP8 e4m3 "
                "(--kv-cache-dtype fp8_e4m3). Use one of those, or another attention backend."
            )
    model_config = getattr(runner, "model_config", None)
    for field, expected in (("kv_lora_rank", KV_LORA_RANK), ("qk_rope_head_dim", QK_ROPE_HEAD_DIM)):
        value = getattr(model_config, field, expected)
        if value != expected:
            raise FlashMLAOpsSGLangError(
                f"--attention-backend {BACKEND_NAME} supports MLA with kv_lora_rank={KV_LORA_RANK} and "
                f"qk_rope_head_dim={QK_ROPE_HEAD_DIM} (a 576-wide latent cache), got {field}={value}."
            )
